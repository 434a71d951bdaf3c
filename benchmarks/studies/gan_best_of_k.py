"""What a distribution of patches buys an attacker over one patch: best-of-k fooling on CIFAR-10 (issue 37).

A :class:`PatchGAN`'s mean fooling rate is bounded by its best single patch's, so a generator
of diverse patches helps an attacker only when it gets several tries. Per image, each attacker
gets ``--k`` tries, each one patch at a uniformly random position; the image counts as fooled
when any try changes the label of an image the model got right:

- ``patch_gan``: ``k`` patches sampled from one trained generator;
- ``universal_best_of_k``: ``k`` universal patches, trained the same way with seeds 0..k-1 (the
  issue's comparison: the best of ``k`` universal patches);
- ``universal_one_patch_k_positions``: the seed-0 universal patch at ``k`` random positions (the
  control: what ``k`` tries give without any diversity of content).

Both attacks are built by :func:`benchmarks.fixtures.patch_attacks.learnt_patches` (the audit's
settings, ``--steps`` training steps, margin loss, batch 32), trained on ``train[2000:2500]`` of
``guard.demo_data("cifar10")``, and measured on ``test[500:500+n]`` (the same images as
``patch_flag_cifar10.json``); nothing is tuned here. Rates carry their 95% Clopper-Pearson
interval; the mean single-try rate of each is reported beside its best-of-k. Writes
benchmarks/results/gan_best_of_k_cifar10.json:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.studies.gan_best_of_k --model demo --k 5 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.fixtures.patch_attacks import learnt_patches
from benchmarks.fixtures.rates import rate_entry as _rate
from benchmarks.fixtures.timing import out_option, pin_threads
from guard.core.provenance import write_results


@torch.no_grad()
def fooled_per_try(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, patches: list[torch.Tensor], seed: int
) -> torch.Tensor:
    """(k, N) bool: try ``t`` pastes ``patches[t]`` (N or 1, C, s, s) on every image at a random position
    (generator ``seed + t``) and changes its label."""
    from guard.attacks.patching import apply_patches, random_positions

    out = []
    for t, p in enumerate(patches):
        gen = torch.Generator().manual_seed(seed + t)
        pos = random_positions(int(x.shape[0]), int(p.shape[-1]), x.shape[-2:], generator=gen)
        out.append(model(apply_patches(x, p.expand(x.shape[0], -1, -1, -1), pos)).argmax(1) != y)
    return torch.stack(out)


def _summary(tries: torch.Tensor) -> dict:
    return {
        "best_of_k": _rate(tries.any(0)),
        "mean_single_try": round(float(tries.float().mean()), 4),
        "best_single_try": round(float(tries.float().mean(1).max()), 4),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo", choices=["demo", "masked"])
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--patch", type=int, default=5)
    p.add_argument("--steps", type=int, default=200, help="training steps of each patch attack")
    p.add_argument("--threads", type=int, default=1)
    out_option(p, "gan_best_of_k_cifar10")
    args = p.parse_args(argv)
    pin_threads(args.threads)

    import guard
    from guard.attacks import UniversalPatch

    t0 = time.perf_counter()
    model = guard.demo_model("cifar10", **({} if args.model == "demo" else {"variant": args.model})).eval()
    train, test = guard.demo_data("cifar10")
    patch_x = train.x[2000:2500]
    x, y = test.x[500 : 500 + args.n], test.y[500 : 500 + args.n]
    with torch.no_grad():
        right = model(x).argmax(1) == y
    x, y = x[right], y[right]

    attacks = learnt_patches(args.patch, args.steps)
    gan = attacks["patch_gan"].fit(model, patch_x)
    gan_patches = gan.sample(args.k * x.shape[0], generator=torch.Generator().manual_seed(1)).view(
        args.k, x.shape[0], *gan.sample(1).shape[1:]
    )
    seconds = {"patch_gan_fit": round(time.perf_counter() - t0, 1)}
    universal = [attacks["universal_patch"]]
    params = attacks["universal_patch"].params()
    for s in range(1, args.k):
        universal.append(UniversalPatch.from_params(**{**params, "seed": s}))
    t1 = time.perf_counter()
    for u in universal:
        u.fit(model, patch_x)
    seconds["universal_fits"] = round(time.perf_counter() - t1, 1)

    tries = {
        "patch_gan": fooled_per_try(model, x, y, list(gan_patches), seed=100),
        "universal_best_of_k": fooled_per_try(model, x, y, [u.patch_ for u in universal], seed=100),
        "universal_one_patch_k_positions": fooled_per_try(model, x, y, [universal[0].patch_] * args.k, seed=100),
    }
    figures = {
        "model": args.model,
        "model_sha256": model.guard_meta.get("sha256"),
        "k": args.k,
        "patch_side": args.patch,
        "n": int(x.shape[0]),
        "data": "guard.demo_data('cifar10'): patches learn on train[2000:2500]; every figure on the images of "
        f"test[500:{500 + args.n}] the model gets right; positions and latents seeded",
        "patch_gan_params": gan.params(),
        "universal_params": params,
        "universal_val_fooling_rates": [round(float(u.val_fooling_rate_), 4) for u in universal],
        **{name: _summary(t) for name, t in tries.items()},
        "seconds": {**seconds, "total": round(time.perf_counter() - t0, 1)},
    }
    write_results(args.out, figures)
    for name in tries:
        print(name, figures[name])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
