"""Section "Detectors": the operating point first, then the detector x attack AUROC table, ROC curves, histograms, thresholds.

The operating-point table is what the deployed flag does: per attack (one row per strength,
held-out peer attacks marked) and detector, the share of successful adversarial images flagged
at the calibrated threshold, with its exact 95% interval and n, under a first row with the
realised false-positive rate on clean evaluation images (never used for calibration). The
tables come from ``report["detectors"]``; the curves and histograms from the artifact
``detector_scores`` (``clean/DET``, ``ATTACK/DET``: the evaluation half's clean scores and the
successful adversarial images' scores, the positives of the table).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from guard.report import figures
from guard.report.html import Raw, esc, figure, img, table
from guard.report.roc import finite_scores, roc_curve
from guard.report.sections.common import Section, SectionWriter
from guard.report.source import AuditFolder
from guard.report.text import attack_short, attack_title, finite, num, pct, rate_ci

__all__ = ["build", "auroc_table", "operating_table"]


def _shade(a: float | None) -> str:
    """Cell background: white at AUROC 0.5 (chance), green towards 1, red below 0.5."""
    if a is None:
        return ""
    t = max(-1.0, min(1.0, (a - 0.5) / 0.5))
    r, g, b = (int(255 - 80 * t), 255, int(255 - 80 * t)) if t >= 0 else (255, int(255 + 80 * t), int(255 + 80 * t))
    return f"background:#{r:02x}{g:02x}{b:02x}"


def auroc_table(dets: dict[str, Any]) -> Raw | None:
    """Rows = detectors, columns = attacks; each cell AUROC with TPR at 1% / 5% FPR under it."""
    attacks: list[str] = []
    for per in dets.values():
        if isinstance(per, dict):
            attacks += [a for a in per if a not in attacks]
    if not attacks:
        return None
    rows = []
    for d, per in dets.items():
        if not isinstance(per, dict):
            continue
        row: list[Any] = [d]
        for a in attacks:
            m = per.get(a) if isinstance(per.get(a), dict) else None
            if m is None:
                row.append("-")
                continue
            au = finite(m.get("auroc"))
            cell = Raw(
                f"{esc(num(au))}<small>{esc(pct(m.get('tpr_at_1fpr'), 0))} / {esc(pct(m.get('tpr_at_5fpr'), 0))}</small>"
            )
            row.append((cell, _shade(au)))
        rows.append(row)
    return table(["detector"] + [attack_short(a) for a in attacks], rows)


def _attack_label(a: str, attacks: dict[str, Any]) -> str:
    e = attacks.get(a) if isinstance(attacks.get(a), dict) else {}
    bits = [b for b in (e.get("strength"), "held out" if e.get("held_out") else None) if b]
    return f"{attack_title(a)} ({', '.join(bits)})" if bits else attack_title(a)


def operating_table(dets: dict[str, Any], attacks: dict[str, Any]) -> Raw | None:
    """Rows = a clean row (realised FPR) then attacks, columns = detectors; cells 'rate [95% CI] of n' at the calibrated threshold."""
    names = [d for d in dets if isinstance(dets[d], dict)]
    order = ["combined"] + [d for d in names if d != "combined"] if "combined" in names else names
    rows_att = list(dict.fromkeys(a for d in names for a in dets[d]))
    if not rows_att:
        return None

    def op(d: str, a: str) -> dict[str, Any]:
        m = dets[d].get(a) if isinstance(dets[d].get(a), dict) else {}
        return m.get("operating_point") if isinstance(m.get("operating_point"), dict) else {}

    clean = []
    for d in order:
        fpr = next((op(d, a).get("fpr") for a in rows_att if op(d, a).get("fpr")), None)
        clean.append(rate_ci(fpr))
    if all(c == "n/a" for c in clean):
        return None
    rows: list[list[Any]] = [[Raw("<b>clean images flagged (FPR)</b>")] + clean]
    for a in rows_att:
        rows.append([_attack_label(a, attacks)] + [rate_ci(op(d, a).get("tpr")) for d in order])
    return table(["attack (strength)"] + order, rows)


def _roc_figure(scores: dict[str, np.ndarray], dets: list[str], attacks: list[str]) -> tuple[str | None, list[str]]:
    """One ROC panel per attack with successful images (and the attacks left out: none succeeded)."""

    def n_pos(a: str) -> int:
        return max((scores[f"{a}/{d}"].size for d in dets if f"{a}/{d}" in scores), default=0)

    panels = [a for a in attacks if n_pos(a) > 0]
    empty = [a for a in attacks if a not in panels and any(f"{a}/{d}" in scores for d in dets)]
    if not panels:
        return None, empty
    fig, axes = figures.grid(len(panels), cols=3, panel=(3.3, 3.0), top=0.75)
    handles: dict[str, Any] = {}
    for ax, a in zip(axes, panels):
        for k, d in enumerate(dets):
            if f"{a}/{d}" not in scores or f"clean/{d}" not in scores:
                continue
            fpr, tpr, auc = roc_curve(scores[f"{a}/{d}"], scores[f"clean/{d}"])
            style = (
                dict(color="black", linewidth=2.2)
                if d == "combined"
                else dict(color=figures.COLORS[k % len(figures.COLORS)], linewidth=1.6)
            )
            (line,) = ax.plot(fpr, tpr, **style)
            handles.setdefault(d, line)
        ax.plot([0, 1], [0, 1], color="#999", linewidth=0.8, linestyle=":")
        for x in (0.01, 0.05):
            ax.axvline(x, color="#bbb", linewidth=0.8, linestyle="--")
        ax.set_title(f"{attack_short(a)} ({n_pos(a)} adv.)", fontsize=10)
        ax.set_xlabel("false positive rate", fontsize=9)
        ax.set_ylabel("true positive rate", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.tick_params(labelsize=8)
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="upper center",
        ncol=min(6, len(handles)),
        frameon=False,
        fontsize=9,
        bbox_to_anchor=(0.5, 1.0),
    )
    return figures.to_uri(fig), empty


def _hist(ax: Any, clean: np.ndarray, adv: np.ndarray, threshold: float | None, title: str) -> None:
    """Clean and attacked score histograms (each summing to 1) with the threshold; a symmetric log
    axis when the attacked scores run far beyond the clean ones (the combined score's outer tail)."""
    c, a = finite_scores(clean, adv)
    both = np.concatenate([c, a])
    lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
    if threshold is not None and np.isfinite(threshold):
        lo, hi = min(lo, threshold), max(hi, threshold)
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    spread = float(np.quantile(c, 0.95) - np.quantile(c, 0.05)) if c.size else 0.0
    scale = max(spread, abs(threshold) if threshold is not None and np.isfinite(threshold) else 0.0, 1e-12)
    log_axis = (hi - lo) > 50 * scale
    if log_axis:

        def fwd(v: np.ndarray) -> np.ndarray:
            return np.sign(v) * np.log10(1 + np.abs(v) / scale)

        def inv(t: np.ndarray) -> np.ndarray:
            return np.sign(t) * scale * (10 ** np.abs(t) - 1)

        bins = inv(np.linspace(fwd(np.array(lo)), fwd(np.array(hi)), 41))
        ax.set_xscale("symlog", linthresh=scale)
    else:
        bins = np.linspace(lo, hi, 41)
    ax.hist(
        c,
        bins=bins,
        alpha=0.55,
        color=figures.COLORS[0],
        label=f"clean ({c.size})",
        histtype="stepfilled",
        weights=np.full(c.size, 1.0 / max(1, c.size)),
    )
    if a.size:
        ax.hist(
            a,
            bins=bins,
            alpha=0.55,
            color=figures.COLORS[1],
            label=f"attacked ({a.size})",
            histtype="stepfilled",
            weights=np.full(a.size, 1.0 / a.size),
        )
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="black", linewidth=1.2, linestyle="--", label="threshold")
    ax.set_title(title + (" (log axis)" if log_axis else ""), fontsize=10)
    ax.set_yticks([])
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7, frameon=False)


