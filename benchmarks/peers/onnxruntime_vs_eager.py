"""onnxruntime (CPU) vs PyTorch eager for the guarded demo model, batch 1 and 256, threads pinned.

The guarded model is ``guard.wrap(demo_model())`` with its default detectors (saliency, kNN
rank over conv2+fc1, PPCA, kNN consistency; combined flag), fitted on the 8,000 training images
and calibrated on 1,000 held-out ones. Eager = ``GuardedModel.forward`` (one forward pass with
hooks, FAISS flat search, float64 PPCA, one Captum backward pass for saliency). onnxruntime =
the exported graph (the same outputs: logits, scores, flags). Both run on one thread
(``torch.set_num_threads(1)``, ``intra_op_num_threads=1``). Also the bare model both ways.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.peers.onnxruntime_vs_eager [--reps 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import guard  # noqa: E402
from guard.export import load_session, to_onnx  # noqa: E402


def paired_median_ms(fa, fb, reps: int) -> tuple[float, float]:
    """Median ms of fa and fb, calls interleaved so that both see the same machine load."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(reps):
        t = time.perf_counter()
        fa()
        ta.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        fb()
        tb.append((time.perf_counter() - t) * 1000)
    return statistics.median(ta), statistics.median(tb)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
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
    for b in (1, 256):
        xb = test.x[:b].contiguous()
        reps = args.reps if b == 1 else max(5, args.reps // 2)
        eager, ort = paired_median_ms(lambda: g(xb), lambda: s_guard.run(xb), reps)
        print(f"{'guarded':<10} {b:>5} {eager:>10.2f} {ort:>10.2f} {ort / eager:>7.3f}")
        with torch.no_grad():
            eager_b, ort_b = paired_median_ms(lambda: model(xb), lambda: s_bare.run(xb), reps)
        print(f"{'bare':<10} {b:>5} {eager_b:>10.2f} {ort_b:>10.2f} {ort_b / eager_b:>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
