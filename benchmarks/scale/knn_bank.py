"""The kNN bank at scale: recall@10 of FAISS IVF-Flat / IVF-PQ against exact search, and speed.

Part 1, real features: the bank and the queries are pooled features of real CIFAR-10 test
images (the embedded 10,000: 8,000 in the bank, 2,000 as queries) from (a) the shipped CIFAR-10
ResNet-20 (``guard.demo_model("cifar10")``, its default feature layers) and (b) a torchvision
ResNet-18 with random weights (no pretrained weights can be downloaded here), 512-d head input,
images at 32 px. Each index is the detectors' own :class:`guard.detectors.knn.BankIndex`
(cosine: unit rows, inner product), forced approximate (``ivf_min_bank=0``).

Part 2, a bank of ``--n`` (1M) x 512 "real-shaped" rows: convex mixtures ``a f_i + (1 - a) f_j``
(a ~ U(0, 1)) of a random ResNet-18 feature of part 1's 8,000 bank images and one of its 10
nearest neighbours there (as SMOTE oversamples), plus Gaussian noise of 0.05 x the features'
per-unit std; queries are made the same way from the 2,000 held-out images' features. Build time, queries/s, recall@10 vs FAISS exact (IndexFlatIP), and RSS growth for:
FAISS exact, FAISS IVF-PQ (BankIndex, several nprobe), FAISS IVF-Flat, scikit-learn
``NearestNeighbors(algorithm="brute", metric="cosine")``. One thread for everyone.

The ratio is each method's queries/s over scikit-learn brute force's. Writes benchmarks/results/knn_bank.json:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.scale.knn_bank [--n 1000000] [--queries 500] [--nlists default,4000] [--nprobes 8,16,32] [--no-pq]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.fixtures.proc_memory import peak_rss_mb, rss_mb  # noqa: E402
from benchmarks.fixtures.timing import out_option, pin_threads  # noqa: E402
from guard.core.provenance import write_results  # noqa: E402
from guard.detectors.knn import BankIndex, ivf_nlist  # noqa: E402


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean share of the true k neighbours among the k found."""
    hits = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, truth)]
    return float(np.mean(hits)) / truth.shape[1]


