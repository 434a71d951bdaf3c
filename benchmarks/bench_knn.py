"""FAISS (as used by detectors.KNNRank) vs scikit-learn NearestNeighbors for the kNN score.

Banks of 10k and 100k random 256-d rows (L2-normalised, as KNNRank's cosine default), 1k
queries, k = 10; one thread for everyone (OMP_NUM_THREADS=1, faiss.omp_set_num_threads(1),
n_jobs=1). Prints queries per second and the ratio FAISS / scikit-learn, and checks that the
mean kNN distances agree.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_knn.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.neighbors import NearestNeighbors  # noqa: E402

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
    args = ap.parse_args()
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    d, nq, k = 256, 1000, args.k
    print(f"kNN score, d={d}, {nq} queries, k={k}, 1 thread; q/s (higher is better)")
    print(f"{'bank':>7} {'method':<30} {'build s':>8} {'query s':>8} {'q/s':>10} {'FAISS x':>8}")
    for m in [10_000] if args.quick else [10_000, 100_000]:
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


if __name__ == "__main__":
    main()
