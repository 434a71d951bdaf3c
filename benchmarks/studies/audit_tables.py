"""The BENCHMARKS.md tables of one audit, printed as markdown from its report.json.

Steps and seconds; gradient attacks; the patch fooling rate against area (PatchGAN, universal,
random) with its spread over placements, diversity (SSIM) and the class comparison; feature
adversaries per layer, variant and delta; fooling images; the adaptive evaluation; the export's
parity and latency. The detection table is ``benchmarks/studies/detection_table.py``'s.

Not a benchmark: it measures nothing and only renders a report.json (which carries its own
provenance) as markdown, so it prints and writes no results file.

    .venv/bin/python -m benchmarks.studies.audit_tables OUT/report.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * float(v):.1f}%"


def _e255(v: float) -> str:
    return f"{round(float(v) * 255)}/255" if float(v) < 0.2 else f"{float(v):g}"


def tables(r: dict[str, Any]) -> str:
    out: list[str] = []
    t = r.get("timings", {})
    out += ["| step | seconds |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in t.items()]
    out.append(f"| total | {sum(t.values()):.1f} |")
    m, d = r.get("model", {}), r.get("defaults", {})
    out.append(
        f"\nclean accuracy {m.get('clean_accuracy', float('nan')):.4f} on {m.get('data', {}).get('test')} held-out images; "
        f"defaults: {d.get('kind')} data, eps {_e255(d.get('eps', 0))}, work scale {d.get('work_scale', 1):.3f} "
        f"({d.get('macs_per_image', 0) / 1e6:.1f} M MACs per image)\n"
    )
    a = r.get("attacks", {})
    if "fgsm" in a:
        out.append(
            f"FGSM success {a['fgsm']['success_rate']:.3f}, PGD ({a['pgd']['params'].get('steps')} steps) "
            f"{a['pgd']['success_rate']:.3f} at eps {_e255(a['pgd']['params']['eps'])}\n"
        )
    if "patch_gan" in a:
        names = [n for n in ("patch_gan", "universal_patch", "random_patch") if n in a]
        areas = [c["area"] for c in a[names[0]]["curve"]]
        out += ["| area (side) | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for i, area in enumerate(areas):
            cells = [f"{a[n]['curve'][i]['mean']:.3f} ± {a[n]['curve'][i]['std']:.3f}" for n in names]
            out.append(f"| {area:.0%} ({a[names[0]]['curve'][i]['side']} px) | " + " | ".join(cells) + " |")
        pg = a["patch_gan"]
        div, cc = pg.get("diversity", {}), pg.get("class_comparison", {})
        out.append(
            f"\nmean ± std over {pg.get('curve_repetitions')} placements of {pg['curve'][0]['n']} held-out images; "
            f"PatchGAN above both baselines at every area: {pg.get('summary', {}).get('patch_gan_above_both_at_every_area')}; "
            f"PatchGAN diversity: median pairwise SSIM {div.get('ssim_median', float('nan')):.3f} over {div.get('n_patches')} "
            f"patches ({div.get('identical_pairs')} identical pairs); class comparison: a patched image takes the canvas "
            f"image's class {_pct(cc.get('patched_takes_canvas_class'))}, a fooled one {_pct(cc.get('fooled_takes_canvas_class'))}\n"
        )
    fa = a.get("feature_adversary")
    if fa:
        out.append(
            f"Feature adversary at {fa['layer']}, delta {_e255(fa['delta'])}, {fa['n']} images: guide-label agreement "
            f"{fa['guide_label_agreement']:.3f}, median distance ratio {fa['distance_ratio']['median']:.3f}; "
            f"inlier check (rank of the adversary among the guide class's training features, median): "
            f"{fa['representation']['rank_adv']['median']:.1f} vs the guide's own {fa['representation']['rank_guide']['median']:.1f}\n"
        )
        curves = fa.get("curves", {}).get("by_layer", {})
        deltas = sorted({float(k) for v in curves.values() for d in v.values() for k in d})
        out += [
            "| layer | variant | " + " | ".join(f"delta {_e255(x)}" for x in deltas) + " |",
            "|---|---|" + "---|" * len(deltas),
        ]
        for layer, per in curves.items():
            for variant, d in per.items():
                cells = [
                    f"{d[str(x)]['guide_label_agreement']:.2f} / {d[str(x)]['distance_ratio']['median']:.2f}"
                    if str(x) in d
                    else "-"
                    for x in deltas
                ]
                out.append(f"| {layer} | {variant} | " + " | ".join(cells) + " |")
        out.append(
            f"\n(guide-label agreement / median distance ratio, {fa['curves'].get('n')} images, "
            f"{fa['curves'].get('max_iter')} iterations)\n"
        )
    fool = [n for n in ("fooling_gradient", "fooling_direct", "fooling_cppn") if n in a]
    if fool:
        out += [
            "| method | classes at >= 99.99% (before the last polish) | median confidence | generations / steps | images | seconds |",
            "|---|---|---|---|---|---|",
        ]
        for n in fool:
            e = a[n]
            k = e.get("classes_attacked", 10)
            before = f" ({len(e['classes_fooled_before_polish'])}/{k})" if "classes_fooled_before_polish" in e else ""
            out.append(
                f"| {n} | {len(e['classes_fooled'])}/{k}{before} | {e['median_confidence']:.7f} | "
                f"{e.get('generation_all_fooled', e.get('steps'))} of {e.get('generations')} | {e['n']} | {e['seconds']:.1f} |"
            )
        out.append("")
    ad = r.get("adaptive")
    if isinstance(ad, dict) and ad.get("per_eps"):
        out += [
            "| eps | adaptive evasion | plain PGD evasion | flagged | images | seconds |",
            "|---|---|---|---|---|---|",
        ]
        out += [
            f"| {_e255(p['eps'])} | {_pct(p['evasion'])} | {_pct(p['oblivious_evasion'])} | {_pct(p['flagged'])} | {p['n']} | "
            f"{p['seconds']:.0f} |"
            for p in ad["per_eps"]
        ]
        out.append(f"\n({ad['steps']} steps, combined flag calibrated to {_pct(ad['fpr'])} FPR)\n")
    ex = r.get("export")
    if isinstance(ex, dict) and ex.get("parity"):
        worst = {k: v.get("max_abs") for k, v in ex["parity"].items() if "max_abs" in v}
        lat = ex.get("latency_ms", {})
        out.append(
            f"Export: {len(ex['outputs'])} outputs, heads {ex['heads']['exported']} (left out: {ex['heads']['left_out'] or 'none'}), "
            f"{ex['file_bytes'] / 1e6:.1f} MB; parity max abs "
            + ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
            + f"; flags identical except calibration-borderline: {ex.get('flags_identical_except_borderline')}; "
            "onnxruntime / eager latency "
            + ", ".join(f"{b} {v['ratio']:.2f}" for b, v in lat.items() if isinstance(v, dict))
        )
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("report")
    args = p.parse_args()
    print(tables(json.loads(Path(args.report).read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
