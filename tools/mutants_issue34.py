"""Apply the defects issue 34 names, one at a time, and check that a test fails on each.

Usage (from the repository root; edits the source files in place and restores each one,
so run nothing else from the same checkout meanwhile)::

    OMP_NUM_THREADS=1 .venv/bin/python tools/mutants_issue34.py [--only NAME,...] [--json benchmarks/results/mutants_issue34.json]

Each mutant is one text replacement in one file; the named tests run with ``pytest -x`` and the
mutant counts as caught when they fail. The outcome per mutant goes to the JSON file (with the
commit, machine and command, :func:`guard.core.provenance.write_results`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: name -> (file, text, replacement, tests that must fail)
MUTANTS = {
    "fgsm_steps_against_the_loss": (
        "attacks/gradient.py",
        "x_adv = (x + self.eps * grad.sign()).clamp(0.0, 1.0)",
        "x_adv = (x - self.eps * grad.sign()).clamp(0.0, 1.0)",
        ["tests/test_attacks_gradient.py::test_attack_raises_the_loss_on_every_image"],
    ),
    "pgd_steps_against_the_loss": (
        "attacks/gradient.py",
        "x_adv = (x + self._project(x_adv + self.step_size * self._step(grad) - x)).clamp(0.0, 1.0)",
        "x_adv = (x + self._project(x_adv - self.step_size * self._step(grad) - x)).clamp(0.0, 1.0)",
        ["tests/test_attacks_gradient.py::test_attack_raises_the_loss_on_every_image"],
    ),
    "audit_pgd_early_stopped": (
        "guard/audit/gradient.py",
        '"pgd": LinfPGD(eps=eps, steps=STEPS, random_start=True, early_stop=False, seed=seed)',
        '"pgd": LinfPGD(eps=eps, steps=STEPS, random_start=True, early_stop=True, seed=seed)',
        ["tests/test_audit_strength.py::test_gradient_rows_differ_in_strength"],
    ),
    "confident_pgd_maximises_cross_entropy": (
        "attacks/gradient.py",
        '    if loss == "confidence":\n        k = real_classes',
        '    if loss == "nothing":\n        k = real_classes',
        ["tests/test_attacks_gradient.py::test_confident_pgd_reaches_higher_wrong_class_confidence_than_early_stop"],
    ),
    "audit_evaluation_half_is_calibration_half": (
        "guard/audit/detectors.py",
        "        cal_idx, ev_idx = cal_idx[:256], ev_idx[:256]\n",
        "        cal_idx, ev_idx = cal_idx[:256], ev_idx[:256]\n    ev_idx = cal_idx\n",
        ["tests/test_audit_strength.py::test_detector_step_reports_the_operating_point_on_disjoint_halves"],
    ),
    "evaluate_overlap_unchecked": (
        "guard/evaluation.py",
        "        disjoint = check_disjoint(x_clean, guarded, calibration)",
        "        disjoint = None",
        ["tests/test_wrap.py::test_evaluate_refuses_calibration_images"],
    ),
    "knn_score_sign_flipped": (
        "detectors/knn.py",
        "    return below + (d - top[c]).clamp_min(0.0) / spread[c]",
        "    return -(below + (d - top[c]).clamp_min(0.0) / spread[c])",
        ["tests/test_wrap.py::test_each_detector_scores_planted_outliers_higher"],
    ),
    "clopper_pearson_wrong_shape": (
        "guard/core/intervals.py",
        "float(beta.ppf(a / 2, k, n - k + 1))",
        "float(beta.ppf(a / 2, k, n - k))",
        ["tests/test_wrap.py::test_clopper_pearson_matches_scipy_binomtest"],
    ),
}


def run(name: str) -> dict:
    path, old, new, tests = MUTANTS[name]
    file = ROOT / path
    text = file.read_text()
    if text.count(old) != 1:
        return {"mutant": name, "file": path, "applied": False, "note": f"text found {text.count(old)} times"}
    t0 = time.perf_counter()
    try:
        file.write_text(text.replace(old, new))
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    finally:
        file.write_text(text)
    tail = [
        line
        for line in proc.stdout.splitlines()
        if line.startswith(("FAILED", "ERROR")) or " passed" in line or " failed" in line
    ]
    return {
        "mutant": name,
        "file": path,
        "applied": True,
        "tests": tests,
        "caught": proc.returncode != 0,
        "pytest_exit_code": proc.returncode,
        "summary": tail[-3:],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma list of mutant names (default: all)")
    ap.add_argument("--json", default="benchmarks/results/mutants_issue34.json")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n] or list(MUTANTS)
    unknown = [n for n in names if n not in MUTANTS]
    if unknown:
        ap.error(f"unknown mutants {unknown}; expected some of {list(MUTANTS)}")
    out = []
    for name in names:
        r = run(name)
        print(
            f"{name}: {'caught' if r.get('caught') else 'NOT caught' if r.get('applied') else 'not applied'} {r.get('summary', r.get('note'))}",
            flush=True,
        )
        out.append(r)
    from guard.core.provenance import write_results

    write_results(ROOT / args.json, {"mutants": out, "all_caught": all(r.get("caught") for r in out)})
    return 0 if all(r.get("caught") for r in out) else 1


if __name__ == "__main__":
    raise SystemExit(main())
