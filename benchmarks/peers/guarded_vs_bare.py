"""Overhead of GuardedModel over the bare demo model per batch of 256 images.

Fitted on the demo's 8,000 training images, calibrated on 1,000 held-out; timed on batches of
256 held-out images (median of repeats, one thread). Configurations: the feature detectors
only (knn, ppca, knn_consistency: one shared forward pass plus FAISS searches), + squeeze
(two more forward passes... one, the first is shared), + saliency (one backward pass), and all.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.peers.guarded_vs_bare
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

import guard  # noqa: E402


def _median_ms(fn, repeat: int = 7) -> float:
    fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1000 * statistics.median(ts)


def main() -> None:
    torch.set_num_threads(1)
    import faiss

    faiss.omp_set_num_threads(1)
    model = guard.demo_model(progress=False).eval()
    train, test = guard.demo_data()
    x = test.x[1000:1256]
    configs = {
        "features (knn, ppca, knn_consistency)": ["knn", "ppca", "knn_consistency"],
        "features + squeeze": ["knn", "ppca", "knn_consistency", "squeeze"],
        "features + saliency": ["knn", "ppca", "knn_consistency", "saliency"],
        "all (default)": None,
    }
    with torch.no_grad():
        bare = _median_ms(lambda: model(x))
    print(f"batch of 256 on the demo LeNet, 1 thread; bare model {bare:.2f} ms")
    print(f"{'configuration':<40} {'ms/batch':>9} {'x bare':>8}")
    for name, dets in configs.items():
        g = guard.wrap(model, detectors=dets).fit(train)
        g.calibrate(test.x[:1000], fpr=0.05)
        ms = _median_ms(lambda: g(x))
        print(f"{name:<40} {ms:>9.2f} {ms / bare:>8.1f}")


if __name__ == "__main__":
    main()
