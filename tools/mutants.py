"""Mutation check: does the test suite notice the defects that matter for a defence's figures?

    OMP_NUM_THREADS=1 .venv/bin/python tools/mutants.py                 # every mutant, then the JSON
    OMP_NUM_THREADS=1 .venv/bin/python tools/mutants.py --only fgsm_sign pgd_sign
    OMP_NUM_THREADS=1 .venv/bin/python tools/mutants.py --list

Each mutant (issue 34, "Tests that catch the defects above") is one small source edit that a
wrong implementation could ship with: FGSM or PGD stepping against the loss, the audit's
calibration and evaluation images overlapping, ``guard.evaluate`` given the calibration images
as its clean negatives, a detector's score sign flipped (one mutant per detector), a surrogate
whose gradient points the wrong way. The idea is mutation testing's (DeMillo, Lipton & Sayward
1978, "Hints on test data selection"; the tools mutmut and cosmic-ray automate it for Python);
it is written here by hand because those tools draw random operator mutants, while the defects
of interest are a chosen few, each placed where it matters.

Every mutant is applied to a *temporary copy* of the repository, never to the working tree (a
crash cannot leave the tree mutated): the tracked and untracked-but-not-ignored files are copied
to a temporary folder, the edit is applied there, and the installed layout of pyproject.toml's
``package-dir`` (``attacks/`` as ``guard.attacks`` ...) is rebuilt inside it and put first on
``PYTHONPATH``, so the tests import the mutated copy (checked before each run). The tests named
for the mutant run in the copy with pytest; the unmutated copy runs the same tests first
(``baseline``), so that a test that fails anyway is not counted as catching anything.

Writes ``benchmarks/results/mutants.json`` through :func:`guard.core.provenance.write_results`:
for each mutant its description, the patch (a unified diff), the test command and the tests
that failed (``caught``), or ``"SURVIVED"``. Exits 1 when a mutant survives or the baseline fails.
"""

from __future__ import annotations

import argparse
import difflib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "mutants.json"


@dataclass(frozen=True)
class Mutant:
    """One source edit: ``edits`` are (old, new) pairs, each ``old`` found exactly once in ``file``."""

    id: str
    description: str
    file: str
    edits: tuple[tuple[str, str], ...]
    tests: tuple[str, ...]
    notes: str = field(default="")


_GRADIENT_TESTS = (
    "tests/test_attacks_gradient.py::test_linf_budget_range_dtype",
    "tests/test_attacks_gradient.py::test_pgd_beats_fgsm_and_big_eps_succeeds",
    "tests/test_attacks_gradient.py::test_targeted",
    "tests/test_attacks_gradient_direction.py",
)

