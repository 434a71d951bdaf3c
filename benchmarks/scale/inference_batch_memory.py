"""Peak memory of ``predict_labels`` on 1,000 images at 224 px, with and without the batch cap.

``guard.core.models.inference_batch`` caps a batch at ``MAX_BATCH_ELEMENTS`` input values (55
images at 3x224x224); before it, the helpers ran their default 1,000 images at once. Each mode
runs in its own process (peak RSS is per process): without a mode the script runs both as child
processes and writes their figures and the ratio uncapped / capped peak RSS. EfficientNet-Lite0
(the ``[imagenet]`` extra). Writes benchmarks/results/inference_batch_memory.json:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.scale.inference_batch_memory [--n 1000]
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.scale.inference_batch_memory capped    # one mode, printed only
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import guard.core.models as gm
from benchmarks.fixtures.timing import out_option, pin_threads
from benchmarks.imagenet import efficientnet as imagenet_efficientnet
from guard.core.provenance import write_results

ROOT = Path(__file__).resolve().parents[2]


def measure(mode: str, n: int) -> dict:
    """One mode in this process: the batch used, peak RSS before and after ``predict_labels``, seconds."""
    pin_threads(1)
    if mode == "uncapped":
        gm.MAX_BATCH_ELEMENTS = 10**12  # the helpers' default batch of 1,000, as before the cap
    model = imagenet_efficientnet.build()
    x = torch.rand(n, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    gm.predict_labels(model, x)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # the images one forward pass takes: the helpers' batch (1,000, or the cap) or all n when fewer
    return {
        "mode": mode,
        "batch": min(gm.inference_batch(x, 1000), n),
        "peak_rss_mib": round(peak, 1),
        "peak_rss_before_call_mib": round(before, 1),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", nargs="?", choices=["capped", "uncapped"], help="run one mode here and print it as JSON")
    ap.add_argument("--n", type=int, default=1000)
    out_option(ap, "inference_batch_memory")
    args = ap.parse_args()
    if args.mode:
        r = measure(args.mode, args.n)
        print(
            f"{r['mode']}: batch {r['batch']}, peak RSS {r['peak_rss_mib']:.0f} MiB (before the call "
            f"{r['peak_rss_before_call_mib']:.0f} MiB: model + images), {r['seconds']:.1f} s",
            file=sys.stderr,
        )
        print(json.dumps(r))
        return
    rows = {}
    for mode in ("capped", "uncapped"):
        cmd = [sys.executable, "-m", "benchmarks.scale.inference_batch_memory", mode, "--n", str(args.n)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        rows[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        r = rows[mode]
        print(
            f"{mode}: batch {r['batch']}, peak RSS {r['peak_rss_mib']:.0f} MiB (before the call "
            f"{r['peak_rss_before_call_mib']:.0f} MiB: model + images), {r['seconds']:.1f} s",
            flush=True,
        )
    ratio = rows["uncapped"]["peak_rss_mib"] / rows["capped"]["peak_rss_mib"]
    print(f"peak RSS uncapped / capped: {ratio:.2f}")
    write_results(
        args.out,
        {
            "model": "EfficientNet-Lite0 (benchmarks.imagenet.efficientnet)",
            "images": args.n,
            "px": 224,
            "threads": 1,
            "max_batch_elements": gm.MAX_BATCH_ELEMENTS,
            "runs": "each mode in its own process (peak RSS is that run's alone)",
            "modes": rows,
            "ratio_peak_rss_uncapped_over_capped": round(ratio, 3),
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
