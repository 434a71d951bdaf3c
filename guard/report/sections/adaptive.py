"""Section "Adaptive evaluation": ``report["adaptive"]``, drawn generically.

No audit step writes this section yet; when one does, the page shows it without a change
here: a ``{DETECTOR: {ATTACK: {"auroc", ...}}}`` mapping as the detector table, anything else
as a table of its values (nested keys joined with dots).
"""

from __future__ import annotations

from typing import Any

from guard.report.html import figure, table
from guard.report.sections.common import Section, SectionWriter
from guard.report.sections.detectors import auroc_table
from guard.report.source import AuditFolder
from guard.report.text import num

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
    return isinstance(node, dict) and bool(node) and all(
        isinstance(per, dict) and per and all(isinstance(m, dict) and "auroc" in m for m in per.values()) for per in node.values())


def build(src: AuditFolder) -> Section | None:
    node = src.section("adaptive")
    if node is None:
        return None
    w = SectionWriter(src, "adaptive", "Adaptive evaluation")
    w.add("<p>Attacks that know the detectors and try to evade them as well as fool the model.</p>")
    if _is_detector_table(node):
        w.add(figure(auroc_table(node) or "", "AUROC of each detector (rows) against each adaptive attack (columns), with the true "
                     "positive rate at 1% / 5% false positives under it.", w.cmd(["adaptive"])))
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
