"""The quick MNIST audit that CI runs, run once here and its detection figures committed: the floor of tests/test_report.py.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.studies.audit_mnist_quick
    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.studies.audit_mnist_quick --threads 2 \\
        --out benchmarks/results/audit-mnist-quick-2threads.json

The same audit as the ``quick_audit`` fixture of tests/test_report.py (the slow test suite's one
end-to-end quick audit): the tiny DemoNet of tests/conftest.py (width 8, hidden 32, trained two
epochs on the first 2,000 embedded MNIST training images, seed 0) audited with
``AuditOptions(quick=True, export=False)`` on the first 512 training and 256 held-out images of
the embedded default. The test reads the figures this script writes and fails when the audit the
suite runs detects less than the committed run did, minus a stated margin (issue 34: "no test
would notice MNIST detection halving"). Writes, through
:func:`guard.core.provenance.write_results`, per detector and attack the AUROC, the TPR at 5%
FPR of the ROC, the operating point of the calibrated flag (``tpr_at_threshold``,
``fpr_at_threshold``) and the counts, plus each attack's success rate and the clean flag rates.

Keep :data:`CONFIG` and :func:`tiny_model` in step with tests/conftest.py; the test compares the
committed ``config`` with its own.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

import guard
from guard.audit import AuditOptions, run_audit
from guard.core.models import DemoNet
from guard.core.provenance import write_results
from guard.training.classifier import train_classifier

RESULTS = Path(__file__).resolve().parents[1] / "results" / "audit-mnist-quick.json"
#: what tests/test_report.py's quick_audit fixture runs (the test checks the committed copy)
CONFIG = {
    "model": "DemoNet(width=8, hidden=32), 2 epochs on embedded MNIST train[:2000], lr 3e-3, seed 0",
    "train": "embedded MNIST train[:512]",
    "test": "embedded MNIST test[:256]",
    "options": "AuditOptions(quick=True, progress=False, export=False)",
}
FIGURES = ("auroc", "tpr_at_5fpr", "tpr_at_1fpr", "tpr_at_threshold", "fpr_at_threshold", "n_pos", "n_neg")


def tiny_model(train: guard.Split) -> DemoNet:
    """tests/conftest.py's ``tiny_model``: the same seed, width, data and schedule."""
    torch.manual_seed(0)
    model = DemoNet(width=8, hidden=32)
    train_classifier(model, train.x[:2000], train.y[:2000], epochs=2, lr=3e-3, seed=0, progress=False)
    return model.eval()


def figures_of(report: dict[str, Any]) -> dict[str, Any]:
    """The detection figures of a report.json (and what they rest on)."""
    det = {d: {a: {k: e.get(k) for k in FIGURES} for a, e in per.items()} for d, per in report["detectors"].items()}
    attacks = {
        a: {"success_rate": e.get("success_rate"), "n": e.get("n")} for a, e in report.get("attacks", {}).items()
    }
    info = report["detectors_info"]
    return {
        "detectors": det,
        "attacks": attacks,
        "clean_flag_rate": info["clean_flag_rate"],
        "clean_accuracy_bare": info["clean_accuracy_bare"],
        "flag_detectors": info["combined"]["detectors"],
        "calibration": info["calibration"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument(
        "--out", default=str(RESULTS), help="results JSON (default benchmarks/results/audit-mnist-quick.json)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    train, test = guard.demo_data()
    model = tiny_model(train)
    with tempfile.TemporaryDirectory(prefix="audit-mnist-quick-") as out:
        report = run_audit(
            model,
            guard.Split(train.x[:512], train.y[:512]),
            guard.Split(test.x[:256], test.y[:256]),
            out,
            model_name="tiny DemoNet",
            data_source="embedded MNIST test split (test)",
            options=AuditOptions(quick=True, progress=False, export=False),
        )
    if report.get("errors"):
        raise SystemExit(f"the audit reported errors: {report['errors']}")
    figures = {
        "what": "the quick MNIST audit of tests/test_report.py's quick_audit fixture: detection figures",
        "config": CONFIG,
        "threads": args.threads,
        **figures_of(report),
    }
    write_results(args.out, figures)
    comb = figures["detectors"]["combined"]
    for a, e in comb.items():
        print(f"combined {a:18s} auroc {e['auroc']}  tpr@thr {e['tpr_at_threshold']}  n_pos {e['n_pos']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
