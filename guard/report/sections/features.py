"""Section "Feature adversaries": source, adversary and guide side by side, and the curves."""

from __future__ import annotations

from typing import Any

import numpy as np

from guard.report import figures
from guard.report.html import figure, img, strip_table, table
from guard.report.sections.common import Section, SectionWriter, image_row
from guard.report.source import AuditFolder
from guard.report.text import finite, label, num, pct, seconds

__all__ = ["build"]

NAME = "feature_adversary"
SHOWN = 8


def _examples(w: SectionWriter) -> None:
    art = w.artifact(f"attack_{NAME}", "the source / adversary / guide examples", needs=("x_adv",))
    if art is None:
        return
    n = min(SHOWN, art["x_adv"].shape[0])
    ok = art.get("success")
    adv_label, guide_label, ratio, y = (art.get(k) for k in ("adv_label", "guide_label", "distance_ratio", "y"))
    rows = []
    if "source" in art:
        rows.append(
            image_row(
                "source",
                art["source"][:n],
                [f"label {label(y[i], w.names)}" if y is not None else "" for i in range(n)],
            )
        )
    else:
        w.artifact(f"attack_{NAME}", "the source images", needs=("source",))
    caps = []
    for i in range(n):
        seen = (
            f"seen as {label(adv_label[i], w.names)}"
            if adv_label is not None
            else ("fooled" if ok is not None and ok[i] else "")
        )
        caps.append(seen + (f", ratio {float(ratio[i]):.2f}" if ratio is not None else ""))
    rows.append(
        image_row("adversary", art["x_adv"][:n], caps, [bool(ok[i]) for i in range(n)] if ok is not None else ())
    )
    if "guide" in art:
        rows.append(
            image_row(
                "guide",
                art["guide"][:n],
                [f"label {label(guide_label[i], w.names)}" if guide_label is not None else "" for i in range(n)],
            )
        )
    w.add(
        figure(
            strip_table(rows),
            "Each column: a held-out source image, its feature adversary (every pixel within delta of the source) and the guide "
            "whose features it was pushed towards. The adversary looks like the source, yet the model labels it as the guide "
            "(red: it took the guide's label). Ratio: distance from the adversary's features to the guide's, divided by the "
            "source's distance to the guide at that layer (0 = the same features as the guide, 1 = no closer than the source).",
            w.cmd([f"attacks.{NAME}"], [f"attack_{NAME}"]),
        )
    )


def _curves(w: SectionWriter, curves: Any) -> None:
    by_layer = curves.get("by_layer") if isinstance(curves, dict) else None
    if not isinstance(by_layer, dict) or not by_layer:
        return
    fig, axes = figures.grid(2 * len(by_layer), cols=2, panel=(4.2, 2.8))
    from matplotlib.ticker import PercentFormatter

    for row, (layer, variants) in enumerate(by_layer.items()):
        agree_ax, ratio_ax = axes[2 * row], axes[2 * row + 1]
        for k, (variant, per_delta) in enumerate((variants or {}).items()):
            pts = sorted(
                (float(d), v)
                for d, v in (per_delta or {}).items()
                if finite(_to_float(d)) is not None and isinstance(v, dict)
            )
            if not pts:
                continue
            xs = [d for d, _ in pts]
            color = figures.COLORS[k % len(figures.COLORS)]
            agree_ax.plot(
                xs,
                [finite(v.get("guide_label_agreement")) or 0.0 for _, v in pts],
                marker="o",
                color=color,
                label=variant,
            )
            med = [finite((v.get("distance_ratio") or {}).get("median")) for _, v in pts]
            ratio_ax.plot(xs, [m if m is not None else np.nan for m in med], marker="o", color=color, label=variant)
        agree_ax.set_title(f"{layer}: guide-label agreement", fontsize=10)
        agree_ax.set_ylim(0, 1.02)
        agree_ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ratio_ax.set_title(f"{layer}: median distance ratio", fontsize=10)
        for ax in (agree_ax, ratio_ax):
            ax.set_xlabel("delta (L-inf)")
            ax.grid(alpha=0.3)
        agree_ax.legend(fontsize=8, frameon=False)
    w.add(
        figure(
            img(figures.to_uri(fig), "feature adversary curves"),
            f"Feature adversaries on {num(curves.get('n'))} images per point, by layer, optimiser variant and budget delta: the share "
            "labelled as their guide (left; higher = the attack works) and the median distance ratio (right; lower = the "
            "adversary's features are closer to the guide's).",
            w.cmd([f"attacks.{NAME}.curves"]),
        )
    )


def _to_float(s: Any) -> float | None:
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


def build(src: AuditFolder) -> Section | None:
    e = src.attack(NAME)
    if not e:
        return None
    w = SectionWriter(src, "features", "Feature adversaries")
    w.add(
        "<p>Sabour et al. (2016): an image changed by at most delta per pixel so that, at one layer, its features match those "
        "of another image (the guide) of another class.</p>"
    )
    dr = e.get("distance_ratio") or {}
    rep = e.get("representation") or {}
    rows = [
        [
            e.get("layer", "n/a"),
            num(e.get("delta")),
            num(e.get("n")),
            pct(e.get("guide_label_agreement", e.get("success_rate"))),
            num(dr.get("median"), 2),
            f"{num(dr.get('p10'), 2)} - {num(dr.get('p90'), 2)}",
            num(e.get("linf_max")),
            num((rep.get("iou_adv_guide") or {}).get("median"), 2),
            seconds(e.get("seconds")),
        ]
    ]
    w.add(
        table(
            [
                "layer",
                "delta",
                "images",
                "labelled as the guide",
                "median distance ratio",
                "p10 - p90",
                "max L-inf",
                "median IoU of active units with the guide",
                "time",
            ],
            rows,
            first_is_header=False,
        ),
        w.cmd([f"attacks.{NAME}"]),
    )
    _examples(w)
    _curves(w, e.get("curves"))
    return w.done()
