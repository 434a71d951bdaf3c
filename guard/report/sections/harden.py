"""Section "Hardening": clean accuracy and classes still fooled, round by round."""

from __future__ import annotations

from typing import Any

from guard.report import figures
from guard.report.html import figure, img, table
from guard.report.sections.common import Section, SectionWriter
from guard.report.source import AuditFolder
from guard.report.text import confidence, finite, num, pct

__all__ = ["build"]


def _plot(rows: list[dict[str, Any]], k: Any) -> str:
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    fig, (a1, a2) = figures.grid(2, cols=2, panel=(4.0, 2.8))
    r = [int(finite(x.get("round")) or i) for i, x in enumerate(rows)]
    a1.plot(r, [finite(x.get("clean_accuracy")) for x in rows], marker="o", color=figures.COLORS[0])
    a1.set_title("clean accuracy", fontsize=10)
    a1.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=1))
    counts = [finite(x.get("fooling_classes_ge99_count")) for x in rows]
    a2.plot(r, [c if c is not None else float("nan") for c in counts], marker="o", color=figures.COLORS[1])
    a2.set_title(f"classes fooled at >= 99% (of {k})", fontsize=10)
    a2.set_ylim(bottom=0)
    for ax in (a1, a2):
        ax.set_xlabel("round (0 = before)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return figures.to_uri(fig)


def build(src: AuditFolder) -> Section | None:
    h = src.section("harden")
    if not isinstance(h, dict):
        return None
    w = SectionWriter(src, "harden", "Hardening")
    w.add(
        "<p>Nguyen et al. (2015): rounds of fresh attacks whose images are labelled as an extra reject class, then fine-tuning. "
        "Each round is judged on fooling images evolved against the model after that round.</p>"
    )
    rounds = [x for x in (h.get("rounds") or []) if isinstance(x, dict)]
    base = h.get("baseline") if isinstance(h.get("baseline"), dict) else None
    rows = ([base] if base else []) + rounds
    if not rows:
        w.add("<p>The harden section has no rounds.</p>")
        return w.done()
    k = h.get("num_classes", "?")
    w.add(
        table(
            [
                "round",
                "clean accuracy",
                "classes fooled at >= 99%",
                "median fooling confidence",
                "patch fooling rate",
                "round's attacks rejected",
                "clean images rejected",
            ],
            [
                [
                    num(x.get("round")),
                    pct(x.get("clean_accuracy"), 2),
                    f"{num(x.get('fooling_classes_ge99_count'))}/{k}",
                    confidence(x.get("fooling_median_confidence")),
                    pct(x.get("patch_fooling_rate")),
                    pct(x.get("rejected_share_of_round_attacks")),
                    pct(x.get("clean_rejected_share"), 2),
                ]
                for x in rows
            ],
        ),
        w.cmd(["harden.baseline", "harden.rounds"]),
    )
    w.add(
        figure(
            img(_plot(rows, k), "hardening rounds"),
            "Clean accuracy (left) should stay flat while the number of classes that fresh fooling images still reach at 99% "
            "confidence (right) falls round by round.",
            w.cmd(["harden.rounds[].clean_accuracy", "harden.rounds[].fooling_classes_ge99_count"]),
        )
    )
    goals = h.get("goals")
    if isinstance(goals, dict):

        def words(g: str) -> str:  # "clean_accuracy_drop_le_0.5_points" -> "clean accuracy drop <= 0.5 points"
            return g.replace("_le_", " <= ").replace("ge99", "at >= 99%").replace("_", " ")

        w.add(
            "<p>Goals: "
            + ", ".join(
                f"{words(g)}: {'met' if v else 'not met' if v is not None else 'n/a'}" for g, v in goals.items()
            )
            + f" (clean accuracy drop {num(h.get('clean_accuracy_drop_points'), 3)} points).</p>"
        )
    return w.done()
