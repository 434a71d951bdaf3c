"""FAISS (as used by detectors.KNNRank) vs scikit-learn NearestNeighbors for the kNN score.

Banks of 10k and 100k random 256-d rows (L2-normalised, as KNNRank's cosine default), 1k
queries, k = 10; one thread for everyone (OMP_NUM_THREADS=1, faiss.omp_set_num_threads(1),
n_jobs=1). Prints queries per second and the ratio FAISS / scikit-learn (queries/s over queries/s
of scikit-learn's brute force and of each tree), and checks that the mean kNN distances agree.
Writes benchmarks/results/knn_faiss_vs_sklearn.json:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.peers.knn_faiss_vs_sklearn [--quick] [--banks 10000,100000]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.neighbors import NearestNeighbors  # noqa: E402

from benchmarks.fixtures.timing import out_option, pin_threads  # noqa: E402
from guard.core.provenance import write_results  # noqa: E402
from guard.detectors.knn import build_index, knn_search  # noqa: E402


def _time(fn, repeat: int = 1) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="10k bank only, no tree on 100k")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument(
        "--banks",
        default="10000,100000",
        help="bank sizes, comma-separated (--quick: the first only, no trees above 10k)",
    )
    ap.add_argument("--queries", type=int, default=1000)
    out_option(ap, "knn_faiss_vs_sklearn")
    args = ap.parse_args()
    pin_threads(1)
    rng = np.random.default_rng(0)
    d, nq, k = 256, args.queries, args.k
    banks = [int(b) for b in args.banks.split(",")]
    figures: dict[str, object] = {
        "dim": d,
        "queries": nq,
        "k": k,
        "threads": 1,
        "metric": "cosine (unit rows)",
        "bank_rows": "standard normal, L2-normalised; queries: bank rows + 0.05 noise",
        "quick": args.quick,
        "banks": {},
    }
    print(f"kNN score, d={d}, {nq} queries, k={k}, 1 thread; q/s (higher is better)")
    print(f"{'bank':>7} {'method':<30} {'build s':>8} {'query s':>8} {'q/s':>10} {'FAISS x':>8}")
    for m in banks[:1] if args.quick else banks:
        bank = rng.standard_normal((m, d)).astype(np.float32)
        bank /= np.linalg.norm(bank, axis=1, keepdims=True)
        # queries near bank points (realistic: clean inputs close to the training manifold)
        q = bank[rng.choice(m, nq, replace=False)] + 0.05 * rng.standard_normal((nq, d)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        bank_t, q_t = torch.from_numpy(bank), torch.from_numpy(q)
        rows = []
        tb, index = _time(lambda: build_index(bank_t, "cosine"))
        tq, (dist_f, _) = _time(lambda: knn_search(index, q_t, k, "cosine"), repeat=3)
        rows.append(("FAISS IndexFlatIP (exact)", tb, tq))
        ref = dist_f.mean(1).numpy()
        tb, ivf = _time(lambda: build_index(bank_t, "cosine", ivf_min_bank=1, nprobe=16))
        tq, (dist_i, _) = _time(lambda: knn_search(ivf, q_t, k, "cosine"), repeat=3)
        rows.append((f"FAISS IVF{ivf.nlist} nprobe16", tb, tq))
        ivf_err = float(np.abs(dist_i.mean(1).numpy() - ref).max())
        for algo in ("brute", "ball_tree", "kd_tree"):
            if algo != "brute" and m > 10_000 and args.quick:
                continue
            nn_ = NearestNeighbors(n_neighbors=k, algorithm=algo, n_jobs=1)
            tb, _ = _time(lambda: nn_.fit(bank))
            # trees are ~100x slower in 256-d: time 100 queries on the 100k bank and scale to 1k
            nsub = nq if (algo == "brute" or m <= 10_000) else 100
            tq, (dist_s, _) = _time(lambda: nn_.kneighbors(q[:nsub]), repeat=1 if algo != "brute" else 3)
            tq *= nq / nsub
            # euclidean on unit vectors -> cosine distance = d^2 / 2
            err = float(np.abs((dist_s**2 / 2).mean(1) - ref[:nsub]).max())
            if err > 1e-3:
                raise SystemExit(f"sklearn {algo} disagrees with FAISS by {err}")
            rows.append((f"sklearn {algo}" + (" (100 q, scaled)" if nsub < nq else ""), tb, tq))
        faiss_q = nq / rows[0][2]
        for name, tb, tq in rows:
            print(f"{m:>7} {name:<30} {tb:>8.3f} {tq:>8.3f} {nq / tq:>10.0f} {faiss_q / (nq / tq):>8.2f}")
        print(f"        (IVF: max |mean-distance error| vs exact = {ivf_err:.2e})")
        methods = {
            name: {
                "build_seconds": round(tb, 4),
                "query_seconds": round(tq, 4),
                "queries_per_second": round(nq / tq, 1),
                "ratio_faiss_exact_over_this": round(faiss_q / (nq / tq), 3),
            }
            for name, tb, tq in rows
        }
        brute = methods["sklearn brute"]["queries_per_second"]
        figures["banks"][str(m)] = {  # type: ignore[index]
            "methods": methods,
            "ivf_max_mean_distance_error": ivf_err,
            "ratio_faiss_exact_over_sklearn_brute": round(faiss_q / brute, 3),
            "ratio_note": "queries/s of FAISS exact over queries/s of scikit-learn brute force (> 1: FAISS faster)",
        }
    write_results(args.out, figures)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
