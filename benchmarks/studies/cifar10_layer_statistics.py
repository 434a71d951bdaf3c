"""Which layer of the CIFAR-10 demo model sees an 8/255 perturbation? (issue 12)

For each of seven layers of ``guard.demo_model("cifar10")`` and three poolings (per-channel
spatial mean, as Lee et al. 2018; per-channel spatial std; a 4x4 / 2x2 average grid), the
closest-class Mahalanobis distance with a tied covariance (Lee et al.'s per-layer score, fitted
on the 8,000 embedded training images), thresholded at the 99th percentile of 1,000 clean
calibration images; TPR on 500 correctly classified evaluation images after random +-8/255
sign noise, Gaussian noise (sigma 8/255), FGSM 8/255 and PGD 4/255 and 8/255 (20 steps), with
the false-positive rate on 1,000 other clean images and the AUROC (scikit-learn).

The scores are :meth:`guard.detectors.MahalanobisDetector.layer_distances`, one column per
layer and pooling (the detector's own score would average them); the mean and grid poolings are
:func:`guard.core.features.pool_features` ``"avg"`` and ``"auto"``. Writes
benchmarks/results/cifar10_layer_statistics.json:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.studies.cifar10_layer_statistics [--eval 500]
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.metrics import roc_auc_score

import guard
from benchmarks.fixtures.timing import out_option, pin_threads
from guard.attacks import FGSM, LinfPGD
from guard.core.features import pool_features
from guard.core.provenance import write_results
from guard.detectors import MahalanobisDetector

LAYERS = ["bn1", "layer1.0", "layer1", "layer2.0", "layer2", "layer3", "layer3.2.bn2"]


POOLS = {
    "mean": lambda t: pool_features(t, "avg"),
    "std": lambda t: t.std((2, 3)),
    "grid": lambda t: pool_features(t, "auto"),
}
KEYS = [f"{n}|{kind}" for n in LAYERS for kind in POOLS]


def pooled(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every layer's map under every pooling, keyed ``layer|pool``, from one forward pass per batch."""
    grab: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(lambda _m, _i, o, n=n: grab.__setitem__(n, o.detach()))
        for n in LAYERS
    ]
    res: dict[str, list[torch.Tensor]] = {}
    try:
        with torch.no_grad():
            for i in range(0, len(x), 250):
                grab.clear()
                model(x[i : i + 250])
                for n in LAYERS:
                    for kind, pool in POOLS.items():
                        res.setdefault(f"{n}|{kind}", []).append(pool(grab[n]))
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", type=int, default=500, help="correctly classified evaluation images attacked")
    ap.add_argument("--fit", type=int, default=0, help="training images the detector is fitted on (0: all 8,000)")
    ap.add_argument("--threads", type=int, default=1)
    out_option(ap, "cifar10_layer_statistics")
    args = ap.parse_args()
    pin_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = guard.demo_model("cifar10").eval()
    train, test = guard.demo_data("cifar10")
    cal_x, ev_x, ev_y = test.x[:1000], test.x[1000:], test.y[1000:]
    fit_x, fit_y = (train.x[: args.fit], train.y[: args.fit]) if args.fit else (train.x, train.y)
    maha = MahalanobisDetector(layers=KEYS).fit_features(pooled(model, fit_x), fit_y)

    def score(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(KEYS, maha.layer_distances(pooled(model, x)).double().unbind(1)))

    s_cal, s_neg = score(cal_x), score(ev_x)
    with torch.no_grad():
        ok = torch.cat([model(ev_x[i : i + 250]).argmax(1) for i in range(0, len(ev_x), 250)]) == ev_y
    x0, y0 = ev_x[ok][: args.eval], ev_y[ok][: args.eval]
    g = torch.Generator().manual_seed(1)
    sets = {
        "sign noise 8/255": (x0 + (torch.randint(0, 2, x0.shape, generator=g) * 2 - 1) * 8 / 255).clamp(0, 1),
        "gaussian noise 8/255": (x0 + torch.randn(x0.shape, generator=g) * 8 / 255).clamp(0, 1),
    }
    success = {}
    for name, attack in (
        ("FGSM 8/255", FGSM(eps=8 / 255)),
        ("PGD 4/255", LinfPGD(eps=4 / 255, steps=20)),
        ("PGD 8/255", LinfPGD(eps=8 / 255, steps=20)),
    ):
        r = attack(model, x0, y0)
        sets[name], success[name] = r.x_adv[r.success], float(r.success.float().mean())
    rows = []
    for name, xs in sets.items():
        sp = score(xs)
        for key in KEYS:
            thr = torch.quantile(s_cal[key], 0.99)
            auc = roc_auc_score([0] * len(s_neg[key]) + [1] * len(sp[key]), torch.cat([s_neg[key], sp[key]]).numpy())
            rows.append(
                {
                    "input": name,
                    "layer": key.split("|")[0],
                    "pool": key.split("|")[1],
                    "n": len(xs),
                    "tpr_at_1pct_fpr": round(float((sp[key] > thr).double().mean()), 3),
                    "fpr": round(float((s_neg[key] > thr).double().mean()), 3),
                    "auroc": round(float(auc), 3),
                }
            )
    write_results(
        args.out,
        {
            "rows": rows,
            "attack_success": success,
            "seconds": round(time.perf_counter() - t0, 1),
            "fit_images": len(fit_x),
            "calibration_images": len(cal_x),
            "negative_images": len(ev_x),
            "attacked_images": len(x0),
            "threads": args.threads,
        },
    )
    best = {}
    for r in rows:
        if r["auroc"] > best.get(r["input"], {"auroc": -1})["auroc"]:
            best[r["input"]] = r
    print("input | best layer (pool) by AUROC | AUROC | TPR at 1% FPR | the best TPR of any layer")
    for name, r in best.items():
        top = max(x["tpr_at_1pct_fpr"] for x in rows if x["input"] == name)
        print(f"{name} | {r['layer']} ({r['pool']}) | {r['auroc']:.3f} | {r['tpr_at_1pct_fpr']:.3f} | {top:.3f}")


if __name__ == "__main__":
    main()
