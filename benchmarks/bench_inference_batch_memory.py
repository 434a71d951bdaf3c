"""Peak memory of ``predict_labels`` on 1,000 images at 224 px, with and without the batch cap.

``guard.core.models.inference_batch`` caps a batch at ``MAX_BATCH_ELEMENTS`` input values (55
images at 3x224x224); before it, the helpers ran their default 1,000 images at once. Each mode
runs in its own process (peak RSS is per process). EfficientNet-Lite0 (the ``[imagenet]`` extra).

Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_inference_batch_memory.py capped
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_inference_batch_memory.py uncapped
"""

from __future__ import annotations

import argparse
import resource
import time

import imagenet_efficientnet
import torch

import guard.core.models as gm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["capped", "uncapped"])
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.mode == "uncapped":
        gm.MAX_BATCH_ELEMENTS = 10**12  # the helpers' default batch of 1,000, as before the cap
    model = imagenet_efficientnet.build()
    x = torch.rand(args.n, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    gm.predict_labels(model, x)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{args.mode}: batch {gm.inference_batch(x, 1000)}, peak RSS {peak:.0f} MiB (before the call {before:.0f} MiB: "
        f"model + images), {time.perf_counter() - t0:.1f} s"
    )


if __name__ == "__main__":
    main()
