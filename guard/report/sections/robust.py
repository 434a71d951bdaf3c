"""Section "Robust accuracy": ``report["robust"]`` (the audit's ``robust`` step, :func:`guard.evaluate_robust`).

The headline figures with their 95% Clopper-Pearson intervals, one row per attack (AutoAttack's
order: each attacks only what the ones before left), AutoAttack's flags, the eps sweep's checks
and the per-iteration loss curves of guard's APGD for a few images (Croce & Hein, ICML 2020).
"""

from __future__ import annotations

import math
from typing import Any

from guard.report.figures import line_plot
from guard.report.html import figure, img, note, table
from guard.report.sections.common import Section, SectionWriter
from guard.report.source import AuditFolder
from guard.report.text import num, pct, seconds

__all__ = ["build"]


def _ci(node: dict[str, Any], key: str) -> str:
    ci = (node.get("intervals") or {}).get(key)
    return (
        f"{pct(node.get(key))} [{pct(ci[0])}, {pct(ci[1])}]"
        if isinstance(ci, list) and len(ci) == 2
        else pct(node.get(key))
    )


def _headline(w: SectionWriter, node: dict[str, Any]) -> None:
    reject = bool(node.get("reject_model"))
    rows = [["clean accuracy", _ci(node, "clean_accuracy")]]
    if reject:
        rows.append(["clean images rejected", _ci(node, "clean_rejected")])
        rows.append(
            [
                "robust accuracy with rejection (a rejected attacked image is safe)",
                _ci(node, "robust_accuracy_with_rejection"),
            ]
        )
        rows.append(["robust accuracy (a rejected attacked image is an error)", _ci(node, "robust_accuracy")])
    else:
        rows.append(["robust accuracy", _ci(node, "robust_accuracy")])
    w.add(
        figure(
            str(table(["figure", "value [95% interval]"], rows)),
            f"On {num(node.get('n'))} held-out images at L-inf budget {num(node.get('eps'), 4)}. An image counts as robust "
            "when the model classifies the clean image correctly"
            + (" without rejecting it" if reject else "")
            + " and no attack in the list below makes it output a wrong class.",
            w.cmd(["robust"]),
        )
    )


def _attack_rows(node: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, e in (node.get("per_attack") or {}).items():
        if isinstance(e, dict):
            rows.append(
                [
                    name,
                    str((e.get("params") or {}).get("impl", "")),
                    num(e.get("attacked")),
                    num(e.get("broken")),
                    num(e.get("rejected")),
                    pct(e.get("robust_accuracy_with_rejection")),
                    pct(e.get("robust_accuracy")),
                    seconds(e.get("seconds")),
                ]
            )
    return rows


def _curves(node: dict[str, Any]) -> str | None:
    curves = node.get("loss_curves") or {}
    for name, c in curves.items():
        loss = c.get("loss") if isinstance(c, dict) else None
        if not loss:
            continue
        series = []
        for image, row in zip(c.get("images") or range(len(loss)), loss):
            pts = [(i, float(v)) for i, v in enumerate(row) if v is not None and math.isfinite(float(v))]
            if pts:
                series.append((f"image {image}", [p[0] for p in pts], [p[1] for p in pts], None))
        if series:
            return line_plot(
                series,
                xlabel="iteration",
                ylabel=f"{c.get('loss_name') or 'loss'}",
                title=name,
                ylim=None,
                ypercent=False,
            )
    return None


def build(src: AuditFolder) -> Section | None:
    node = src.section("robust")
    if not isinstance(node, dict):
        return None
    w = SectionWriter(src, "robust", "Robust accuracy")
    w.add(
        "<p>Robust accuracy as RobustBench measures it: AutoAttack's attacks (APGD-CE, APGD-T, FAB-T, Square) and guard's "
        "APGD, one after the other, each on the images the ones before did not break.</p>"
    )
    _headline(w, node)
    rows = _attack_rows(node)
    if rows:
        w.add(
            figure(
                str(
                    table(
                        [
                            "attack",
                            "implementation",
                            "attacked",
                            "broken",
                            "rejected",
                            "robust with rejection after it",
                            "robust after it",
                            "time",
                        ],
                        rows,
                    )
                ),
                "Broken: images this attack made the model misclassify (a wrong real class) that every attack before it "
                "had left. The two robust columns are cumulative.",
                w.cmd(["robust.per_attack"]),
            )
        )
    for msg in node.get("warnings") or []:
        w.add(note(str(msg), "error"))
    sweep = node.get("sweep")
    if isinstance(sweep, dict) and sweep.get("eps"):
        srows = [
            [num(e, 4), pct(a), pct(b)]
            for e, a, b in zip(
                sweep["eps"], sweep.get("robust_accuracy_with_rejection") or [], sweep.get("robust_accuracy") or []
            )
        ]
        checks = sweep.get("checks") or {}
        w.add(
            figure(
                str(table(["L-inf budget", "robust with rejection", "robust"], srows)),
                f"Sanity checks (a cheaper attack set): robust accuracy falls as the budget grows: {checks.get('monotone')}; "
                f"it reaches 0 at the largest budget: {checks.get('zero_at_largest')}.",
                w.cmd(["robust.sweep"]),
            )
        )
        for msg in sweep.get("warnings") or []:
            w.add(note(str(msg), "error"))
    uri = _curves(node)
    if uri is not None:
        w.add(
            figure(
                str(img(uri, "APGD loss per iteration")),
                "guard's APGD loss per iteration for a few images: it should rise and level off; a curve that ends early "
                "belongs to an image that was broken there.",
                w.cmd(["robust.loss_curves"]),
            )
        )
    if not node.get("attacks"):
        w.add(note("No attack ran (a budget of 0, or no image to attack).", "info"))
    return w.done()
