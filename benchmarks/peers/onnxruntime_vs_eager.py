"""onnxruntime (CPU) vs PyTorch eager for the guarded demo model, batch 1 and 256, threads pinned.

The guarded model is ``guard.wrap(demo_model())`` with its default detectors (saliency, kNN
rank over conv2+fc1, PPCA, kNN consistency; combined flag), fitted on the 8,000 training images
and calibrated on 1,000 held-out ones. Eager = ``GuardedModel.forward`` (one forward pass with
hooks, FAISS flat search, float64 PPCA, one Captum backward pass for saliency). onnxruntime =
the exported graph (the same outputs: logits, scores, flags). Both run on one thread
(``torch.set_num_threads(1)``, ``intra_op_num_threads=1``). Also the bare model both ways. The ratio
is onnxruntime ms / eager ms (below 1: onnxruntime is faster). Writes
benchmarks/results/onnxruntime_vs_eager.json:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.peers.onnxruntime_vs_eager [--reps 20] [--batches 1 256]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

import guard
from benchmarks.fixtures.timing import out_option, paired_median_ms, pin_threads
from guard.core.provenance import write_results
from guard.export import load_session, to_onnx


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    out_option(ap, "onnxruntime_vs_eager")
    args = ap.parse_args()
    pin_threads(1)
    model = guard.demo_model(progress=False)
    train, test = guard.demo_data()
    g = guard.wrap(model).fit(train)
    perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(5))
    g.calibrate(test.x[perm[:1000]], fpr=0.05)
    tmp = Path(tempfile.mkdtemp())
    to_onnx(g, tmp / "guarded.onnx", test.x[:8])
    to_onnx(model, tmp / "bare.onnx", test.x[:8])
    s_guard = load_session(tmp / "guarded.onnx", "cpu", threads=1)
    s_bare = load_session(tmp / "bare.onnx", "cpu", threads=1)
    print(f"torch {torch.__version__}, threads: torch {torch.get_num_threads()}, onnxruntime intra_op 1")
    print(f"{'what':<10} {'batch':>5} {'eager ms':>10} {'ort ms':>10} {'ratio':>7}")
    rows: dict[str, dict[str, dict[str, float]]] = {"guarded": {}, "bare": {}}
    for b in args.batches:
        xb = test.x[:b].contiguous()
        reps = args.reps if b == 1 else max(5, args.reps // 2)
        eager, ort = paired_median_ms(lambda: g(xb), lambda: s_guard.run(xb), reps)
        print(f"{'guarded':<10} {b:>5} {eager:>10.2f} {ort:>10.2f} {ort / eager:>7.3f}")
        with torch.no_grad():
            eager_b, ort_b = paired_median_ms(lambda: model(xb), lambda: s_bare.run(xb), reps)
        print(f"{'bare':<10} {b:>5} {eager_b:>10.2f} {ort_b:>10.2f} {ort_b / eager_b:>7.3f}")
        for what, e, o in (("guarded", eager, ort), ("bare", eager_b, ort_b)):
            rows[what][str(b)] = {
                "eager_ms": round(e, 3),
                "onnxruntime_ms": round(o, 3),
                "ratio_onnxruntime_over_eager": round(o / e, 3),
                "reps": reps,
            }
    write_results(
        args.out,
        {
            "model": "guard.wrap(guard.demo_model('mnist')) with its default detectors; 'bare': the demo model alone",
            "fit_images": len(train),
            "calibration_images": 1000,
            "fpr": 0.05,
            "threads": 1,
            "onnxruntime_intra_op_threads": 1,
            "batches": args.batches,
            "timing": "median ms over interleaved calls (one warm-up of each)",
            "ratio_note": "onnxruntime ms over eager ms (< 1: onnxruntime is faster)",
            "by_batch": rows,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
