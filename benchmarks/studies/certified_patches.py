"""Certified patch recovery and detection by masking (PatchCleanser, Xiang et al. 2022) on CIFAR-10.

For each model named, :func:`guard.detectors.masking.certify` runs on a seeded sample of ``--n`` of the
10,000 CIFAR-10 test images shipped with guard (never trained on) against one square patch of
``--patch`` pixels (5 = 2.4% of a 32x32 image, the issue's setting), with PatchCleanser's k x k
mask set. Per model: the bare model's accuracy, the defended (double-masking) accuracy
``clean_accuracy``, ``certified_recovery`` (every two-mask label right), ``certified_detection``
(every one-mask label right) and ``clean_flagged`` (clean images the certified detector flags),
each with its 95% Clopper-Pearson interval (``ci95``), and the seconds it took. With ``--adaptive N``,
:class:`guard.attacks.MaskingPatch` (an attacker who knows the masks) runs on the first N images:
how often it escapes the certified flag or changes the recovered label, on the certified images
(never, if the certificates are proofs) and on the others. Models: ``demo`` (``guard.demo_model("cifar10")``) and ``masked``
(``guard.demo_model("cifar10", variant="masked")``, or ``--masked-folder``).

Writes benchmarks/results/certified_patches.json through :func:`guard.core.provenance.write_results`;
entries of models not rerun are kept from the existing file (each with its own commit and
command). ``"cifar10"`` holds the last model of ``--models`` (the issue's schema). With
``--imagenet N``, ``"imagenet"`` gets one entry per ``--areas`` share: the pretrained
EfficientNet-Lite0 on N images of the ImageNet sample (:mod:`benchmarks.imagenet.certified`,
resumable from ``--work``); ``--models`` with no names runs only those. The calibrated combined
flag and the patch GAN's best-of-k are measured by other studies (``"not_measured"`` names them
and their results files).

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.studies.certified_patches --models demo masked --n 200 --adaptive 40 --threads 1
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from guard.core.archive import read_image_archive
from guard.core.intervals import rate_interval
from guard.core.provenance import git_commit, write_results
from guard.detectors.masking import certify, mask_set

RESULTS = Path(__file__).resolve().parents[1] / "results" / "certified_patches.json"
NOT_MEASURED = {
    "flag_at_threshold": "measured by benchmarks.studies.patch_flag: benchmarks/results/patch_flag_cifar10.json",
    "gan_best_of_k": "measured by benchmarks.studies.gan_best_of_k: benchmarks/results/gan_best_of_k_cifar10.json",
}


def load_model(name: str, masked_folder: str | None) -> torch.nn.Module:
    import guard

    if name == "demo":
        return guard.demo_model("cifar10")
    if name == "masked":
        if masked_folder is not None:
            from guard.demo import cifar10_model

            return cifar10_model(masked_folder, variant="masked")
        return guard.demo_model("cifar10", variant="masked")
    raise ValueError(f"unknown model {name!r}; expected 'demo' or 'masked'.")


def adaptive(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, masks, patch: int, cert, n: int) -> dict:
    """:class:`guard.attacks.MaskingPatch` on the first ``n`` images: how often it escapes the flag or
    changes the recovered label, on certified images (a proof says never) and on the others."""
    from guard.attacks import MaskingPatch

    attack = MaskingPatch(keep=masks.keep(), size=patch, positions=2, steps=20, restarts=1, seed=0)
    t0 = time.perf_counter()
    r = attack(model, x[:n], y[:n])
    det, rec = cert.detection_certified[:n], cert.recovery_certified[:n]
    evades, changed, fooled = r.extras["evades_flag"], r.extras["recovery_changed"], r.success.cpu()

    def share(hit: torch.Tensor, on: torch.Tensor) -> dict:
        k, m = int((hit & on).sum()), int(on.sum())
        return {"k": k, "n": m, "rate": round(k / m, 4) if m else None, "ci95": rate_interval(k, m)}

    return {
        "attack": f"MaskingPatch({', '.join(f'{k}={v}' for k, v in attack.params().items())})",
        "n": int(r.success.numel()),
        "bare_fooled": share(fooled, torch.ones_like(fooled)),
        "evades_flag": share(evades, torch.ones_like(evades)),
        "evades_flag_on_detection_certified": share(evades, det),
        "evades_flag_on_not_detection_certified": share(evades, ~det),
        "recovery_changed": share(changed, torch.ones_like(changed)),
        "recovery_changed_on_recovery_certified": share(changed, rec),
        "recovery_changed_on_not_recovery_certified": share(changed, ~rec),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def run(
    name: str,
    x: torch.Tensor,
    y: torch.Tensor,
    patch: int,
    k: int,
    masked_folder: str | None,
    n_adaptive: int = 0,
    label: str | None = None,
) -> dict:
    model = load_model(name, masked_folder)
    masks = mask_set(tuple(x.shape[-2:]), patch, k)
    t0 = time.perf_counter()
    cert = certify(model, x, y, masks=masks)
    seconds = time.perf_counter() - t0
    out = cert.summary()
    n = int(cert.y.numel())
    rates = {
        "clean_accuracy": cert.recovered == cert.y,
        "certified_recovery": cert.recovery_certified,
        "certified_detection": cert.detection_certified,
        "clean_flagged": cert.flagged,
    }
    out["ci95"] = {k: rate_interval(int(v.sum()), n) for k, v in rates.items()}
    if n_adaptive:
        out["adaptive"] = adaptive(model, x, y, masks, patch, cert, n_adaptive)
    out.update(
        {
            "model": label or name,
            "model_sha256": model.guard_meta.get("sha256"),
            "seconds": round(seconds, 1),
            "images_per_second": round(x.shape[0] / seconds, 2),
            "threads": torch.get_num_threads(),
            "commit": git_commit(),
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        }
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=["demo"], choices=["demo", "masked"])
    p.add_argument(
        "--masked-folder",
        default=None,
        help="folder with resnet20_masked.safetensors/.json (default: the shipped variant)",
    )
    p.add_argument(
        "--masked-label", default="masked", help="the results entry of the --masked-folder model (default: masked)"
    )
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--patch", type=int, default=5)
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="seeds the sample of --n test images")
    p.add_argument(
        "--adaptive", type=int, default=0, help="run the masking-aware patch attack on the first this many images"
    )
    p.add_argument(
        "--imagenet",
        type=int,
        default=0,
        help="also certify EfficientNet-Lite0 on a seeded sample of this many images of the ImageNet sample",
    )
    p.add_argument("--areas", nargs="+", type=float, default=[0.02, 0.01], help="patch area shares for --imagenet")
    p.add_argument("--work", default="/tmp/guard-certified-patches", help="checkpoints of the ImageNet chunks")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    archive = Path(str(resources.files("guard") / "_data" / "cifar10" / "cifar10-test.tar.gz"))
    x, y, _ = read_image_archive(archive)
    # the archive is in class order (its first 1,000 images are airplanes): a seeded sample over all classes
    pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))[: args.n]
    x, y = x[pick].float() / 255, y[pick]
    old = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    per_model = dict(old.get("cifar10_models", {}))
    labels = [args.masked_label if name == "masked" else name for name in args.models]
    for name, label in zip(args.models, labels, strict=True):
        per_model[label] = run(name, x, y, args.patch, args.k, args.masked_folder, args.adaptive, label)
        print(label, json.dumps(per_model[label]), flush=True)
    keys = (
        "patch_area",
        "patch_side",
        "n",
        "clean_accuracy",
        "certified_recovery",
        "certified_detection",
        "clean_flagged",
    )
    cifar10 = old.get("cifar10")
    if labels:
        last = per_model[labels[-1]]
        cifar10 = {**{k: last[k] for k in keys}, "model": last["model"]}
    imagenet = dict(old.get("imagenet") or {})
    if args.imagenet:
        from benchmarks.imagenet.certified import imagenet_rows

        stamp = {"commit": git_commit(), "command": shlex.join([Path(sys.executable).name, *sys.argv])}
        for area, row in imagenet_rows(args.imagenet, args.areas, Path(args.work), k=args.k, seed=args.seed).items():
            imagenet[area] = {**row, "model": "EfficientNet-Lite0 (pretrained, no mask training)", **stamp}
            print("imagenet", area, json.dumps(imagenet[area]), flush=True)
    figures = {
        "cifar10": cifar10,
        "cifar10_models": per_model,
        "imagenet": imagenet or None,
        "data": f"a seeded sample (seed {args.seed}) of n of the 10,000 CIFAR-10 JPEG test images shipped in "
        "guard/_data/cifar10 (all classes; the archive itself is in class order); ImageNet: a seeded sample "
        f"(seed {args.seed}) of n of the 1,000-image ILSVRC sample in shared/datasets/imagenet-sample",
        "not_measured": NOT_MEASURED,
    }
    write_results(args.out, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
