"""Issue 35's before/after audit comparison, written to benchmarks/results/restructure_audit_equal.json.

``python tools/restructure_audit_equal.py --before-code BEFORE_NOCAPS --after-code AFTER_NOCAPS
[--reference REF --reference-rerun REF_RERUN --after-cli AFTER_CLI] [--out FILE]``

* ``controlled``: the quick MNIST demo audit (seed 0, one torch thread, ``OMP_NUM_THREADS=1``),
  run by ``tools/quick_audit_set.py OUT patch_gan_seconds=null universal_seconds=null`` on the code
  before the restructuring and on this branch: every figure and every saved tensor must be equal.
  The two keys turn off the quick audit's wall-clock caps on PatchGAN and UniversalPatch training
  (1.5 s and 1.0 s per area), the one part of the quick audit whose result depends on how busy
  the machine is.
* ``as_run`` (optional): a reference run of ``guard audit --demo --quick --threads 1`` made
  elsewhere on the old code (REF) against this branch's run of the same command (AFTER_CLI), and
  the same reference against a re-run of the same command on the *old* code (REF_RERUN).
  Where the two lists of differing report sections are the same, the differences are the old
  code's own run-to-run variation, not the restructuring's: wall-clock caps (``fit_steps``) and
  scipy's ``pinvh`` in the Mahalanobis detector, whose OpenBLAS threads ``--threads`` does not set.

* ``rerun_from_settings`` (optional): AFTER_CODE's audit against ``guard audit --demo --settings
  AFTER_CODE/report.json`` (RERUN): a report's recorded settings reproduce its figures.

Exit 1 when the controlled comparison (or the re-run from settings) finds a difference.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _compare_module():
    spec = importlib.util.spec_from_file_location("compare_reports", HERE / "compare_reports.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _compare(cmp, a: Path, b: Path) -> dict:
    ra = json.loads((a / "report.json").read_text())
    rb = json.loads((b / "report.json").read_text())
    rdiff, added, n = cmp.compare_reports(ra, rb)
    tdiff, m = cmp.compare_tensors(a, b)
    steps = {
        side: {
            name: [p.get("fit_steps") for p in r.get("attacks", {}).get(name, {}).get("curve", [])]
            for name in ("patch_gan", "universal_patch")
        }
        for side, r in (("before", ra), ("after", rb))
    }
    return {
        "before": str(a),
        "after": str(b),
        "equal": not rdiff and not tdiff,
        "report_figures_compared": n,
        "patch_fit_steps": steps,
        "fitted_detectors_identical": not any(d.startswith("guarded/") for d in tdiff),
        "report_figures_differing": len(rdiff),
        "tensors_compared": m,
        "tensors_differing": len(tdiff),
        "sections_only_after": added,
        "differing_places": _places(rdiff + tdiff),
        "differences_first_20": (rdiff + tdiff)[:20],
    }


def _places(diffs: list[str]) -> list[str]:
    """Where the differences are: report sections to two levels (``detectors.mahalanobis``) and files."""
    out = set()
    for d in diffs:
        m = re.match(r"report\.json ([^.\s]+)(?:\.([^.\s:]+))?", d)
        out.add(".".join(g for g in m.groups() if g) if m else d.split("[")[0].split(":")[0])
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before-code", type=Path, required=True, help="the controlled run of the old code")
    ap.add_argument("--after-code", type=Path, required=True, help="the controlled run of this branch")
    ap.add_argument(
        "--reference", type=Path, default=None, help="guard audit --demo --quick --threads 1, old code, run elsewhere"
    )
    ap.add_argument("--reference-rerun", type=Path, default=None, help="the same command on the old code, run here")
    ap.add_argument("--after-cli", type=Path, default=None, help="the same command on this branch, run here")
    ap.add_argument("--rerun", type=Path, default=None, help="guard audit --demo --settings AFTER_CODE/report.json")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/restructure_audit_equal.json"))
    args = ap.parse_args(argv)
    cmp = _compare_module()
    figures: dict = {
        "controlled": _compare(cmp, args.before_code, args.after_code),
        "ignored_keys": sorted(cmp.IGNORED_KEYS),
        "ignored_paths": sorted(cmp.IGNORED_PATHS),
    }
    if args.reference is not None and args.after_cli is not None and args.reference_rerun is not None:
        branch = _compare(cmp, args.reference, args.after_cli)
        old = _compare(cmp, args.reference, args.reference_rerun)
        figures["as_run_here"] = _compare(cmp, args.reference_rerun, args.after_cli)
        figures["as_run"] = {"reference_vs_branch": branch, "reference_vs_old_code_rerun": old}
    if args.rerun is not None:
        figures["rerun_from_settings"] = _compare(cmp, args.after_code, args.rerun)
    from guard.core.provenance import write_results

    write_results(args.out, figures)
    c = figures["controlled"]
    print(
        f"controlled: {c['report_figures_compared']} figures, {c['report_figures_differing']} differ; "
        f"{c['tensors_compared']} tensors, {c['tensors_differing']} differ"
    )
    if "as_run" in figures:
        a = figures["as_run"]
        h = figures["as_run_here"]
        print(
            f"as run: reference vs branch {a['reference_vs_branch']['report_figures_differing']} figures differ, reference vs "
            f"old code re-run {a['reference_vs_old_code_rerun']['report_figures_differing']}; old code vs branch, both run here: "
            f"{h['report_figures_differing']} (patch fit steps {h['patch_fit_steps']}, fitted detectors identical: "
            f"{h['fitted_detectors_identical']})"
        )
    if "rerun_from_settings" in figures:
        r = figures["rerun_from_settings"]
        print(
            f"re-run from report.json's settings: {r['report_figures_differing']} figures, {r['tensors_differing']} tensors differ"
        )
    return 0 if c["equal"] and figures.get("rerun_from_settings", {"equal": True})["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
