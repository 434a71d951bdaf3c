"""Streaming harden: peak RSS of ``guard.harden(model, dataset)`` against the tensor path on the same images.

The data set makes each image on the fly (:class:`benchmarks.scale.stream_fit_memory.NoiseImages`: noise seeded by
its index, label ``i % 10``), so nothing but the current batch exists unless a path holds it. The
model is a small random CNN (time and memory do not depend on the weights). One round, one epoch,
fooling-gradient and universal-patch attacks (quick budget), a checkpoint (so the stream's scan
also computes the data digest), 500 held-out images. Each run is its own process (``--one``), so
each peak RSS is that run's alone; ``images MB`` is what the training images take as float32.

Writes benchmarks/results/harden_stream_memory.json:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.scale.harden_stream_memory [--sizes 2000,8000] [--px 64] [--tensor 8000]
"""

from __future__ import annotations

import os
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.fixtures.proc_memory import peak_rss_mb, rss_mb, size_runs  # noqa: E402
from benchmarks.scale.stream_fit_memory import NoiseImages  # noqa: E402
from guard.core.provenance import write_results  # noqa: E402


def one(n: int, px: int, batch: int, tensor: bool) -> dict:
    import guard
    from guard.training import AttackBudget

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()
    data, test = NoiseImages(n, px), NoiseImages(500, px)
    start_rss = rss_mb()
    t0 = time.perf_counter()
    if tensor:
        data, test = guard.load_data(data), guard.load_data(test)
    with tempfile.TemporaryDirectory() as ckpt:
        res = guard.harden(
            model,
            data,
            test=test,
            rounds=1,
            epochs_per_round=1,
            attacks=("fooling_gradient", "universal_patch"),
            budget=AttackBudget.quick(),
            batch_size=batch,
            checkpoint_dir=ckpt,
            progress=False,
        )
    return {
        "n": n,
        "px": px,
        "path": "tensor" if tensor else "stream",
        "wall_s": time.perf_counter() - t0,
        "images_mb": n * 3 * px * px * 4 / 2**20,
        "start_rss_mb": start_rss,
        "peak_rss_mb": peak_rss_mb(),
        "clean_accuracy": res.history[0]["clean_accuracy"],
        "archive": res.archive_size,
    }


def main() -> None:
    args, results = size_runs(__file__, one, sizes="2000,8000", tensor=8000, out="harden_stream_memory")
    print(f"small CNN, {args.px} px RGB, batch {args.batch}, 1 round x 1 epoch, 1 thread")
    print(f"{'N':>7} {'path':<7} {'wall s':>8} {'images MB':>10} {'start RSS MB':>13} {'peak RSS MB':>12}")
    rows = []
    for r in results:
        rows.append(r)
        print(
            f"{r['n']:>7} {r['path']:<7} {r['wall_s']:>8.1f} {r['images_mb']:>10.0f} {r['start_rss_mb']:>13.0f} {r['peak_rss_mb']:>12.0f}",
            flush=True,
        )
    write_results(
        args.out,
        {
            "model": "a small random CNN (2 conv + linear)",
            "px": args.px,
            "batch": args.batch,
            "sizes": args.sizes,
            "tensor": args.tensor,
            "rounds": 1,
            "epochs_per_round": 1,
            "attacks": ["fooling_gradient", "universal_patch"],
            "budget": "quick",
            "test_images": 500,
            "threads": 1,
            "runs": "each size in its own process (peak RSS is that run's alone)",
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