def real_features() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (bank rows, query rows)} of real CIFAR-10 images (train 8,000 / test 2,000 of the embedded split)."""
    from torchvision.models import resnet18

    import guard
    from guard.core.features import default_feature_layers, extract_features

    train, test = guard.demo_data("cifar10")
    out = {}
    model = guard.demo_model("cifar10")
    layers = default_feature_layers(model, train.x[:2])
    for split_name, split in (("bank", train), ("query", test)):
        _, feats = extract_features(model, split.x, layers, pool="auto")
        for layer in layers[-2:]:
            out.setdefault(f"cifar10-resnet20 {layer} ({feats[layer].shape[1]}-d)", {})[split_name] = feats[layer]
    torch.manual_seed(0)
    r18 = resnet18(num_classes=10).eval()
    for split_name, split in (("bank", train), ("query", test)):
        _, feats = extract_features(r18, split.x, ["fc:input"], pool="auto")
        out.setdefault("resnet18-random fc:input (512-d)", {})[split_name] = feats["fc:input"]
    return {k: (v["bank"], v["query"]) for k, v in out.items()}


def part1(feats: dict[str, tuple[torch.Tensor, torch.Tensor]], k: int) -> list[dict]:
    rows = []
    print(f"\nPart 1: recall@{k} vs exact on real features (bank 8,000, 2,000 queries), cosine")
    print(f"{'features':<44} {'index':<12} {'nlist':>6} {'nprobe':>6} {'recall':>7}")
    for name, (bank, query) in feats.items():
        b, q = F.normalize(bank.float(), dim=1).contiguous(), F.normalize(query.float(), dim=1).contiguous()
        _, truth = BankIndex(b, "cosine", kind="flat").search(q, k)
        for kind in ("ivf_flat", "ivf_pq"):
            idx = BankIndex(b, "cosine", kind=kind, ivf_min_bank=0)
            for nprobe in (4, 8, 16, 32):
                for rerank in (1, 4, 10) if kind == "ivf_pq" else (1,):
                    idx.index.nprobe, idx.rerank = nprobe, rerank
                    label = kind if kind == "ivf_flat" else f"ivf_pq rr{rerank}"
                    rec = recall(idx.search(q, k)[1], truth)
                    rows.append(
                        {
                            "features": name,
                            "index": label,
                            "nlist": ivf_nlist(b.shape[0]),
                            "nprobe": nprobe,
                            "recall": rec,
                        }
                    )
                    print(f"{name:<44} {label:<12} {ivf_nlist(b.shape[0]):>6} {nprobe:>6} {rec:>7.3f}", flush=True)
    return rows


def mixtures(f: torch.Tensor, n: int, std: torch.Tensor, seed: int) -> torch.Tensor:
    """``n`` unit rows ``a f_i + (1 - a) f_j + noise``: f_j one of f_i's 10 nearest rows (cosine), a ~ U(0, 1).

    Interpolating between real neighbours (as SMOTE oversamples) keeps the rows on the real
    features' manifold; mixing random pairs would fill their convex hull instead.
    """
    g = torch.Generator().manual_seed(seed)
    fn = F.normalize(f, dim=1)
    nn10 = torch.cat(
        [torch.topk(fn[i : i + 1000] @ fn.t(), 11, dim=1).indices[:, 1:] for i in range(0, f.shape[0], 1000)]
    )
    out = torch.empty(n, f.shape[1])
    for i in range(0, n, 100_000):
        m = min(100_000, n - i)
        a = torch.rand(m, 1, generator=g)
        ii = torch.randint(0, f.shape[0], (m,), generator=g)
        jj = nn10[ii, torch.randint(0, 10, (m,), generator=g)]
        out[i : i + m] = a * f[ii] + (1 - a) * f[jj] + 0.05 * std * torch.randn(m, f.shape[1], generator=g)
    return F.normalize(out, dim=1)


def part2(
    feats: dict[str, tuple[torch.Tensor, torch.Tensor]],
    n: int,
    nq: int,
    k: int,
    nlists: list[int | None],
    nprobes: list[int],
    pq: bool,
) -> list[dict]:
    bank_f, query_f = feats["resnet18-random fc:input (512-d)"]
    std = bank_f.std(0)
    base = rss_mb()
    bank = mixtures(bank_f, n, std, seed=1).contiguous()
    queries = mixtures(query_f, nq, std, seed=2).contiguous()
    print(
        f"\nPart 2: bank {n:,} x {bank.shape[1]} (mixtures of real-image ResNet-18 features + noise; {bank.numel() * 4 / 2**20:,.0f} MB), "
        f"{nq} queries, k={k}, 1 thread; RSS after making it {rss_mb() - base:,.0f} MB over the start"
    )
    print(f"{'method':<40} {'build s':>8} {'query s':>8} {'q/s':>9} {'recall':>7} {'RSS+ MB':>8} {'x sklearn':>9}")
    rows = []

    def run(name: str, build, search) -> None:
        r0 = rss_mb()
        t = time.perf_counter()
        index = build()
        tb = time.perf_counter() - t
        t = time.perf_counter()
        idx = search(index)
        tq = time.perf_counter() - t
        rows.append((name, tb, tq, recall(idx, truth) if truth is not None else 1.0, rss_mb() - r0))
        print(f"{name:<40} {tb:>8.1f} {tq:>8.2f} {nq / tq:>9.0f} {rows[-1][3]:>7.3f} {rows[-1][4]:>8.0f}", flush=True)
        del index

    truth = None
    exact = {}

    def exact_search(index):
        d, i = index.search(queries, k)
        exact["i"] = i
        return i

    run("FAISS exact (BankIndex flat)", lambda: BankIndex(bank, "cosine", kind="flat"), exact_search)
    truth = exact["i"]
    rows[-1] = rows[-1][:3] + (1.0, rows[-1][4])

    from sklearn.neighbors import NearestNeighbors

    bank_np = bank.numpy()
    run(
        "sklearn NearestNeighbors brute cosine",
        lambda: NearestNeighbors(n_neighbors=k, algorithm="brute", metric="cosine", n_jobs=1).fit(bank_np),
        lambda nn: torch.from_numpy(nn.kneighbors(queries.numpy(), return_distance=False)),
    )
    runs = ([("ivf_pq", None, [(p, r) for p in (16, 32, 64) for r in (4, 10)])] if pq else []) + [
        ("ivf_flat", nl, [(p, 1) for p in nprobes]) for nl in nlists
    ]
    for kind, nlist, settings in runs:
        r0 = rss_mb()  # built once, searched at several nprobe / re-rank factors
        t = time.perf_counter()
        ivf = BankIndex(bank, "cosine", kind=kind, ivf_min_bank=0, nlist=nlist)
        tb, rb = time.perf_counter() - t, rss_mb() - r0
        what = f"PQ{ivf.index.pq.M}" if kind == "ivf_pq" else "Flat"
        for nprobe, rerank in settings:
            ivf.index.nprobe, ivf.rerank = nprobe, rerank
            t = time.perf_counter()
            _, idx = ivf.search(queries, k)
            tq = time.perf_counter() - t
            rows.append(
                (
                    f"FAISS IVF{ivf.index.nlist}-{what} np{nprobe}" + (f" rr{rerank}" if kind == "ivf_pq" else ""),
                    tb,
                    tq,
                    recall(idx, truth),
                    rb,
                )
            )
            print(f"{rows[-1][0]:<40} {tb:>8.1f} {tq:>8.2f} {nq / tq:>9.0f} {rows[-1][3]:>7.3f} {rb:>8.0f}", flush=True)
        del ivf
    sk = next(r for r in rows if r[0].startswith("sklearn"))
    print(f"\n{'method':<40} {'q/s':>9} {'recall':>7} {'x sklearn brute':>16}")
    for r in rows:
        print(f"{r[0]:<40} {nq / r[2]:>9.0f} {r[3]:>7.3f} {sk[2] / r[2]:>16.1f}")
    print(f"peak RSS of the process: {peak_rss_mb():,.0f} MB")
    return [
        {
            "method": r[0],
            "build_seconds": round(r[1], 3),
            "query_seconds": round(r[2], 4),
            "queries_per_second": round(nq / r[2], 1),
            "recall": r[3],
            "rss_growth_mb": round(r[4], 1),
            "ratio_over_sklearn_brute": round(sk[2] / r[2], 3),
        }
        for r in rows
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--skip-part1", action="store_true")
    ap.add_argument(
        "--nlists", default="default", help="IVF-Flat list counts to build, comma-separated ('default': ivf_nlist(n))"
    )
    ap.add_argument("--nprobes", default="16,32,64", help="IVF-Flat nprobe values to search with, comma-separated")
    ap.add_argument("--no-pq", action="store_true", help="leave IVF-PQ out")
    ap.add_argument(
        "--features-cache", default="", help="a .safetensors file to keep part 1's features in between runs"
    )
    out_option(ap, "knn_bank")
    args = ap.parse_args()
    pin_threads(1)
    t0, c0 = time.perf_counter(), time.process_time()
    if args.features_cache and os.path.exists(args.features_cache):
        from safetensors.torch import load_file

        flat = load_file(args.features_cache)
        feats = {name[:-5]: (flat[name], flat[name[:-5] + "|query"]) for name in flat if name.endswith("|bank")}
    else:
        feats = real_features()
        if args.features_cache:
            from safetensors.torch import save_file

            save_file(
                {
                    f"{k}|{part}": v.contiguous()
                    for k, (b, q) in feats.items()
                    for part, v in (("bank", b), ("query", q))
                },
                args.features_cache,
            )
    print(
        f"features ready after {time.perf_counter() - t0:.0f} s: {[(k, tuple(v[0].shape)) for k, v in feats.items()]}",
        flush=True,
    )
    recall_rows = None if args.skip_part1 else part1(feats, args.k)
    nlists = [None if v == "default" else int(v) for v in args.nlists.split(",")]
    rows = part2(feats, args.n, args.queries, args.k, nlists, [int(v) for v in args.nprobes.split(",")], not args.no_pq)
    print(f"total wall {time.perf_counter() - t0:.0f} s, CPU {time.process_time() - c0:.0f} s")
    write_results(
        args.out,
        {
            "bank_rows": args.n,
            "queries": args.queries,
            "k": args.k,
            "threads": 1,
            "metric": "cosine",
            "nlists": args.nlists,
            "nprobes": args.nprobes,
            "pq": not args.no_pq,
            "part1_real_features": {
                "bank": "CIFAR-10 embedded train 8,000",
                "queries": "embedded test 2,000",
                "rows": recall_rows,
            },
            "part2_bank": "synthetic: mixtures of a random-weight ResNet-18's features of real CIFAR-10 images and a near neighbour, "
            "plus 0.05 x std Gaussian noise (not real features)",
            "part2": rows,
            "ratio_note": "queries/s over scikit-learn brute force's (> 1: faster)",
            "peak_rss_mb": peak_rss_mb(),
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "cpu_seconds": round(time.process_time() - c0, 1),
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
