"""Guarded vs bare ResNet-50, per batch of 64 images at 224 x 224, in one process (ratios of the same run).

Model: torchvision ResNet-50 with random weights (1,000 classes; no pretrained weights can be
downloaded here, and time does not depend on the weights). Feature detectors: kNN rank and kNN
consistency on the last two default layers, PPCA on the head input (``guard.wrap``'s defaults
for them), fitted with ``fit_features`` on a bank of ``--bank`` (100k) rows: the pooled
features of ``--base`` noise images through the model, expanded by convex mixtures of two rows
plus Gaussian noise (0.05 x the per-unit std), with random labels of the 1,000 classes. The
same mixture of the same images makes every layer's row (a bank row is one image seen at each
layer), so where two layers' pooled features are equal (ResNet's pooled ``layer4`` is its
``fc`` input) their banks are equal and the detectors share one (``bank_index.shared_index``).
The bank is searched at serving time (a) with IVF-Flat (the index the fit builds here: forced
with ``index="ivf_flat"`` so that the fit's leave-one-out search is not an exact 100k x 100k one)
and (b) exactly (``faiss.knn`` over the same banks, swapped in after the fit).
Timed: the bare model (``model(x)`` under no_grad), the guarded model's ``forward`` with the
feature detectors (and with each detector searching the bank for itself, the search memo off),
and with saliency added (the gradient from the guarded model's own forward pass, and, for
comparison, from Captum's Saliency with its own forward pass); with
``--onnx DIR``, the same guarded model exported by ``guard.to_onnx`` (parity checked) and
served by onnxruntime on the CPU, one thread, next to eager. Peak RSS is printed after each part.
The ratio is guarded s / bare s (the median of the per-pair ratios). Writes
benchmarks/results/guarded_vs_bare_resnet50.json:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.peers.guarded_vs_bare_resnet50 [--bank 100000] [--reps 3] [--onnx DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from benchmarks.fixtures.proc_memory import peak_rss_mb, rss_mb  # noqa: E402
from benchmarks.fixtures.timing import out_option, pin_threads  # noqa: E402
from guard.core.provenance import write_results  # noqa: E402


def mixtures(f: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    std = f.std(0)
    a = torch.rand(n, 1, generator=g)
    i = torch.randint(0, f.shape[0], (n,), generator=g)
    j = torch.randint(0, f.shape[0], (n,), generator=g)
    return (a * f[i] + (1 - a) * f[j] + 0.05 * std * torch.randn(n, f.shape[1], generator=g)).clamp_min(0)


def paired(bare, fn, batches: list[torch.Tensor], reps: int) -> tuple[float, float, float]:
    """(median bare s, median ``fn`` s, median of the per-pair ratios): calls interleaved, so that
    both see the same machine load, and each pair on the next of ``batches`` (a served model sees
    new images each call: no search is answered from the previous call's)."""
    fn(batches[-1])  # warm-up, on a batch the pairs never use
    tb, tf, ratios = [], [], []
    for r in range(reps):
        x = batches[r % (len(batches) - 1)]
        order = (bare, fn) if r % 2 == 0 else (fn, bare)
        took = {}
        for f in order:
            t = time.perf_counter()
            f(x)
            took[f] = time.perf_counter() - t
        tb.append(took[bare])
        tf.append(took[fn])
        ratios.append(took[fn] / took[bare])
    return statistics.median(tb), statistics.median(tf), statistics.median(ratios)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bank", type=int, default=100_000)
    ap.add_argument("--base", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--onnx", default=None, help="export the guarded model into this folder and time onnxruntime")
    ap.add_argument(
        "--only-onnx", action="store_true", help="time only onnxruntime against the bare model (with --onnx)"
    )
    out_option(ap, "guarded_vs_bare_resnet50")
    args = ap.parse_args()
    from torchvision.models import resnet50

    import guard
    from guard.core.features import default_feature_layers, extract_features
    from guard.detectors import KNNConsistency, KNNRank, PPCAManifold, SaliencyConcentration, bank_index
    from guard.detectors.bank_index import shared_index

    pin_threads(1)
    torch.manual_seed(0)
    model = resnet50().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, 224, 224, generator=g)
    batches = [x] + [torch.rand(args.batch, 3, 224, 224, generator=g) for _ in range(3)]  # the last: warm-ups only
    layers = default_feature_layers(model, x[:2])
    t0 = time.perf_counter()
    base = torch.rand(args.base, 3, 224, 224, generator=g)
    _, feats = extract_features(model, base, layers[-2:], pool="auto")
    n = args.bank
    equal = [torch.equal(a, b) for a, b in zip(list(feats.values()), list(feats.values())[1:])]
    bank: dict[str, torch.Tensor] = {}
    for layer, f in feats.items():  # equal features: the same rows (one tensor; the detectors pool them anyway)
        same = next((bank[o] for o, g in feats.items() if o in bank and torch.equal(g, f)), None)
        bank[layer] = same if same is not None else mixtures(f, n, seed=0)
    labels = torch.randint(0, 1000, (n,), generator=g)
    print(
        f"ResNet-50 (random weights), batch {args.batch} x 3 x 224 x 224, 1 thread; layers {layers}; "
        f"bank {n:,} rows of widths {[f.shape[1] for f in bank.values()]} (made in {time.perf_counter() - t0:.0f} s); "
        f"the two kNN layers' pooled features equal: {equal}; RSS {rss_mb():.0f} MB",
        flush=True,
    )
    t0 = time.perf_counter()
    dets = {
        "knn": KNNRank(layers[-2:], index="ivf_flat"),
        "knn_consistency": KNNConsistency(layers[-2:], index="ivf_flat"),
        "ppca": PPCAManifold(layers[-1]),
    }
    for det in dets.values():
        det.fit_features(bank, labels)
    del bank
    held = {
        id(t): t.numel() * 4
        for t in [p.bank_ for p in dets["knn"].parts] + list(dets["knn_consistency"].banks_.values())
    }
    print(
        f"detectors fitted in {time.perf_counter() - t0:.0f} s; {len(held)} distinct bank tensor(s) held by the two kNN "
        f"detectors ({sum(held.values()) / 2**20:.0f} MB); RSS {rss_mb():.0f} MB, peak {peak_rss_mb():.0f} MB",
        flush=True,
    )
    feat = guard.GuardedModel(model, dets, layers=layers)
    sal = guard.GuardedModel(model, {**dets, "saliency": SaliencyConcentration().fit(model, x[:2])}, layers=layers)
    for gm in (feat, sal):  # serving needs a calibrated flag: calibrate on the batch's own scores (timing only)
        _, scores, _ = gm.score(x[:16])
        gm.calibrate_scores(scores, 0.05)

    def bare(xb):
        with torch.no_grad():
            model(xb)

    params = {
        "model": "torchvision resnet50 (random weights, 1,000 classes)",
        "batch": args.batch,
        "image_px": 224,
        "bank_rows": n,
        "base_images": args.base,
        "reps": args.reps,
        "threads": 1,
        "layers": layers,
        "knn_layers_equal": equal,
        "onnx": bool(args.onnx),
        "only_onnx": args.only_onnx,
        "timing": "medians over interleaved pairs (bare, guarded), each pair on a new batch",
        "ratio_note": "guarded seconds over bare seconds (the median of the per-pair ratios)",
    }
    if args.only_onnx:
        rows = onnx_rows(feat, bare, batches, Path(args.onnx), args.reps)
        report(rows, params, args.out)
        return
    rows = [("guarded: knn + knn_consistency + ppca (IVF-Flat)", paired(bare, feat, batches, args.reps))]
    exact = {}
    for name in ("knn", "knn_consistency"):
        det = dets[name]
        parts = det.parts if name == "knn" else None
        if parts is not None:
            exact[name] = [p._index for p in parts]
            for p in parts:  # pooled, as a fit with index="flat" would make them: one exact index per distinct bank
                p._index = shared_index(p.bank_, p.metric, kind="flat")
        else:
            exact[name] = dict(det._indexes)
            det._indexes = {layer: shared_index(b, det.metric, kind="flat") for layer, b in det.banks_.items()}
    del exact  # the IVF indexes (each a copy of its bank)
    rows.append(("guarded: knn + knn_consistency + ppca (exact)", paired(bare, feat, batches, args.reps)))
    memo, bank_index.MEMO_ROWS = bank_index.MEMO_ROWS, 0
    rows.append(("  the same, every detector searching for itself (no memo)", paired(bare, feat, batches, args.reps)))
    bank_index.MEMO_ROWS = memo
    rows.append(("guarded: the same + saliency (one shared forward pass)", paired(bare, sal, batches, args.reps)))
    captum = SaliencyConcentration.needs_input_grad
    SaliencyConcentration.needs_input_grad = False  # the saliency map from Captum: its own forward + backward
    rows.append(("  the same, saliency from Captum (its own forward pass)", paired(bare, sal, batches, args.reps)))
    SaliencyConcentration.needs_input_grad = captum
    print(f"serving timed; peak RSS {peak_rss_mb():.0f} MB", flush=True)
    if args.onnx:
        rows += onnx_rows(feat, bare, batches, Path(args.onnx), args.reps)
    report(rows, params, args.out)


def report(rows: list, params: dict, out: str) -> None:
    """Print the table and write it with the run's parameters to ``out``."""
    print(f"{'(medians over interleaved pairs)':<58} {'bare s':>8} {'this s':>8} {'x bare':>7}")
    for name, (b, w, ratio) in rows:
        print(f"{name:<58} {b:>8.2f} {w:>8.2f} {ratio:>7.2f}")
    print(f"peak RSS {peak_rss_mb():.0f} MB")
    write_results(
        out,
        {
            **params,
            "peak_rss_mb": peak_rss_mb(),
            "rows": [
                {
                    "configuration": name.strip(),
                    "bare_seconds": round(b, 4),
                    "guarded_seconds": round(w, 4),
                    "ratio_guarded_over_bare": round(ratio, 3),
                }
                for name, (b, w, ratio) in rows
            ],
        },
    )
    print(f"wrote {out}")


def onnx_rows(guarded, bare, batches: list[torch.Tensor], folder: Path, reps: int) -> list:
    """Export ``guarded`` (parity on 64 other images), then time onnxruntime (CPU, 1 thread) and eager against the bare model."""
    from guard.export import load_session, to_onnx

    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    par = torch.rand(*batches[0].shape, generator=torch.Generator().manual_seed(1))
    rep = to_onnx(guarded, folder / "guarded_resnet50.onnx", batches[0][:2], parity_inputs=par)
    size = sum(f.stat().st_size for f in folder.iterdir()) / 2**30
    print(
        f"exported in {time.perf_counter() - t0:.0f} s: {size:.2f} GiB, external data {rep.external_data} "
        f"{rep.external_files}, heads {rep.heads.get('exported')}; parity passed {rep.parity['passed']}: "
        + "; ".join(f"{k} {v}" for k, v in rep.parity["outputs"].items() if k in ("logits", "pred", "flags")),
        f"; peak RSS {peak_rss_mb():.0f} MB",
        flush=True,
    )
    sess = load_session(folder / "guarded_resnet50.onnx", "cpu", threads=1)
    sess.run(batches[0][:2])
    return [("onnxruntime CPU: the guarded graph (exact search in the graph)", paired(bare, sess.run, batches, reps))]


if __name__ == "__main__":
    main()
