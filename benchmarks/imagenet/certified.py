"""Certified patch recovery and detection (PatchCleanser's masks) for EfficientNet-Lite0 at 224 px.

The ImageNet rows of benchmarks/results/certified_patches.json (issue 37), run by
``python -m benchmarks.studies.certified_patches --imagenet N``. A seeded sample of ``N`` of the
1,000-image ILSVRC sample (:func:`benchmarks.imagenet.sample.load`, never trained on: the model
is the registry's pretrained EfficientNet-Lite0, with no mask training), one square patch of
each area share (1% = 22 px, 2% = 32 px at 224 px), PatchCleanser's 6 x 6 mask set.
:func:`guard.detectors.masking.certify` runs on chunks of ``CHUNK`` images; each finished chunk
is written under ``work`` (a folder named after the sample and k) as ``imagenet_<area>_<start>.json`` (its per-image outcomes), so an interrupted
run starts again at its first unfinished chunk. A forward pass at 224 px costs ~150 ms per image
on one CPU thread and certification needs up to 36 + 630 of them per image, so N is small on a
CPU; the intervals say how small.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from guard.core.cache import atomic_write_text
from guard.core.intervals import rate_interval
from guard.detectors.masking import certify, mask_set

CHUNK = 4
OUTCOMES = ("model_correct", "clean_correct", "certified_recovery", "certified_detection", "clean_flagged")


def _chunk(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, masks, batch_size: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    cert = certify(model, x, y, masks=masks, batch_size=batch_size)
    per_image = {
        "model_correct": cert.clean_pred == cert.y,
        "clean_correct": cert.recovered == cert.y,
        "certified_recovery": cert.recovery_certified,
        "certified_detection": cert.detection_certified,
        "clean_flagged": cert.flagged,
    }
    return {
        **{k: [bool(b) for b in v.tolist()] for k, v in per_image.items()},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def certify_area(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    area: float,
    work: Path,
    *,
    k: int = 6,
    batch_size: int = 64,
) -> dict[str, Any]:
    """The certified rates of one patch area over ``x``, resuming from the chunks under ``work``."""
    masks = mask_set(tuple(x.shape[-2:]), area, k)
    work.mkdir(parents=True, exist_ok=True)
    chunks = []
    for start in range(0, len(y), CHUNK):
        path = work / f"imagenet_{area:g}_{start}.json"
        if path.is_file():
            done = json.loads(path.read_text())
        else:
            done = _chunk(model, x[start : start + CHUNK], y[start : start + CHUNK], masks, batch_size)
            atomic_write_text(path, json.dumps(done) + "\n")
        chunks.append(done)
        print(
            f"area {area:g}: images {start}..{start + len(done['clean_correct']) - 1} in {done['seconds']} s",
            flush=True,
        )
    n = len(y)
    hits = {key: sum(sum(c[key]) for c in chunks) for key in OUTCOMES}
    seconds = sum(c["seconds"] for c in chunks)
    h, w = masks.patch_size
    return {
        "n": n,
        "patch_side": h if h == w else [h, w],
        "patch_area": round(h * w / (x.shape[-2] * x.shape[-1]), 4),
        "masks": len(masks),
        "mask_size": list(masks.mask_size),
        "mask_stride": list(masks.stride),
        "model_accuracy": round(hits["model_correct"] / n, 4),
        "clean_accuracy": round(hits["clean_correct"] / n, 4),
        **{key: round(hits[key] / n, 4) for key in OUTCOMES[2:]},
        "ci95": {
            ("clean_accuracy" if key == "clean_correct" else key): rate_interval(hits[key], n) for key in OUTCOMES[1:]
        },
        "seconds": round(seconds, 1),
        "images_per_second": round(n / seconds, 3),
        "threads": torch.get_num_threads(),
    }


def imagenet_rows(n: int, areas: list[float], work: Path, *, k: int = 6, seed: int = 0) -> dict[str, Any]:
    """``{area: rates}`` for EfficientNet-Lite0 on a seeded sample of ``n`` sample images."""
    from benchmarks.imagenet.efficientnet import build
    from benchmarks.imagenet.sample import load

    model = build()
    x, y = load(n, seed=seed)
    work = work / f"efficientnet-lite0_seed{seed}_n{n}_k{k}"  # chunks of another sample are never reused
    return {f"{area:g}": certify_area(model, x, y, area, work, k=k) for area in areas}
