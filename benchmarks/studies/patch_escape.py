"""Do the patch GAN's diverse patches escape a defence fitted on the universal patch? (issue 37, CIFAR-10)

Jujutsu- and SentiNet-style defences, and any detector trained on the attacks it was shown, learn
the patches they saw; a generator of diverse patches is the attacker's answer. The defence here
is the plainest one fitted on an attack: a logistic regression (scikit-learn, standardised) on
the demo model's penultimate features (the head's input), trained to separate clean images
(``train[:1000]``) from the same kind of images carrying the seed-0 universal patch at random
positions (``train[1000:2000]``), its threshold set at ``--fpr`` on clean ``test[:500]``.

Measured on the images of ``test[500:800]`` the model gets right, ``--k`` tries per image (a
patch at a seeded random position each), for three attackers:

- ``universal_seen``: the patch the defence was fitted on, at new positions and on new images;
- ``universal_unseen``: ``k`` other universal patches (seeds 1..k), trained the same way;
- ``patch_gan``: ``k`` samples of one PatchGAN.

Per attacker: the share of its successful patched images the defence catches (one try), and the
share of images on which some try both fools the model and escapes the defence (best of k).
Both attacks are :func:`benchmarks.fixtures.patch_attacks.learnt_patches` (the audit's settings),
trained on ``train[2000:2500]``; nothing is tuned on the reported images. Writes
benchmarks/results/patch_escape_cifar10.json:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.studies.patch_escape --k 5 --threads 1
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.fixtures.patch_attacks import learnt_patches
from benchmarks.fixtures.rates import rate_entry
from benchmarks.fixtures.timing import out_option, pin_threads
from guard.core.provenance import write_results


def _paste(x: torch.Tensor, patch: torch.Tensor, seed: int) -> torch.Tensor:
    """``x`` with ``patch`` ((N or 1), C, s, s) at a random position per image (generator ``seed``)."""
    from guard.attacks.patching import apply_patches, random_positions

    gen = torch.Generator().manual_seed(seed)
    pos = random_positions(int(x.shape[0]), int(patch.shape[-1]), x.shape[-2:], generator=gen)
    return apply_patches(x, patch.expand(x.shape[0], -1, -1, -1), pos)


class FeatureDefence:
    """Logistic regression on the model's penultimate features: clean (0) against patched (1)."""

    def __init__(self, model: torch.nn.Module) -> None:
        from guard.core.features import find_head

        self.model = model
        self.layer = f"{find_head(model)[0]}:input"

    def features(self, x: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        from guard.core.features import extract_features

        logits, feats = extract_features(self.model, x, [self.layer])
        return feats[self.layer].numpy(), logits.argmax(1)

    def fit(self, clean: torch.Tensor, patched: torch.Tensor) -> FeatureDefence:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        f0, f1 = self.features(clean)[0], self.features(patched)[0]
        self.clf_ = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        self.clf_.fit(np.concatenate([f0, f1]), np.r_[np.zeros(len(f0)), np.ones(len(f1))])
        return self

    def score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch score, the model's label) per image; higher score = more like the fitted patch."""
        f, pred = self.features(x)
        return torch.from_numpy(self.clf_.decision_function(f)), pred


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--patch", type=int, default=5)
    p.add_argument("--steps", type=int, default=200, help="training steps of each patch attack")
    p.add_argument("--fpr", type=float, default=0.05, help="the defence's false-positive rate on clean test[:500]")
    p.add_argument("--threads", type=int, default=1)
    out_option(p, "patch_escape_cifar10")
    args = p.parse_args(argv)
    pin_threads(args.threads)

    import guard
    from guard.attacks import UniversalPatch

    t0 = time.perf_counter()
    model = guard.demo_model("cifar10").eval()
    train, test = guard.demo_data("cifar10")
    attacks = learnt_patches(args.patch, args.steps)
    seen = attacks["universal_patch"].fit(model, train.x[2000:2500])
    gan = attacks["patch_gan"].fit(model, train.x[2000:2500])
    params = seen.params()
    unseen = [
        UniversalPatch.from_params(**{**params, "seed": s}).fit(model, train.x[2000:2500]) for s in range(1, args.k + 1)
    ]
    fit_seconds = round(time.perf_counter() - t0, 1)

    defence = FeatureDefence(model).fit(train.x[:1000], _paste(train.x[1000:2000], seen.patch_, seed=7))
    calib, _ = defence.score(test.x[:500])
    threshold = float(torch.quantile(calib.double(), 1 - args.fpr))

    x, y = test.x[500:800], test.y[500:800]
    clean_score, pred = defence.score(x)
    right = pred == y
    x, y = x[right], y[right]
    n = int(x.shape[0])
    gan_patches = gan.sample(args.k * n, generator=torch.Generator().manual_seed(1)).view(
        args.k, n, *seen.patch_.shape[1:]
    )
    tries = {
        "universal_seen": [seen.patch_] * args.k,
        "universal_unseen": [u.patch_ for u in unseen],
        "patch_gan": list(gan_patches),
    }
    results = {}
    for name, patches in tries.items():
        fooled, caught = [], []
        for t, patch in enumerate(patches):
            s, label = defence.score(_paste(x, patch, seed=100 + t))
            fooled.append(label != y)
            caught.append(s > threshold)
        fooled_t, caught_t = torch.stack(fooled), torch.stack(caught)
        results[name] = {
            "fooled_one_try": rate_entry(fooled_t[0]),
            "caught_on_success_one_try": rate_entry(caught_t[0][fooled_t[0]]),
            "caught_on_success_all_tries": rate_entry(caught_t[fooled_t]),
            "fools_and_escapes_best_of_k": rate_entry((fooled_t & ~caught_t).any(0)),
            "fools_best_of_k": rate_entry(fooled_t.any(0)),
        }
        print(name, results[name], flush=True)
    figures = {
        "model": "demo",
        "model_sha256": model.guard_meta.get("sha256"),
        "k": args.k,
        "patch_side": args.patch,
        "n": n,
        "defence": "logistic regression (sklearn, standardised) on the model's penultimate features, clean train[:1000] "
        "against train[1000:2000] carrying the seed-0 universal patch at random positions",
        "fpr_target": args.fpr,
        "threshold": threshold,
        "clean_flagged_on_reported": rate_entry(clean_score[right] > threshold),
        "data": "guard.demo_data('cifar10'): patches learn on train[2000:2500]; the defence fits on train[:2000]; its "
        "threshold on test[:500]; every figure on the images of test[500:800] the model gets right",
        **results,
        "universal_params": params,
        "patch_gan_params": gan.params(),
        "seconds": {"fits": fit_seconds, "total": round(time.perf_counter() - t0, 1)},
    }
    write_results(args.out, figures)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
