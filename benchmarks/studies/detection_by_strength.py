"""The detection table of an audit, by attack strength: operating point (with intervals) first, then AUROC.

Usage: .venv/bin/python -m benchmarks.studies.detection_by_strength AUDIT_OUT [--json benchmarks/results/detection_by_strength_mnist_quick.json]

Reads AUDIT_OUT/report.json (written by ``guard audit``), prints one line per attack (its strength,
whether it is a held-out peer attack, its success rate) and detector (the realised TPR at the
calibrated threshold with its 95% Clopper-Pearson interval and n, the AUROC), after each
detector's realised clean FPR; and writes the same figures with the audit's command, the commit
and the machine (:func:`guard.core.provenance.write_results`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DETECTORS = ("combined", "knn", "ppca", "saliency", "knn_consistency", "squeeze", "mahalanobis", "lid")


def table(report: dict) -> dict:
    attacks = report.get("attacks", {})
    dets = report.get("detectors", {})
    info = report.get("detectors_info", {})
    out = {
        "clean_fpr": (info.get("operating_point") or {}).get("clean_fpr"),
        "target_fpr": (info.get("calibration") or {}).get("target_fpr"),
        "n_calibration": (info.get("calibration") or {}).get("n_calibration"),
        "rows": [],
    }
    for name, e in attacks.items():
        if not isinstance(e, dict) or "strength" not in e:
            continue
        row = {
            "attack": name,
            "strength": e["strength"],
            "held_out": bool(e.get("held_out")),
            "success_rate": e.get("success_rate"),
            "n": e.get("n"),
            "wrong_confidence_median": e.get("wrong_confidence_median"),
            "detectors": {},
        }
        for d in DETECTORS:
            m = (dets.get(d) or {}).get(name)
            if isinstance(m, dict):
                op = m.get("operating_point") or {}
                row["detectors"][d] = {
                    "tpr": op.get("tpr"),
                    "auroc": m.get("auroc"),
                    "tpr_at_1fpr": m.get("tpr_at_1fpr"),
                }
        out["rows"].append(row)
    adaptive = report.get("adaptive") or {}
    if adaptive.get("n") is not None:  # the attacker who knows the detectors, beside the table
        out["adaptive"] = {k: adaptive.get(k) for k in ("n", "eps", "evasion", "misclassified")}
    return out


def _fmt(r: dict | None) -> str:
    if not r:
        return "n/a"
    lo, hi = r["ci95"]
    return f"{100 * r['rate']:.1f}% [{100 * lo:.1f}-{100 * hi:.1f}] n={r['n']}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("audit")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--audit-command", default=None, help="the guard audit command that wrote AUDIT_OUT (recorded in the JSON)"
    )
    args = ap.parse_args()
    report = json.loads((Path(args.audit) / "report.json").read_text())
    t = table(report)
    print(f"target FPR {t['target_fpr']}, calibrated on {t['n_calibration']} clean images")
    for d, r in (t["clean_fpr"] or {}).items():
        print(f"  clean FPR {d:16s} {_fmt(r)}")
    for row in t["rows"]:
        print(
            f"{row['attack']} ({row['strength']}{', held out' if row['held_out'] else ''}): success {row['success_rate']:.3f} of {row['n']}, "
            f"median wrong-class confidence {row['wrong_confidence_median']}"
        )
        for d, m in row["detectors"].items():
            print(f"  {d:16s} TPR {_fmt(m['tpr'])}  AUROC {m['auroc'] if m['auroc'] is None else round(m['auroc'], 3)}")
    if args.json:
        from guard.core.provenance import write_results

        opts = report.get("options", {})
        write_results(
            args.json,
            {
                "audit_command": args.audit_command,
                "audit_options": opts,
                "audit_timings": report.get("timings"),
                "audit_errors": report.get("errors"),
                **t,
            },
        )


if __name__ == "__main__":
    main()