MUTANTS: tuple[Mutant, ...] = (
    # --- attacks stepping against the loss -----------------------------------------------------
    Mutant(
        "fgsm_sign",
        "FGSM steps against the loss (x - eps * sign(grad)): it then lowers the loss it should raise",
        "attacks/gradient.py",
        (
            (
                "x_adv = (x + self.eps * grad.sign()).clamp(0.0, 1.0)",
                "x_adv = (x - self.eps * grad.sign()).clamp(0.0, 1.0)",
            ),
        ),
        _GRADIENT_TESTS,
    ),
    Mutant(
        "pgd_sign",
        "L-inf PGD steps against the loss (every step along -sign(grad))",
        "attacks/gradient.py",
        (
            (
                "    def _step(self, grad: torch.Tensor) -> torch.Tensor:\n        return grad.sign()",
                "    def _step(self, grad: torch.Tensor) -> torch.Tensor:\n        return -grad.sign()",
            ),
        ),
        _GRADIENT_TESTS,
    ),
    # --- calibration and evaluation images overlapping -----------------------------------------
    Mutant(
        "audit_split_overlap",
        "the audit's evaluation half is its calibration half (split_heldout returns the same indices twice)",
        "guard/audit/detectors.py",
        (("    return perm[:half], perm[half:]", "    return perm[:half], perm[:half]"),),
        ("tests/test_audit_split.py",),
    ),
    Mutant(
        "audit_evaluate_on_calibration",
        "guard.evaluate, called by the audit, is given the calibration images (and their scores) as its clean negatives",
        "guard/audit/detectors.py",
        (
            (
                "    ev_scores = {k: v[ncal:] for k, v in scores.items()}",
                "    ev_scores = {k: v[:ncal] for k, v in scores.items()}",
            ),
            ("    x_ev = x_all[ev_idx]", "    x_ev = x_all[cal_idx]"),
        ),
        ("tests/test_audit_split.py",),
    ),
    # --- a detector's score sign flipped (higher = more suspicious, everywhere) -----------------
    Mutant(
        "score_sign_saliency",
        "SaliencyConcentration's score negated (a concentrated map scores low)",
        "detectors/saliency.py",
        (
            (
                '        return window_share(attr, self.window_) if self.reduce == "window" else topk_share(attr, self.topk)',
                '        return -(window_share(attr, self.window_) if self.reduce == "window" else topk_share(attr, self.topk))',
            ),
        ),
        ("tests/test_detectors_saliency.py::test_concentrated_gradient_scores_higher_and_model_untouched",),
    ),
    Mutant(
        "score_sign_knn",
        "KNNRank's score negated (a far-off input scores low)",
        "detectors/knn.py",
        (
            (
                "        return torch.stack(list(self.layer_scores(feats, logits).values()), 1).amax(1)",
                "        return -torch.stack(list(self.layer_scores(feats, logits).values()), 1).amax(1)",
            ),
        ),
        (
            "tests/test_detectors_knn.py::test_planted_outlier_scores_higher_and_flag_rate_near_fpr",
            "tests/test_detectors_knn.py::test_multilayer_score_is_max_of_layers_and_roundtrip",
        ),
    ),
    Mutant(
        "score_sign_knn_consistency",
        "KNNConsistency's score negated (agreeing neighbours score high)",
        "detectors/knn.py",
        (
            (
                "        return torch.stack(list(self.disagreement(feats, logits.argmax(1)).values()), 1).mean(1)",
                "        return -torch.stack(list(self.disagreement(feats, logits.argmax(1)).values()), 1).mean(1)",
            ),
        ),
        ("tests/test_detectors_knn.py::test_knn_consistency_counts_disagreeing_neighbours",),
    ),
    Mutant(
        "score_sign_ppca",
        "PPCAManifold's score is the log-likelihood instead of its negative (an off-manifold input scores low)",
        "detectors/ppca.py",
        (
            (
                "        return -self.log_likelihood(feats, logits.argmax(1))",
                "        return self.log_likelihood(feats, logits.argmax(1))",
            ),
        ),
        ("tests/test_detectors_ppca.py::test_off_manifold_point_scores_higher_and_angle",),
    ),
    Mutant(
        "score_sign_mahalanobis",
        "Mahalanobis's score negated",
        "detectors/mahalanobis.py",
        (
            (
                "        return ((self.layer_distances(feats) - self.loc_) / self.scale_).mean(1)",
                "        return -((self.layer_distances(feats) - self.loc_) / self.scale_).mean(1)",
            ),
        ),
        ("tests/test_detectors_anchors.py",),
    ),
    Mutant(
        "score_sign_lid",
        "LID's score negated",
        "detectors/lid.py",
        (
            (
                "        return ((self.layer_lids(feats) - self.loc_) / self.scale_).mean(1)",
                "        return -((self.layer_lids(feats) - self.loc_) / self.scale_).mean(1)",
            ),
        ),
        ("tests/test_detectors_anchors.py",),
    ),
    Mutant(
        "score_sign_squeeze",
        "BitDepthSqueeze's score negated",
        "detectors/squeeze.py",
        (
            (
                "                out.append(squeeze_distance(lb, model(squeeze_bits(xb, self.bits_))))",
                "                out.append(-squeeze_distance(lb, model(squeeze_bits(xb, self.bits_))))",
            ),
        ),
        ("tests/test_detectors_saliency.py::test_bit_depth_squeeze_undoes_small_linf_noise",),
    ),
    # --- a surrogate whose gradient points the wrong way ----------------------------------------
    Mutant(
        "adaptive_surrogate_sign",
        "AdaptivePGD reads every detector's surrogate negated (it then raises the detectors' scores)",
        "attacks/adaptive.py",
        (
            (
                '    return (out["score"] if isinstance(out, dict) else out).float()',
                '    return -(out["score"] if isinstance(out, dict) else out).float()',
            ),
        ),
        ("tests/test_attacks_adaptive.py::test_adaptive_attack_lowers_the_flag_rate_of_a_differentiable_detector",),
    ),
    Mutant(
        "surrogate_sign_knn",
        "KNNRank's export head's surrogate negated",
        "detectors/knn.py",
        (
            (
                "            out.append(soft.sum(1) / counts[c] + (d - top[c]).clamp_min(0.0) / spread[c])\n"
                "        return torch.stack(out, 1).amax(1)",
                "            out.append(soft.sum(1) / counts[c] + (d - top[c]).clamp_min(0.0) / spread[c])\n"
                "        return -torch.stack(out, 1).amax(1)",
            ),
        ),
        ("tests/test_surrogate_directions.py::test_steps_down_the_surrogate_lower_the_real_score[knn]",),
    ),
    Mutant(
        "surrogate_sign_saliency",
        "SaliencyConcentration's export head's surrogate negated",
        "detectors/saliency.py",
        (
            (
                "                                  create_graph=True)\n"
                '        return window_share(attr, self.window) if self.reduce == "window" else topk_share(attr, self.topk)',
                "                                  create_graph=True)\n"
                '        return -(window_share(attr, self.window) if self.reduce == "window" else topk_share(attr, self.topk))',
            ),
        ),
        ("tests/test_surrogate_directions.py::test_saliency_surrogate_lowers_the_real_score_on_a_smooth_network",),
    ),
    Mutant(
        "surrogate_sign_squeeze",
        "BitDepthSqueeze's BPDA surrogate negated",
        "detectors/squeeze.py",
        (
            (
                "        return squeeze_distance(batch.logits, batch.model(squeezed).float())",
                "        return -squeeze_distance(batch.logits, batch.model(squeezed).float())",
            ),
        ),
        ("tests/test_surrogate_directions.py::test_steps_down_the_surrogate_lower_the_real_score[squeeze]",),
    ),
)


