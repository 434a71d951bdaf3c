"""Section "Adaptive evaluation": ``report["adaptive"]`` (the audit's ``adaptive`` step).

The step's section (``{"eps", "evasion", "n", "steps", "fpr", "per_eps": [...]}``,
:func:`guard.adaptive_eval.evaluate_adaptive`) is drawn as a table per budget: the misclassification
and evasion of the attacker who knows the detectors (with their 95% intervals when present) beside
plain PGD's evasion, with the flagged share.
Any other shape falls back to the generic drawing: a ``{DETECTOR: {ATTACK: {"auroc", ...}}}``
mapping as the detector table, anything else as a table of its values.
"""

from __future__ import annotations

from typing import Any

from guard.report.html import esc, figure, table
from guard.report.sections.common import Section, SectionWriter
from guard.report.sections.detectors import auroc_table
from guard.report.source import AuditFolder
from guard.report.text import num, pct, seconds

__all__ = ["build", "flatten"]

MAX_ROWS = 200


def flatten(node: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, value as text) for every leaf; lists of scalars joined, other lists indexed."""
    if isinstance(node, dict):
        out: list[tuple[str, str]] = []
        for k, v in node.items():
            out += flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(node, list):
        if all(not isinstance(v, (dict, list)) for v in node):
            return [(prefix, ", ".join(num(v) if isinstance(v, (int, float)) else str(v) for v in node))]
        out = []
        for i, v in enumerate(node):
            out += flatten(v, f"{prefix}[{i}]")
        return out
    return [(prefix, num(node) if isinstance(node, (int, float)) else str(node))]


def _is_detector_table(node: Any) -> bool:
    return (
        isinstance(node, dict)
        and bool(node)
        and all(
            isinstance(per, dict) and per and all(isinstance(m, dict) and "auroc" in m for m in per.values())
            for per in node.values()
        )
    )


def _with_ci(e: dict[str, Any], key: str) -> str:
    """A rate with its 95% interval when the report has one: '12.5% [4.1%, 27.3%]'."""
    ci = e.get(f"{key}_ci95")
    rate = pct(e.get(key))
    return f"{rate} [{pct(ci[0])}, {pct(ci[1])}]" if isinstance(ci, list) and len(ci) == 2 else rate


def _evasion_section(w: SectionWriter, node: dict[str, Any]) -> Section:
    fpr, n, steps = node.get("fpr"), node.get("n"), node.get("steps")
    sweep = ""
    if node.get("weights") is not None:
        sweep = (
            f" The attacker keeps, per image, the best of plain PGD, the margin plus weighted detector stand-ins (weights "
            f"{esc(', '.join(num(v) for v in node.get('weights') or []))}), orthogonal and selective PGD (misclassify first, "
            f"then lower the detectors) and logit matching, {esc(num(node.get('restarts')))} restart(s) each."
        )
    w.add(
        f"<p>An attacker who knows the guarded model ({esc(num(steps))} steps per run) attacks {esc(num(n))} held-out images "
        f"that the detectors were not calibrated on. It evades when the image ends misclassified <em>and</em> not flagged by the "
        f"combined detector at its calibrated threshold ({esc(pct(fpr, 0))} false positives).{sweep}</p>"
    )
    if node.get("evasion") is None:
        w.add(
            f'<p class="note info">No evasion rate: {esc(node.get("note", "nothing was attacked"))}.</p>',
            w.cmd(["adaptive"]),
        )
        return w.done()
    rows = [
        [
            num(e.get("eps")),
            _with_ci(e, "misclassified"),
            _with_ci(e, "evasion"),
            pct(e.get("evasion_correct")),
            pct(e.get("oblivious_evasion")),
            pct(e.get("flagged")),
            num(e.get("n")),
            seconds(e.get("seconds")),
        ]
        for e in node.get("per_eps") or []
    ]
    w.add(
        figure(
            str(
                table(
                    [
                        "L-inf budget",
                        "misclassified (95% CI)",
                        "evasion (adaptive, 95% CI)",
                        "evasion, correct clean",
                        "evasion (plain PGD)",
                        "flagged",
                        "images",
                        "time",
                    ],
                    rows,
                )
            ),
            "Read misclassification beside evasion: an attacker that stops misclassifying evades nothing. Read the evasion "
            "columns side by side: a defence that holds only against plain PGD (which does not know the detectors) shows a low "
            "plain-PGD figure and a high adaptive one. Flagged and misclassified are the adaptive attack's shares.",
            w.cmd(["adaptive.per_eps"]),
        )
    )
    w.add(
        f"<p>Headline (budget {esc(num(node.get('eps')))}): {esc(pct(node.get('evasion')))} of attacked images evade.</p>"
    )
    return w.done()


def build(src: AuditFolder) -> Section | None:
    node = src.section("adaptive")
    if node is None:
        return None
    w = SectionWriter(src, "adaptive", "Adaptive evaluation")
    if isinstance(node, dict) and "per_eps" in node and "evasion" in node:
        return _evasion_section(w, node)
    w.add("<p>Attacks that know the detectors and try to evade them as well as fool the model.</p>")
    if _is_detector_table(node):
        w.add(
            figure(
                auroc_table(node) or "",
                "AUROC of each detector (rows) against each adaptive attack (columns), with the true "
                "positive rate at 1% / 5% false positives under it.",
                w.cmd(["adaptive"]),
            )
        )
        return w.done()
    parts = node.items() if isinstance(node, dict) else [("adaptive", node)]
    for key, value in parts:
        if _is_detector_table(value):
            w.add(f"<h3>{key}</h3>", auroc_table(value) or "", w.cmd([f"adaptive.{key}"]))
            continue
        rows = flatten(value, str(key))
        shown = rows[:MAX_ROWS]
        w.add(table(["key", "value"], shown))
        if len(rows) > MAX_ROWS:
            w.add(f"<p>... and {len(rows) - MAX_ROWS} more values in report.json.</p>")
    w.add(w.cmd(["adaptive"]))
    return w.done()