def _thresholds(info: dict[str, Any]) -> dict[str, float | None]:
    out = {d: finite(v.get("threshold")) for d, v in (info.get("detectors") or {}).items() if isinstance(v, dict)}
    out["combined"] = finite((info.get("combined") or {}).get("threshold"))
    return out


def _calibration(w: SectionWriter, info: dict[str, Any]) -> None:
    cal = info.get("calibration") or {}
    flag = info.get("clean_flag_rate") or {}
    swapped = info.get("clean_flag_rate_swapped_halves") or {}
    thr = _thresholds(info)
    rows = []
    for d, v in list((info.get("detectors") or {}).items()) + [("combined", info.get("combined") or {})]:
        v = v if isinstance(v, dict) else {}
        layers = v.get("layers") if isinstance(v.get("layers"), dict) else {}
        rows.append(
            [
                d,
                v.get("class", "max of -log10 p-values" if d == "combined" else "n/a"),
                ", ".join(f"{k} ({n})" for k, n in layers.items()) or "-",
                num(thr.get(d), 4),
                pct(flag.get(d)),
                pct(swapped.get(d)),
            ]
        )
    w.add(
        "<h3>Calibrated thresholds</h3>",
        f"<p>Each detector is fitted on clean training images and its threshold set for {esc(pct(cal.get('target_fpr'), 0))} false "
        f"positives on {esc(num(cal.get('n_calibration')))} clean held-out images; the flag rate is then measured on "
        f"{esc(num(cal.get('n_evaluation')))} other clean held-out images (and with the two halves swapped, to show the chance "
        "variation). A score above the threshold is flagged.</p>",
        table(["detector", "class", "layers (width)", "threshold", "clean flag rate", "halves swapped"], rows),
        w.cmd(["detectors_info.detectors", "detectors_info.combined", "detectors_info.clean_flag_rate"]),
    )


