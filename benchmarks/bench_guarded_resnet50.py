"""Guarded vs bare ResNet-50, per batch of 64 images at 224 x 224, in one process (ratios of the same run).

Model: torchvision ResNet-50 with random weights (1,000 classes; no pretrained weights can be
downloaded here, and time does not depend on the weights). Feature detectors: kNN rank and kNN
consistency on the last two default layers, PPCA on the head input (``guard.wrap``'s defaults
for them), fitted with ``fit_features`` on a bank of ``--bank`` (100k) rows: the pooled
features of ``--base`` noise images through the model, expanded by convex mixtures of two rows
plus Gaussian noise (0.05 x the per-unit std), with random labels of the 1,000 classes.
The bank is searched at serving time (a) with IVF-Flat (the index the fit builds here: forced
with ``index="ivf_flat"`` so that the fit's leave-one-out search is not an exact 100k x 100k one)
and (b) exactly (FAISS flat indexes over the same banks, swapped in after the fit).
Timed: the bare model (``model(x)`` under no_grad), the guarded model's ``forward`` with the
feature detectors, and with saliency (Captum Saliency, one backward pass) added.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_guarded_resnet50.py [--bank 100000] [--reps 2]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def mixtures(f: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    std = f.std(0)
    a = torch.rand(n, 1, generator=g)
    i = torch.randint(0, f.shape[0], (n,), generator=g)
    j = torch.randint(0, f.shape[0], (n,), generator=g)
    return (a * f[i] + (1 - a) * f[j] + 0.05 * std * torch.randn(n, f.shape[1], generator=g)).clamp_min(0)


def timed(fn, reps: int) -> tuple[float, float]:
    """(best wall s, its CPU s) over ``reps`` calls."""
    best = (float("inf"), 0.0)
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - t, time.process_time() - c))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bank", type=int, default=100_000)
    ap.add_argument("--base", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    import faiss
    from torchvision.models import resnet50

    import guard
    from guard.core.features import default_feature_layers, extract_features
    from guard.detectors import KNNConsistency, KNNRank, PPCAManifold, SaliencyConcentration
    from guard.detectors.knn import BankIndex

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    torch.manual_seed(0)
    model = resnet50().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, 224, 224, generator=g)
    layers = default_feature_layers(model, x[:2])
    t0 = time.perf_counter()
    base = torch.rand(args.base, 3, 224, 224, generator=g)
    _, feats = extract_features(model, base, layers[-2:], pool="auto")
    n = args.bank
    bank = {layer: mixtures(f, n, seed=i) for i, (layer, f) in enumerate(feats.items())}
    labels = torch.randint(0, 1000, (n,), generator=g)
    print(f"ResNet-50 (random weights), batch {args.batch} x 3 x 224 x 224, 1 thread; layers {layers}; "
          f"bank {n:,} rows of widths {[f.shape[1] for f in bank.values()]} (made in {time.perf_counter() - t0:.0f} s)", flush=True)
    t0 = time.perf_counter()
    dets = {"knn": KNNRank(layers[-2:], index="ivf_flat"), "knn_consistency": KNNConsistency(layers[-2:], index="ivf_flat"),
            "ppca": PPCAManifold(layers[-1])}
    for det in dets.values():
        det.fit_features(bank, labels)
    print(f"detectors fitted in {time.perf_counter() - t0:.0f} s", flush=True)
    del bank
    feat = guard.GuardedModel(model, dets, layers=layers)
    sal = guard.GuardedModel(model, {**dets, "saliency": SaliencyConcentration().fit(model, x[:2])}, layers=layers)
    for gm in (feat, sal):  # serving needs a calibrated flag: calibrate on the batch's own scores (timing only)
        _, scores, _ = gm.score(x[:16])
        gm.calibrate_scores(scores, 0.05)

    def bare():
        with torch.no_grad():
            model(x)

    rows = [("bare model", timed(bare, args.reps))]
    rows.append(("guarded: knn + knn_consistency + ppca (IVF-Flat)", timed(lambda: feat(x), args.reps)))
    exact = {}
    for name in ("knn", "knn_consistency"):
        det = dets[name]
        parts = det.parts if name == "knn" else None
        if parts is not None:
            exact[name] = [p._index for p in parts]
            for p in parts:
                p._index = BankIndex(p.bank_, p.metric, kind="flat")
        else:
            exact[name] = dict(det._indexes)
            det._indexes = {layer: BankIndex(b, det.metric, kind="flat") for layer, b in det.banks_.items()}
    rows.append(("guarded: knn + knn_consistency + ppca (exact)", timed(lambda: feat(x), args.reps)))
    rows.append(("guarded: the same + saliency (exact)", timed(lambda: sal(x), max(1, args.reps - 1))))
    bare_s = rows[0][1][0]
    print(f"{'':<50} {'wall s':>8} {'CPU s':>8} {'x bare':>7}")
    for name, (w, c) in rows:
        print(f"{name:<50} {w:>8.2f} {c:>8.2f} {w / bare_s:>7.2f}")


if __name__ == "__main__":
    main()