def _source_files(repo: Path) -> list[str]:
    """Tracked files and untracked files git does not ignore (what the working tree holds of the project)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted({p for p in out.split("\0") if p and (repo / p).is_file()})


def _copy_repo(repo: Path, dest: Path) -> None:
    for rel in _source_files(repo):
        if rel.startswith("benchmarks/results/") and not rel.endswith(".json"):
            continue  # large result artifacts: no test reads them
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / rel, target)


def _build_layout(copy: Path) -> Path:
    """The installed package tree (pyproject's package-dir) built inside the copy: ``attacks/`` also
    as ``guard/attacks`` and so on. The copy's own ``guard/`` must be the complete package because
    ``python -m pytest`` puts the working folder first on ``sys.path``. Returns the folder to put on
    ``PYTHONPATH``."""
    conf = tomllib.loads((copy / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs: dict[str, str] = conf.get("package-dir", {})
    if dirs.get("guard", "guard") != "guard":
        raise RuntimeError(f"pyproject.toml maps guard to {dirs['guard']!r}; this script expects guard/")
    for pkg, folder in sorted(dirs.items()):
        if pkg == "guard":
            continue
        shutil.copytree(copy / folder, copy / Path(*pkg.split(".")), ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def apply_edits(text: str, mutant: Mutant) -> str:
    """``text`` with the mutant's edits applied; ValueError when an ``old`` is not found exactly once."""
    for old, new in mutant.edits:
        n = text.count(old)
        if n != 1:
            raise ValueError(
                f"mutant {mutant.id!r}: the text to replace occurs {n} times in {mutant.file} (expected once): {old!r}"
            )
        text = text.replace(old, new)
    return text


def _patch(mutant: Mutant, before: str, after: str) -> str:
    return "".join(
        difflib.unified_diff(before.splitlines(True), after.splitlines(True), f"a/{mutant.file}", f"b/{mutant.file}")
    )


def _pytest_command(tests: tuple[str, ...], junit: Path) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", str(junit), *tests]


def _failed(junit: Path) -> tuple[list[str], int]:
    """(failed or errored test ids, number of tests run) from a JUnit XML file."""
    if not junit.is_file():
        return [], 0
    root = ET.parse(junit).getroot()
    failed, n = [], 0
    for case in root.iter("testcase"):
        n += 1
        if case.find("failure") is not None or case.find("error") is not None:
            cls = case.get("classname", "").replace(".", "/")
            failed.append(f"{cls}.py::{case.get('name')}")
    return failed, n


def run_in_copy(mutant: Mutant | None, tests: tuple[str, ...], timeout: float) -> dict:
    """Copy the repository, apply ``mutant`` (None: the baseline), run ``tests``; the record."""
    with tempfile.TemporaryDirectory(prefix="guard-mutant-") as tmp:
        copy = Path(tmp) / "repo"
        _copy_repo(REPO, copy)
        patch = ""
        if mutant is not None:
            path = copy / mutant.file
            before = path.read_text()
            after = apply_edits(before, mutant)
            path.write_text(after)
            patch = _patch(mutant, before, after)
        site = _build_layout(copy)
        env = {
            **os.environ,
            "PYTHONPATH": str(site),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        probe = "import guard.attacks.gradient as m; print(m.__file__)"
        where = subprocess.run(
            [sys.executable, "-c", probe], cwd=copy, env=env, capture_output=True, text=True, timeout=300
        )
        if not where.stdout.strip().startswith(str(site / "guard" / "attacks")):
            raise RuntimeError(f"the copy is not what the tests import: {where.stdout.strip()!r} {where.stderr[-500:]}")
        junit = Path(tmp) / "junit.xml"
        cmd = _pytest_command(tests, junit)
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-1500:]
        except subprocess.TimeoutExpired:
            rc, tail = None, f"timed out after {timeout} s"
        failed, n_run = _failed(junit)
        shown = ["python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
        return {
            "patch": patch,
            "test_command": "OMP_NUM_THREADS=1 PYTHONPATH=<copy's package layout> " + shlex.join(shown),
            "returncode": rc,
            "tests_run": n_run,
            "failed": failed,
            "seconds": round(time.monotonic() - t0, 1),
            "output_tail": tail if rc not in (0, 1) or (mutant is None and rc != 0) else "",
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="ID", help="run only these mutants (ids as --list prints them)")
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed for one pytest run (default 1800)")
    ap.add_argument("--jobs", type=int, default=2, help="mutants run at the same time (default 2)")
    ap.add_argument("--out", default=str(RESULTS), help=f"results file (default {RESULTS.relative_to(REPO)})")
    ap.add_argument("--no-write", action="store_true", help="print the results only (a partial run)")
    args = ap.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.id:30s} {m.file:28s} {m.description}")
        return 0
    chosen = [m for m in MUTANTS if args.only is None or m.id in args.only]
    unknown = set(args.only or ()) - {m.id for m in MUTANTS}
    if unknown:
        ap.error(f"unknown mutant id(s) {sorted(unknown)}; --list prints them")
    for m in chosen:  # every edit must apply before anything runs
        apply_edits((REPO / m.file).read_text(), m)

    # The unmutated copy runs every chosen mutant's tests (one run): a test that fails there catches
    # nothing. Mutants run ``--jobs`` at a time, each in its own copy.
    union = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        base_job = pool.submit(run_in_copy, None, union, args.timeout)
        jobs = {m.id: pool.submit(run_in_copy, m, m.tests, args.timeout) for m in chosen}
        base = base_job.result()
        print(
            f"baseline: {base['tests_run']} tests, failed {base['failed']}, rc {base['returncode']}, {base['seconds']} s",
            flush=True,
        )
        records = []
        for m in chosen:
            rec = jobs[m.id].result()
            caught = [t for t in rec["failed"] if t not in base["failed"]]
            if (
                rec["returncode"] not in (0, 1) and not caught
            ):  # a collection error or a timeout: the tests did not judge it
                status = "ERROR"
            else:
                status = "CAUGHT" if caught else "SURVIVED"
            records.append(
                {
                    "id": m.id,
                    "description": m.description,
                    "file": m.file,
                    "patch": rec["patch"],
                    "test_command": rec["test_command"],
                    "tests_run": rec["tests_run"],
                    "caught_by": caught if caught else "SURVIVED",
                    "status": status,
                    "seconds": rec["seconds"],
                    "baseline_failed": [
                        t for t in base["failed"] if any(t.startswith(x.split("::")[0]) for x in m.tests)
                    ],
                    **({"output_tail": rec["output_tail"]} if rec["output_tail"] else {}),
                }
            )
            print(
                f"{m.id:30s} {status:8s} {len(caught)} of {rec['tests_run']} tests failed ({rec['seconds']} s): {caught[:4]}",
                flush=True,
            )
    out = Path(args.out)
    if args.only and out.is_file():  # a partial run replaces its mutants' records and keeps the others
        from guard.core.provenance import read_results

        kept = [r for r in read_results(out).get("mutants", []) if r["id"] not in {m.id for m in chosen}]
        order = {m.id: i for i, m in enumerate(MUTANTS)}
        records = sorted(kept + records, key=lambda r: order.get(r["id"], len(order)))
    baseline_failed = sorted({t for r in records for t in r.get("baseline_failed", [])})
    figures = {
        "what": "mutation check of issue 34: each mutant applied to a temporary copy of the repository, its tests run there; "
        "the unmutated copy ran the same tests (baseline_failed: the tests that failed there, which catch nothing)",
        "mutants": records,
        "survived": [r["id"] for r in records if r["status"] != "CAUGHT"],
        "baseline_failed": baseline_failed,
    }
    if not args.no_write:
        from guard.core.provenance import write_results

        write_results(
            args.out,
            figures,
            command=shlex.join(["OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", ""), "python", *sys.argv]),
        )
        print(f"wrote {args.out}")
    return 0 if not figures["survived"] and not baseline_failed else 1


if __name__ == "__main__":
    sys.exit(main())