def _operating_figure(w: SectionWriter, dets: dict[str, Any], info: dict[str, Any], attacks: dict[str, Any]) -> None:
    """The operating-point table, with the target false-positive rate in its caption."""
    op_tab = operating_table(dets, attacks)
    if op_tab is None:
        return
    target = finite(((info.get("calibration") or {}) if info else {}).get("target_fpr"))
    w.add(
        figure(
            op_tab,
            "The operating point guard runs at: each detector's threshold is set for "
            f"{pct(target, 0) if target is not None else 'the target'} false positives on clean calibration images; "
            "the first row is the share of other clean held-out images it then flags (the realised false-positive rate), "
            "each further row the share of an attack's successful adversarial images it flags (the realised true-positive "
            "rate); each as a percentage with its exact 95% Clopper–Pearson interval and the number of images. "
            "The strength in brackets says how far the attack went past the decision boundary: minimal examples are "
            "the hardest to detect.",
            w.cmd(["detectors.DETECTOR.ATTACK.operating_point"]),
        )
    )


def _auroc_figure(w: SectionWriter, dets: dict[str, Any]) -> None:
    """The threshold-free AUROC table."""
    tab = auroc_table(dets)
    if tab is None:
        return
    w.add(
        figure(
            tab,
            "Threshold-free figures, read off the evaluation images' own ROC curve (no deployed flag has that threshold): "
            "AUROC per detector (rows) and attack (columns), with the true positive rate at 1% / 5% false positives "
            "under it. Green: the detector separates that attack from clean images; white: chance. Read a column to "
            "find which detector catches an attack, a row to see what a detector misses.",
            w.cmd(["detectors.DETECTOR.ATTACK.auroc", "tpr_at_1fpr", "tpr_at_5fpr"]),
        )
    )


def _roc_panels(w: SectionWriter, scores: dict[str, np.ndarray], names: list[str], attacks: list[str]) -> list[str]:
    """The ROC figure; returns the attacks left out of it (no successful images)."""
    uri, empty = _roc_figure(scores, names, attacks)
    none = f" No panel for {', '.join(attack_title(a) for a in empty)}: no successful images." if empty else ""
    if uri:
        w.add(
            figure(
                img(uri, "ROC curves per attack"),
                "ROC curves, one panel per attack (with its number of successful adversarial images), one line per detector "
                "(thick black: combined; the AUROCs are in the table above). Curves hugging the top-left corner separate "
                "the attack well; the dotted diagonal is chance; the dashed verticals mark 1% and 5% false positives."
                + none,
                w.cmd(["detectors"], ["detector_scores"]),
            )
        )
    return empty


