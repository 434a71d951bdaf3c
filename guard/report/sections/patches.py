"""Section "Patches": the generated patches, patched examples, fooling vs area, the class comparison."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from guard.core.registry import attack_names
from guard.report import figures
from guard.report.html import figure, img, strip_table, table, tile_rows
from guard.report.sections.common import Section, SectionWriter, image_row
from guard.report.sections.gradient import attack_examples
from guard.report.source import AuditFolder
from guard.report.text import attack_title, finite, num, pct, seconds

__all__ = ["build"]

NAMES = attack_names(kind="patch")
N_PATCHES = 20


def _curve(w: SectionWriter, entries: dict[str, dict[str, Any]]) -> None:
    series = []
    for n, e in entries.items():
        pts = [p for p in (e.get("curve") or []) if isinstance(p, dict) and finite(p.get("area")) is not None]
        if pts:
            series.append(
                (
                    attack_title(n),
                    [p["area"] for p in pts],
                    [finite(p.get("mean")) or 0.0 for p in pts],
                    [finite(p.get("std")) or 0.0 for p in pts],
                )
            )
    if not series:
        return
    reps = next((e.get("curve_repetitions") for e in entries.values() if e.get("curve_repetitions")), None)
    uri = figures.line_plot(
        series,
        xlabel="patch area (share of the image)",
        ylabel="fooling rate",
        xpercent=True,
        ylim=(0.0, max(0.05, min(1.0, 1.1 * max(max(s[2]) + max(s[3]) for s in series)))),
    )
    w.add(
        figure(
            img(uri, "fooling rate against patch area"),
            f"Fooling rate against patch area: one attack trained per area, evaluated at random positions on the held-out "
            f"images (mean and band of +-1 std over {reps or 'several'} draws). A learned patch is worth something where its "
            "line is above the random noise patch's.",
            w.cmd([f"attacks.{n}.curve" for n in entries]),
        )
    )


def _patch_tiles(w: SectionWriter, entries: dict[str, dict[str, Any]]) -> None:
    rows = []
    for n in entries:
        art = w.src.artifact(f"attack_{n}")
        if art is None:
            continue  # attack_examples below notes the missing artifact
        patches = art.get("patches")
        if patches is None and "patch" in art:
            patches = art["patch"]
        if patches is None:
            w.artifact(
                f"attack_{n}",
                f"the {attack_title(n)} patches",
                needs=("patches" if n != "universal_patch" else "patch",),
            )
            continue
        patches = np.asarray(patches)
        if patches.ndim == 3:
            patches = patches[None]
        rows.append(image_row(attack_title(n), patches[: N_PATCHES if n == "patch_gan" else 8]))
    if rows:
        w.add(
            figure(
                tile_rows(rows),
                "The patches themselves, enlarged: PatchGAN draws a new patch for every image (the first "
                f"{N_PATCHES} shown; similar patches mean low diversity), the universal patch is one patch for all images, the "
                "random patches are uniform noise.",
                w.cmd([], [f"attack_{n}" for n in entries]),
            )
        )


def _class_comparison(w: SectionWriter, entries: dict[str, dict[str, Any]], image_hw: tuple[int, int] | None) -> None:
    ccs = {n: e["class_comparison"] for n, e in entries.items() if isinstance(e.get("class_comparison"), dict)}
    if not ccs:
        return
    rows = [
        [
            attack_title(n),
            num(c.get("positions")),
            num(c.get("pairs")),
            pct(c.get("fooling_rate")),
            pct(c.get("patched_takes_canvas_class")),
            pct(c.get("fooled_takes_canvas_class")),
        ]
        for n, c in ccs.items()
    ]
    w.add(
        "<h3>Class comparison</h3><p>Each patch is put alone on a black canvas and on every image, on a grid of positions: does "
        "the patched image take the class the model gives the patch alone? A high share among the fooled pairs means the "
        "patch works by looking like its own class, not by confusing the model.</p>",
        table(
            [
                "patch",
                "positions",
                "(image, position) pairs",
                "fooling rate",
                "patched image takes the patch's class",
                "... among the fooled pairs",
            ],
            rows,
        ),
        w.cmd([f"attacks.{n}.class_comparison" for n in ccs]),
    )
    maps = []
    for n, c in ccs.items():
        per = [finite(v) or 0.0 for v in (c.get("fooling_rate_per_position") or [])]
        side, stride = finite(entries[n].get("side")), finite(c.get("stride"))
        shape = None
        if image_hw and side and stride:
            r = len(range(0, image_hw[0] - int(side) + 1, int(stride)))
            q = len(range(0, image_hw[1] - int(side) + 1, int(stride)))
            shape = (r, q) if r * q == len(per) else None
        if shape is None and per and math.isqrt(len(per)) ** 2 == len(per):
            shape = (math.isqrt(len(per)),) * 2
        if shape:
            maps.append((n, np.asarray(per).reshape(shape)))
    if maps:
        fig, axes = figures.grid(len(maps), cols=len(maps), panel=(2.6, 2.5), top=0.3, bottom=0.1)
        for ax, (n, m) in zip(axes, maps):
            figures.heatmap(ax, m, attack_title(n), vmax=max(0.05, float(m.max())))
        w.add(
            figure(
                img(figures.to_uri(fig), "fooling rate per patch position"),
                "Fooling rate per patch position (the image's grid of positions, top left = top left of the image): where on "
                "the image a patch does its damage.",
                w.cmd([f"attacks.{n}.class_comparison.fooling_rate_per_position" for n, _ in maps]),
            )
        )


def _overview(w: SectionWriter, entries: dict[str, dict[str, Any]]) -> None:
    """One table row per patch attack: area, side, success, images, time."""
    rows = []
    for n, e in entries.items():
        rows.append(
            [
                attack_title(n),
                pct(e.get("area"), 0),
                f"{num(e.get('side'))} px",
                pct(e.get("success_rate")),
                pct(e.get("success_rate_on_correct")),
                num(e.get("n")),
                seconds(e.get("seconds")),
            ]
        )
    w.add(
        table(
            [
                "patch",
                "area",
                "side",
                "success (all)",
                "success (correctly classified)",
                "images",
                "time (fit + apply)",
            ],
            rows,
        ),
        w.cmd([f"attacks.{n}" for n in entries]),
    )


def _gan_summary(w: SectionWriter, entries: dict[str, dict[str, Any]]) -> None:
    """One sentence: does PatchGAN beat both baselines at every area, and its best rate at <= 10% area."""
    summary = (entries.get("patch_gan") or {}).get("summary")
    if isinstance(summary, dict) and "patch_gan_above_both_at_every_area" in summary:
        beats = summary["patch_gan_above_both_at_every_area"]
        w.add(
            f"<p>PatchGAN {'beats' if beats else 'does not beat'} both baselines at every area; its best fooling rate at an area of "
            f"at most 10% is {pct(summary.get('patch_gan_best_fooling_at_area_le_10pct'))}.</p>"
        )


def _patched_examples(w: SectionWriter, entries: dict[str, dict[str, Any]], ex: dict | None) -> None:
    """The first held-out images with each patch, under one clean row."""
    strips = []
    for n in entries:
        got = attack_examples(w, n, ex, perturb=False, what=attack_title(n), successes_first=False)
        if strips and got and got[0].heading == "clean":
            got = got[1:]  # one clean row on top
        strips.extend(got)
    if strips:
        w.add(
            figure(
                strip_table(strips),
                "The first held-out images with each patch at the largest area, at a random position; "
                "a red caption 'a → b' means the patch changed the model's label from a to b.",
                w.cmd([f"attacks.{n}" for n in entries], [f"attack_{n}" for n in entries] + ["examples"]),
            )
        )


def _diversity(w: SectionWriter, entries: dict[str, dict[str, Any]]) -> None:
    """Pairwise similarity of each attack's generated patches."""
    div = {n: e["diversity"] for n, e in entries.items() if isinstance(e.get("diversity"), dict)}
    if not div:
        return
    w.add(
        "<h3>Diversity</h3>",
        table(
            ["patches", "pairs", "median SSIM", "median PSNR (dB)", "identical pairs"],
            [
                [
                    attack_title(n),
                    num(d.get("n_pairs")),
                    num(d.get("ssim_median")),
                    num(d.get("psnr_median")),
                    num(d.get("identical_pairs")),
                ]
                for n, d in div.items()
            ],
        ),
        "<p>Pairwise similarity of the generated patches: SSIM near 1 means the generator draws the same patch every time.</p>",
        w.cmd([f"attacks.{n}.diversity" for n in div]),
    )


def build(src: AuditFolder) -> Section | None:
    entries = {n: src.attack(n) for n in NAMES if src.attack(n)}
    if not entries:
        return None
    w = SectionWriter(src, "patches", "Patches")
    w.add(
        "<p>A small visible square pasted onto the image at a random place: PatchGAN (G2LVAP) generates one per image, the "
        "universal patch is one learned square, the random noise patch is the baseline.</p>"
    )
    _overview(w, entries)
    _gan_summary(w, entries)
    _curve(w, entries)
    _patch_tiles(w, entries)
    ex = w.src.artifact("examples")
    _patched_examples(w, entries, ex)
    hw = tuple(int(s) for s in ex["x"].shape[-2:]) if ex is not None and "x" in ex else None
    _class_comparison(w, entries, hw)  # type: ignore[arg-type]
    _diversity(w, entries)
    return w.done()
