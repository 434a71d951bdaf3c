"""Certification throughput: guard's ``certify`` against PatchCleanser's reference logic, on the same model and images.

The reference is the authors' code (Xiang et al., USENIX Security 2022; github.com/inspire-group/PatchCleanser
at 6ec4488): its ``utils/defense.py`` is loaded from ``--reference`` (a file extracted from the
fetched snapshot, never part of guard) and its ``gen_mask_set``, ``certify_precomputed`` and
``double_masking_precomputed`` are called as they are (``.cuda()`` made a no-op: this machine has
no GPU). The two-mask prediction map is computed as ``pc_certification.py`` computes it (that part
of the script is not a function, so its loop is transcribed here): every pair (i <= j) of the mask
set, one forward pass of the whole image batch per pair, then the symmetric map. guard's
:func:`guard.detectors.masking.certify` runs on the same images with the same mask set and fill.

Checks that both give the same certified-recovery and recovered labels per image (any difference
is printed and recorded), and prints images/s of each and the ratio (guard / reference; above 1,
guard is faster). Also times the model's forward pass on masked images in the default (NCHW) and
channels-last layout (guard feeds the latter). Writes
benchmarks/results/certify_vs_patchcleanser.json:

    git -C /work/.mirror/inspire-group+PatchCleanser/repo show 6ec4488:utils/defense.py > /tmp/pc_defense.py
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.peers.certify_vs_patchcleanser --reference /tmp/pc_defense.py \\
        --model demo --n 50 --threads 1
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import time
from argparse import Namespace
from importlib import resources
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from benchmarks.fixtures.timing import out_option, pin_threads
from guard.core.provenance import write_results


def load_reference(path: str):
    """PatchCleanser's ``utils/defense.py`` as a module."""
    spec = importlib.util.spec_from_file_location("patchcleanser_defense", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def reference_masks(ref, image: int, patch: int, k: int) -> list[torch.Tensor]:
    """The reference's mask list (bool (1, 1, H, W), True = kept) for a square image and patch."""
    args = Namespace(pa=-1, pb=-1, patch_size=patch, mask_stride=-1, num_mask=k)
    with mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **kw: self):
        masks, _, _ = ref.gen_mask_set(args, {"input_size": (3, image, image)})
    return masks