def _combined_histograms(
    w: SectionWriter, scores: dict[str, np.ndarray], panels: list[str], threshold: float | None
) -> None:
    """The combined score of clean images against each attack's (one panel per attack in ``panels``)."""
    if not panels:
        return
    fig, axes = figures.grid(len(panels), cols=3, panel=(3.3, 2.4))
    for ax, a in zip(axes, panels):
        _hist(ax, scores["clean/combined"], scores[f"{a}/combined"], threshold, attack_short(a))
    w.add(
        figure(
            img(figures.to_uri(fig), "combined score histograms"),
            "The combined score of clean held-out images (blue) and of each attack's successful adversarial images (red), "
            "with the calibrated threshold (dashed): everything right of it is flagged. Little overlap = easy to catch. "
            "Each histogram sums to 1; a log axis is used when the attacked scores reach far beyond the clean ones.",
            w.cmd(["detectors_info.combined.threshold"], ["detector_scores"]),
        )
    )


def _detector_histograms(
    w: SectionWriter, scores: dict[str, np.ndarray], names: list[str], attacks: list[str], thr: dict[str, float | None]
) -> None:
    """Each single detector's score, clean against all attacks pooled."""
    singles = [d for d in names if d != "combined" and f"clean/{d}" in scores]
    if not singles:
        return
    fig, axes = figures.grid(len(singles), cols=3, panel=(3.3, 2.4))
    for ax, d in zip(axes, singles):
        pooled = [scores[f"{a}/{d}"] for a in attacks if f"{a}/{d}" in scores]
        adv = np.concatenate(pooled) if pooled else np.zeros(0)
        _hist(ax, scores[f"clean/{d}"], adv, thr.get(d), d)
    w.add(
        figure(
            img(figures.to_uri(fig), "per-detector score histograms"),
            "Each detector's own score, clean (blue) against all attacks' successful images pooled (red), with its "
            "threshold (dashed).",
            w.cmd(["detectors_info.detectors.DETECTOR.threshold"], ["detector_scores"]),
        )
    )


def _score_figures(w: SectionWriter, dets: dict[str, Any], info: dict[str, Any]) -> None:
    """The figures drawn from the detector_scores artifact: ROC curves, then score histograms."""
    names = [d for d in dets if isinstance(dets[d], dict)]
    attacks = list(dict.fromkeys(a for d in names for a in dets[d]))
    scores = w.artifact("detector_scores", "the ROC curves and score histograms")
    if scores is None:
        return
    empty = _roc_panels(w, scores, names, attacks)
    thr = _thresholds(info)
    panels = [a for a in attacks if a not in empty and f"{a}/combined" in scores and "clean/combined" in scores]
    _combined_histograms(w, scores, panels, thr.get("combined"))
    _detector_histograms(w, scores, names, attacks, thr)


def build(src: AuditFolder) -> Section | None:
    dets = src.section("detectors")
    if not isinstance(dets, dict) or not dets:
        return None
    info = src.section("detectors_info") if isinstance(src.section("detectors_info"), dict) else {}
    w = SectionWriter(src, "detectors", "Detectors")
    w.add(
        "<p>Each detector gives every input a score (higher = more suspicious). Positives: the attack's successful adversarial "
        'images; negatives: clean held-out images never used for fitting or calibration. "combined" is what '
        "<code>guard.wrap</code> flags with.</p>"
    )
    attacks_sec = src.section("attacks") if isinstance(src.section("attacks"), dict) else {}
    _operating_figure(w, dets, info, attacks_sec)
    _auroc_figure(w, dets)
    _score_figures(w, dets, info)
    if info:
        _calibration(w, info)
    return w.done()
