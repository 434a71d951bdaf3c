"""Streaming fit at growing N: wall / CPU time and peak RSS of ``guard.wrap(resnet18).fit(dataset)``.

The data set makes each image on the fly (uniform noise seeded by its index, labels ``i % 10``),
so nothing but the current batch exists; the model is a torchvision ResNet-18 with random
weights (10 classes; time and memory do not depend on the weights). Detectors: the feature
detectors kNN rank, kNN consistency (both on the last two default layers) and PPCA (head
input). Each N runs in its own process (``--one``), so each peak RSS is that fit's alone.
Reported: the streaming pass (forward + per-batch accumulation), the finish (bank index,
leave-one-out search, PPCA eigendecompositions), the bytes of the fitted state (the banks), and
peak RSS; with ``--tensor`` also the tensor path (the images materialised first) for contrast.

``--max-per-class C`` caps each kNN bank at C rows per class (a seeded per-class sample of the
stream: ``KNNRank(max_per_class=C)``), so that the state, too, stops growing with N.

Writes benchmarks/results/stream_fit_memory.json:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.scale.stream_fit_memory [--sizes 1000,4000,16000] [--px 64] [--tensor 4000] [--max-per-class 10000]
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from benchmarks.fixtures.proc_memory import peak_rss_mb, rss_mb, size_runs  # noqa: E402
from guard.core.provenance import write_results  # noqa: E402


class NoiseImages(Dataset):
    """``n`` images of ``px`` x ``px`` made on demand (seeded by index); label ``i % 10``."""

    def __init__(self, n: int, px: int) -> None:
        self.n, self.px = n, px

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(int(i))
        return torch.rand(3, self.px, self.px, generator=g), i % 10


def one(n: int, px: int, batch: int, tensor: bool, max_per_class: int = 0) -> dict:
    from torchvision.models import resnet18

    import guard

    torch.set_num_threads(1)
    import faiss

    faiss.omp_set_num_threads(1)
    torch.manual_seed(0)
    model = resnet18(num_classes=10).eval()
    ds = NoiseImages(n, px)
    gm = guard.wrap(model, ["knn", "knn_consistency", "ppca"], batch_size=batch)
    gm._build_defaults(ds[0][0][None])
    if max_per_class:  # the bank cap: a seeded per-class sample of the stream (the detectors' own parameter)
        for name in ("knn", "knn_consistency"):
            gm.detectors[name].max_per_class = max_per_class
    start_rss = rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    if tensor:
        data = guard.load_data(ds)
        t_pass = time.perf_counter() - t0
        gm.fit(data)
        t_finish = float("nan")
    else:
        # the streaming fit, its two phases timed: the pass over the data, then each detector's finish_fit
        timings = {"finish": 0.0}
        for det in gm.detectors.values():

            def fin(f=det.finish_fit):
                t = time.perf_counter()
                out = f()
                timings["finish"] += time.perf_counter() - t
                return out

            det.finish_fit = fin  # an instance attribute: GuardedModel calls it as it would the method
        gm.fit(ds)
        t_finish = timings["finish"]
        t_pass = time.perf_counter() - t0 - t_finish
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    # bytes of distinct storage: the pooled bank of two detectors (or of two equal layers) counts once
    state = sum(
        {
            v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
            for det in gm.detectors.values()
            for v in det.state_tensors().values()
        }.values()
    )
    return {
        "n": n,
        "px": px,
        "path": "tensor" if tensor else "stream",
        "wall_s": wall,
        "cpu_s": cpu,
        "pass_s": t_pass,
        "finish_s": t_finish,
        "state_mb": state / 2**20,
        "start_rss_mb": start_rss,
        "peak_rss_mb": peak_rss_mb(),
        "layers": gm.layers,
        "widths": gm.feature_widths_,
        "max_per_class": max_per_class,
    }


def main() -> None:
    args, results = size_runs(
        __file__, one, sizes="1000,4000,16000", tensor=0, options={"max_per_class": 0}, out="stream_fit_memory"
    )
    cap = f", bank cap {args.max_per_class:,} rows per class" if args.max_per_class else ""
    print(
        f"ResNet-18 (random weights), {args.px} px, batch {args.batch}, detectors knn + knn_consistency + ppca, 1 thread{cap}"
    )
    print(
        f"{'N':>7} {'path':<7} {'wall s':>8} {'CPU s':>8} {'pass s':>8} {'finish s':>9} {'ms/img':>7} {'state MB':>9} {'peak RSS MB':>12} {'RSS-state':>10}"
    )
    rows = []
    for r in results:
        rows.append(r)
        print(
            f"{r['n']:>7} {r['path']:<7} {r['wall_s']:>8.1f} {r['cpu_s']:>8.1f} {r['pass_s']:>8.1f} {r['finish_s']:>9.1f} "
            f"{1000 * r['pass_s'] / r['n']:>7.1f} {r['state_mb']:>9.0f} {r['peak_rss_mb']:>12.0f} {r['peak_rss_mb'] - r['state_mb']:>10.0f}",
            flush=True,
        )
    print(f"layers {r['layers']}, widths {r['widths']}")
    write_results(
        args.out,
        {
            "model": "torchvision resnet18 (random weights, 10 classes)",
            "detectors": ["knn", "knn_consistency", "ppca"],
            "px": args.px,
            "batch": args.batch,
            "sizes": args.sizes,
            "tensor": args.tensor,
            "max_per_class": args.max_per_class,
            "threads": 1,
            "runs": "each size in its own process (peak RSS is that run's alone)",
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
