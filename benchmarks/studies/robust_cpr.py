"""Consistent-prediction rejection (CPR) on the adversarially trained CIFAR-10 ResNet-20, beside the same model without it.

Chen et al., "Stratified adversarial robustness with rejection", ICML 2023
(:class:`guard.training.ConsistentRejection`): reject an input whose label a small attack of
radius r changes. One run, on the same held-out images and under the same attack budget:

1. the plain adversarially trained model (``--plain-dir``, written by ``tools/train_cifar10_robust.py``),
   evaluated by :func:`guard.evaluate_robust`;
2. r chosen as the largest of ``--radii`` that rejects at most ``--rate`` of 1,000 clean images
   held out from training and from the reported images (the reject model's calibration images,
   ``guard.demo_data("cifar10")[0].x[:1000]``);
3. the model with CPR at that r, evaluated with rejection: AutoAttack's components on the
   classifier's logits (as CPR's authors run them), judged on the whole defence, and the attack
   that knows the check (``guard-apgd-consistent``: APGD-T at the check's worst point, Danskin).

Writes ``benchmarks/results/robust_cpr_cifar10.json``:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.studies.robust_cpr --n 200 --budget cpu
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import guard
from benchmarks.studies.robust_hardening import CPR_RADII, RESULTS, _figures, _load
from guard.core.provenance import provenance, write_results
from guard.robust import RealClassView, RobustBudget
from guard.training import ConsistentRejection, choose_radius


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="the first N of the demo's held-out CIFAR-10 images")
    p.add_argument("--budget", choices=["standard", "cpu", "quick"], default="cpu")
    p.add_argument("--plain-dir", default="benchmarks/results/cifar10-robust-pgd-ft")
    p.add_argument("--rate", type=float, default=0.05, help="the share of clean held-out images CPR may reject")
    p.add_argument("--radii", type=float, nargs="+", default=None, help="radii tried, in units of 1/255")
    p.add_argument("--steps", type=int, default=10, help="PGD steps of the consistency check (CPR: 10)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "robust_cpr_cifar10.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    budget = RobustBudget.resolve(args.budget)
    train, test = guard.demo_data("cifar10")
    x, y = test.x[: args.n], test.y[: args.n]
    plain, record = _load(Path(args.plain_dir), "pgd")
    base = RealClassView(plain, plain.num_classes)
    radii = CPR_RADII["cifar10"] if args.radii is None else tuple(r / 255 for r in args.radii)
    plain_figures = _figures(base, x, y, 8 / 255, budget, "pgd", record)
    chosen = choose_radius(base, train.x[:1000], rate=args.rate, radii=radii, steps=args.steps)
    chosen["images"] = "guard.demo_data('cifar10')[0].x[:1000] (held out from training and from the reported images)"
    print(f"radius choice: {chosen}", flush=True)
    out = {"plain_at": plain_figures, "radius_choice": chosen, "cpr": None}
    if chosen["radius"] is not None:
        defence = ConsistentRejection(base, radius=chosen["radius"], steps=args.steps)
        training = {"base": "the plain_at model (pgd)", "cpr": defence.params(), "radius_choice": chosen}
        out["cpr"] = _figures(defence, x, y, 8 / 255, budget, "cpr", training)
    out["provenance"] = provenance()
    write_results(Path(args.out), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