@torch.no_grad()
def reference_certify(ref, model, x, y, masks, fill: float, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """pc_certification.py's loop: the full two-mask map per image batch, then the reference's
    certify_precomputed and double_masking_precomputed per image. Returns (certified, recovered)."""
    fill_t = torch.tensor(fill)
    maps = []
    for s in range(0, x.shape[0], batch):
        data = x[s : s + batch]
        pm = np.zeros([data.shape[0], len(masks), len(masks)], dtype=int)
        for i, m1 in enumerate(masks):
            for j in range(i, len(masks)):
                pm[:, i, j] = model(torch.where(torch.logical_and(m1, masks[j]), data, fill_t)).argmax(1).numpy()
        maps.append(pm)
    certified, recovered = [], []
    for pm, label in zip(np.concatenate(maps), y.numpy()):
        pm = pm + pm.T - np.diag(np.diag(pm))  # as pc_certification.py: the symmetric map from the triangle
        certified.append(bool(ref.certify_precomputed(pm, label)))
        recovered.append(int(ref.double_masking_precomputed(pm)))
    return np.array(certified), np.array(recovered)


def layout_images_per_second(model, x: torch.Tensor, reps: int = 3) -> dict[str, float]:
    """Forward passes per second on the same images in the default and the channels-last layout (best of reps)."""
    out = {}
    with torch.inference_mode():
        for name, xx in (("nchw", x.contiguous()), ("channels_last", x.contiguous(memory_format=torch.channels_last))):
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                for i in range(0, xx.shape[0], 256):
                    model(xx[i : i + 256])
                best = min(best, time.perf_counter() - t0)
            out[name] = round(x.shape[0] / best, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", required=True, help="PatchCleanser's utils/defense.py (see the module docstring)")
    p.add_argument("--model", default="demo", choices=["demo", "masked"])
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--patch", type=int, default=5)
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--batch", type=int, default=50, help="images per forward pass of the reference's loop")
    p.add_argument("--fill", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="seeds the sample of --n test images")
    out_option(p, "certify_vs_patchcleanser")
    args = p.parse_args(argv)
    pin_threads(args.threads)

    import guard
    from guard.core.archive import read_image_archive
    from guard.detectors.masking import certify, mask_set

    ref = load_reference(args.reference)
    model = guard.demo_model("cifar10", variant="standard" if args.model == "demo" else "masked").eval()
    archive = Path(str(resources.files("guard") / "_data" / "cifar10" / "cifar10-test.tar.gz"))
    x, y, _ = read_image_archive(archive)
    pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))[: args.n]  # class-ordered archive
    x, y = x[pick].float() / 255, y[pick]

    ref_masks = reference_masks(ref, x.shape[-1], args.patch, args.k)
    masks = mask_set(tuple(x.shape[-2:]), args.patch, args.k)
    same_masks = sorted(m.flatten().tolist() for m in ref_masks) == sorted(
        m.flatten().tolist() for m in masks.keep().cpu()
    )
    print(f"mask sets: reference {len(ref_masks)}, guard {len(masks)}, identical: {same_masks}", flush=True)

    t0 = time.perf_counter()
    cert = certify(model, x, y, masks=masks, fill=args.fill)
    t_guard = time.perf_counter() - t0
    print(f"guard certify: {t_guard:.1f} s ({args.n / t_guard:.2f} images/s)", flush=True)
    t0 = time.perf_counter()
    ref_cert, ref_rec = reference_certify(ref, model, x, y, ref_masks, args.fill, args.batch)
    t_ref = time.perf_counter() - t0
    print(f"reference: {t_ref:.1f} s ({args.n / t_ref:.2f} images/s)", flush=True)

    cert_diff = np.flatnonzero(ref_cert != cert.recovery_certified.numpy()).tolist()
    rec_diff = np.flatnonzero(ref_rec != cert.recovered.numpy()).tolist()
    print(f"images where certified recovery differs: {cert_diff}; where the recovered label differs: {rec_diff}")
    layout = layout_images_per_second(model, x[:1].expand(1024, -1, -1, -1).clone())
    print(f"forward passes/s by layout: {layout}")
    write_results(
        args.out,
        {
            "reference": "inspire-group/PatchCleanser@6ec4488 utils/defense.py (gen_mask_set, certify_precomputed, "
            "double_masking_precomputed) with pc_certification.py's two-mask loop",
            "model": args.model,
            "model_sha256": model.guard_meta.get("sha256"),
            "reference_file_sha256": hashlib.sha256(Path(args.reference).read_bytes()).hexdigest(),
            "n": args.n,
            "patch_side": args.patch,
            "k": args.k,
            "masks": len(masks),
            "fill": args.fill,
            "reference_batch": args.batch,
            "threads": args.threads,
            "data": f"a seeded sample (seed {args.seed}) of the 10,000 CIFAR-10 test images shipped in guard/_data/cifar10",
            "mask_sets_identical": same_masks,
            "guard": {"seconds": round(t_guard, 2), "images_per_second": round(args.n / t_guard, 3)},
            "patchcleanser": {"seconds": round(t_ref, 2), "images_per_second": round(args.n / t_ref, 3)},
            "ratio_guard_over_patchcleanser": round(t_ref / t_guard, 3),
            "ratio_note": "images/s of guard over images/s of the reference (> 1: guard is faster)",
            "certified_recovery": {
                "guard": round(float(cert.recovery_certified.float().mean()), 4),
                "patchcleanser": round(float(ref_cert.mean()), 4),
            },
            "certified_recovery_differs_on": cert_diff,
            "recovered_label_differs_on": rec_diff,
            "forward_images_per_second_by_layout": layout,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
