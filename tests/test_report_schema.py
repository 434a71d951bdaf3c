"""report.json has one vocabulary: every key the audit writes is declared in guard.report.schema.

A key written under a new or misspelt name would otherwise go unnoticed: the page reads the
keys it knows and leaves the others out. :func:`guard.report.schema.unknown_keys` walks a report
against the TypedDicts; these tests run it on the committed CIFAR-10 quick audit, on a small
audit run here (every step, export included) and on a report with a planted misspelling, and
check that the keys docs/reference/report-json.md lists are the schema's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from audit_driver import EXTRA

from guard.audit.settings import AuditSettings
from guard.report.schema import Report, unknown_keys

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "benchmarks" / "results" / "audit-cifar10-robust-quick" / "report.json"
DOC = ROOT / "docs" / "reference" / "report-json.md"

#: audit_driver's shrunk steps, smaller still where the tiny model and 256 held-out images allow
SMALL = {
    **EXTRA,
    "gradient_images": 32,
    "heldout_n": 16,
    "robust_n": 8,
    "robust_sweep": False,
    "certified_n": 8,
    "export_eval_images": 32,
    "export_attack_images": 8,
    "export_latency_repeats_one": 1,
    "export_latency_repeats": 1,
}


def _committed() -> dict:
    return json.loads(COMMITTED.read_text())


def test_committed_report_has_no_unknown_keys() -> None:
    report = _committed()
    assert unknown_keys(report) == []
    others = sorted((ROOT / "benchmarks" / "results").glob("*/report.json"))
    assert len(others) >= 2  # every committed audit report, not only this one
    for path in others:
        assert unknown_keys(json.loads(path.read_text())) == [], path
    # the per-step settings are free-form in the schema: guard.audit.settings checks their keys
    AuditSettings.from_dict(report["settings"]["steps"])


@pytest.fixture(scope="module")
def small_audit(tiny_model, small_split, tmp_path_factory) -> dict:
    """report.json of every audit step (export included) on the tiny model, 512 / 256 images."""
    from guard.audit import AuditOptions, run_audit

    train, test = small_split
    out = tmp_path_factory.mktemp("schema_audit")
    opts = AuditOptions(quick=True, export=True, progress=False, repetitions=2, extra=dict(SMALL))
    run_audit(tiny_model, train, test, out, model_name="tiny", options=opts)
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_audit_writes_only_declared_keys(small_audit) -> None:
    assert not small_audit.get("errors"), small_audit.get("errors")
    for section in ("model", "attacks", "detectors", "detectors_info", "adaptive", "robust", "certified", "export"):
        assert section in small_audit  # each step wrote its section, so each was checked
    assert unknown_keys(small_audit) == []


def test_unknown_keys_reports_a_misspelt_key_with_its_path() -> None:
    report = _committed()
    report["attacks"]["pgd"]["sucess_rate"] = report["attacks"]["pgd"].pop("success_rate")
    report["detectors"]["knn"]["fgsm"]["all"]["operating_point"]["tpr"]["rates"] = 0.5
    report["adaptive"]["per_eps"][0]["evasions"] = 0.1
    report["robust_accuracy"] = 0.0
    assert unknown_keys(report) == [
        "attacks.pgd.sucess_rate",
        "detectors.knn.fgsm.all.operating_point.tpr.rates",
        "adaptive.per_eps[0].evasions",
        "robust_accuracy",
    ]


def test_free_form_parts_are_not_looked_into() -> None:
    report: dict = {"attacks": {"pgd": {"params": {"anything": 1}}}, "settings": {"steps": {"gradient": {"x": 1}}}}
    assert unknown_keys(report) == []


def test_documented_top_level_keys_are_declared() -> None:
    block = re.search(r"```\n(\{.*?\})\n```", DOC.read_text(), re.S)
    assert block is not None, "docs/reference/report-json.md lost its code block"
    # a top-level key opens a line of the block ("version", "model", ...) or follows a "}, " or "], " on the last line
    documented = set(re.findall(r'(?:^\s{2}|[}\]],\s*)"(\w+)":', block.group(1), re.M))
    assert {"version", "model", "attacks", "detectors", "errors", "skipped", "_completed_steps"} <= documented
    assert documented <= set(Report.__annotations__), documented - set(Report.__annotations__)
