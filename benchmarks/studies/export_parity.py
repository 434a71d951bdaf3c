"""Parity of the exported graph on the demo: the GuardedModel (FAISS, float64 PPCA, Captum) vs onnxruntime.

Fits ``guard.wrap(demo_model())`` (default detectors) on the 8,000 training images, calibrates
it on 1,000 held-out images (FPR 0.05, the audit's split), exports it, and compares on the
2,000 held-out images and on FGSM / PGD (eps 0.3) adversarial sets; with ``--hardened`` the
same for a model hardened by ``guard.harden`` (quick budget), detectors refitted on it.

Writes benchmarks/results/export_parity.json:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.studies.export_parity [--hardened] [--n-pgd 500] [--n-clean 2000]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

import guard
from benchmarks.fixtures.timing import out_option, pin_threads
from guard.attacks.gradient import FGSM, LinfPGD
from guard.core.provenance import write_results
from guard.export import build_export_head, compare_with_guarded, load_session, to_onnx


def _guarded(model: torch.nn.Module, train: guard.Split, test: guard.Split) -> guard.GuardedModel:
    g = guard.wrap(model).fit(train)  # the default layers, read from the model itself
    perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(5))
    g.calibrate(test.x[perm[:1000]], fpr=0.05)
    return g


def check(
    name: str, g: guard.GuardedModel, test: guard.Split, attack_model: torch.nn.Module, n_pgd: int, n_clean: int = 2000
) -> dict:
    out = Path(tempfile.mkdtemp()) / f"{name}.onnx"
    t0 = time.perf_counter()
    rep = to_onnx(g, out, test.x[:8], parity_inputs=test.x[1000:1064])
    t_export = time.perf_counter() - t0
    sess = load_session(out, device="cpu", threads=1)
    head, _ = build_export_head(g, test.x[:8])
    xc, yc = test.x[:n_clean], test.y[:n_clean]
    sets = {f"clean_{len(xc)}": xc}
    sets["fgsm_eps0.3"] = FGSM(eps=0.3)(attack_model, xc, yc).x_adv
    sets["pgd_eps0.3"] = LinfPGD(eps=0.3, steps=20, seed=0)(attack_model, test.x[:n_pgd], test.y[:n_pgd]).x_adv
    res = {
        "export_seconds": round(t_export, 2),
        "opset": rep.opset,
        "outputs": rep.output_names,
        "heads": rep.heads,
        "parity_vs_exporthead_batches_1_7_64": {
            k: {m: v[m] for m in ("max_abs", "max_rel", "agreement", "n_diff") if m in v}
            for k, v in rep.parity["outputs"].items()
        },
        "sets": {},
    }
    for sname, xs in sets.items():
        figs = compare_with_guarded(g, sess, xs, head=head)
        res["sets"][sname] = {
            k: {m: v[m] for m in ("max_abs", "max_rel", "agreement", "n_diff", "borderline", "n_out_of_tol") if m in v}
            for k, v in figs.items()
        }
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--hardened", action="store_true", help="also harden the demo model (quick budget, 1 round) and check it"
    )
    ap.add_argument("--n-pgd", type=int, default=500)
    ap.add_argument("--n-clean", type=int, default=2000, help="held-out images compared (and attacked by FGSM)")
    out_option(ap, "export_parity")
    ap.add_argument(
        "--audit-step", action="store_true", help="also time the audit's export step (full mode) on the guarded demo"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    pin_threads(1)
    model = guard.demo_model(progress=False)
    train, test = guard.demo_data()
    g = _guarded(model, train, test)
    results = {
        "n_pgd": args.n_pgd,
        "n_clean": args.n_clean,
        "threads": 1,
        "fit_images": len(train),
        "calibration_images": 1000,
        "guarded": check("guarded", g, test, model, args.n_pgd, args.n_clean),
    }
    if args.audit_step:
        from guard.audit import AttackSet, AuditContext, AuditOptions, step

        ctx = AuditContext(
            model=model,
            model_name="demo",
            train=train,
            test=test,
            data_source="demo",
            out=Path(tempfile.mkdtemp()),
            options=AuditOptions(progress=False),
        )
        attacks = AttackSet(
            {
                "fgsm": FGSM(eps=0.3)(model, test.x[:500], test.y[:500]),
                "pgd": LinfPGD(eps=0.3, steps=20, seed=0)(model, test.x[:500], test.y[:500]),
            }
        )
        t0 = time.perf_counter()
        step("export").run(ctx, guarded=g, attacks=attacks)
        results["audit_step"] = {"seconds": round(time.perf_counter() - t0, 1), "report": ctx.report["export"]}
    if args.hardened:
        from guard.training.harden import harden
        from guard.training.round_attacks import AttackBudget

        t0 = time.perf_counter()
        res = harden(
            model, train, test=test, rounds=1, epochs_per_round=1, budget=AttackBudget.quick(), progress=False, seed=0
        )
        hardened = res.model
        results["harden_seconds"] = round(time.perf_counter() - t0, 1)
        results["hardened"] = check(
            "hardened", _guarded(hardened, train, test), test, hardened, args.n_pgd, args.n_clean
        )
    results = json.loads(json.dumps(results, default=str))  # report entries that are not JSON types as their str
    print(json.dumps(results, indent=1))
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
