"""The sanity sweep of CPR on the PGD-trained MNIST model: the attack that knows the check must reach 0 at a large eps.

AutoAttack's and Carlini et al.'s check (:func:`guard.robust_sweep`), run on
:class:`guard.training.ConsistentRejection` over the 20-epoch PGD model of
``benchmarks.studies.robust_hardening --part mnist`` (its checkpoint, resumed), at the radius that
run chose (0.15): ``guard-apgd-consistent`` alone, and guard's APGD-CE alone (which knows nothing
of the check) beside it, on the first ``--n`` held-out images, and the plain model's own sweep.
Writes ``benchmarks/results/robust_cpr_sweep_mnist.json``:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.studies.robust_cpr_sweep --n 40
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import guard
from guard.core.provenance import provenance, write_results
from guard.demo import shift_augment
from guard.robust import RealClassView, robust_sweep
from guard.training import ConsistentRejection, HardenConfig, harden

RESULTS = Path("benchmarks/results")
KEYS = ("eps", "clean_accuracy", "robust_accuracy", "robust_accuracy_with_rejection", "checks", "warnings")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--radius", type=float, default=0.15, help="the radius robust_hardening --cpr chose")
    p.add_argument("--eps", type=float, nargs="+", default=[0.3, 0.45, 0.6, 0.8])
    p.add_argument("--out", default=str(RESULTS / "robust_cpr_sweep_mnist.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    train, test = guard.demo_data()
    cfg = HardenConfig.online(
        "pgd",
        eps=0.3,
        epochs=20,
        attack_steps=10,
        lr=0.02,
        batch_size=64,
        eps_warmup_epochs=20 / 3,
        monitor_images=200,
        seed=0,
    )
    res = harden(
        guard.demo_model(progress=False),
        train,
        test=test,
        config=cfg,
        augment=shift_augment,
        checkpoint_dir=RESULTS / "mnist-robust-pgd" / "checkpoints",
        resume=True,
        checkpoint_every=50,
        progress=False,
    )
    base = RealClassView(res.model, res.model.num_classes)
    cpr = ConsistentRejection(base, radius=args.radius, steps=10)
    data = (test.x[: args.n], test.y[: args.n])
    out = {"n": args.n, "radius": args.radius, "budget": "cpu"}
    for key, model, attacks in (
        ("cpr_knowing_attack", cpr, ["guard-apgd-consistent"]),
        ("cpr_oblivious_apgd_ce", cpr, ["guard-apgd-ce"]),
        ("plain", base, ["guard-apgd-ce", "apgd-t"]),
    ):
        sw = robust_sweep(model, data, args.eps, budget="cpu", attacks=attacks)
        out[key] = {"attacks": attacks, **{k: sw[k] for k in KEYS}}
        print(key, sw["robust_accuracy_with_rejection"], flush=True)
    out["provenance"] = provenance()
    write_results(Path(args.out), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
