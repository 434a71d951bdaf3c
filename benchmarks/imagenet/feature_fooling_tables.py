"""Markdown tables of benchmarks/results/imagenet_feature_fooling.json beside the papers' figures (no compute).

Run: ``.venv/bin/python -m benchmarks.imagenet.feature_fooling_tables``. The papers' figures are
the ones the issue quotes (Sabour et al. 2016, CaffeNet FC7, delta 10/255, 100 pairs; Nguyen et
al. 2015, ImageNet AlexNet); a dash where this file does not transcribe one.

Not a benchmark: it measures nothing and only renders that results file (which carries its own
provenance) as markdown, so it prints and writes no results file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[1] / "results" / "imagenet_feature_fooling.json"
SABOUR = {
    "guide_agreement": "95%",
    "source_agreement": "0%",
    "distance_ratio_median": "mostly < 0.5",
    "guide_is_nearest_share": "often",
}
NGUYEN = {
    "cppn": "88.11% (5,000 generations)",
    "direct": "mostly failed",
    "gradient": ">= 99.99% for every class",
    "after_harden": "11.7%",
}


def pct(v: Any) -> str:
    if v is None:
        return "-"
    v = float(v)
    if 0.0 < v < 0.001:
        return f"{100 * v:.2g}%"
    return f"{100 * v:.3f}%" if 0.999 < v < 1.0 else f"{100 * v:.1f}%"


def med(d: Any) -> str:
    return "-" if not isinstance(d, dict) else f"{d['median']:.3g}"


def feature_table(data: dict[str, Any]) -> list[str]:
    rows = [
        "| layer | delta | pairs | guide agr. | source agr. | ratio median (p10-p90) | local-PPCA inlier | rel. log-lik a (held-out nbrs) "
        "| sine a (nbrs) | g nearest to a | 3-NN inters. | kNN rank diff | IoU a-g / a-s | s/pair |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fa = data.get("feature_adversary", {})
    for layer in fa:
        for delta in sorted(fa[layer], key=int):
            r = fa[layer][delta]
            rows.append(
                f"| `{layer}` | {delta}/255 | {r['n']} | {pct(r['guide_agreement'])} | {pct(r['source_agreement'])} | "
                f"{r['distance_ratio']['median']:.3f} ({r['distance_ratio']['p10']:.2f}-{r['distance_ratio']['p90']:.2f}) | "
                f"{pct(r['local_ppca_inlier_share'])} | {med(r['local_ppca_relative_loglik'])} ({med(r['local_ppca_heldout_relative_loglik'])}) | "
                f"{med(r['angular_sine_adv'])} ({med(r['angular_sine_heldout_neighbours'])}) | {pct(r['guide_is_nearest_share'])} | "
                f"{r['nn3_intersection_mean']:.2f} | {med(r['knn_rank_difference'])} | {med(r['iou_adv_guide'])} / {med(r['iou_adv_source'])} | "
                f"{r['seconds_per_pair']} |"
            )
    rows.append(
        f"| Sabour et al. (FC7) | 10/255 | 100 | {SABOUR['guide_agreement']} | {SABOUR['source_agreement']} | "
        f"{SABOUR['distance_ratio_median']} | inlier | - | - | {SABOUR['guide_is_nearest_share']} | - | - | - | - |"
    )
    var = data.get("feature_adversary_variants", {})
    if var:
        rows += [
            "",
            "| variant (penultimate, 10/255) | pairs | guide agr. | source agr. | ratio median | local-PPCA inlier | 3-NN inters. "
            "| IoU a-g | s/pair |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lb = fa.get("1._fc:input", {}).get("10")
        for name, r in ([("feature-opt (L-BFGS-B)", lb)] if lb else []) + list(var.items()):
            rows.append(
                f"| {name} | {r['n']} | {pct(r['guide_agreement'])} | {pct(r['source_agreement'])} | {r['distance_ratio_median']:.3f} | "
                f"{pct(r['local_ppca_inlier_share'])} | {r['nn3_intersection_mean']:.2f} | {med(r['iou_adv_guide'])} | {r['seconds_per_pair']} |"
            )
    return rows


def iterations_table(data: dict[str, Any]) -> list[str]:
    """The goal's configuration (penultimate, 10/255) on the same pairs at each L-BFGS-B budget."""
    base = data.get("feature_adversary", {}).get("1._fc:input", {}).get("10")
    more = data.get("feature_adversary_iterations", {})
    if not base or not more:
        return []
    rows = [
        "| L-BFGS-B iterations (penultimate, 10/255) | pairs | guide agr. | source agr. | ratio median (p10-p90) | local-PPCA inlier | s/pair |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in [base, *(more[k] for k in sorted(more, key=int))]:
        rows.append(
            f"| {r['max_iter']} | {r['n']} | {pct(r['guide_agreement'])} | {pct(r['source_agreement'])} | "
            f"{r['distance_ratio']['median']:.3f} ({r['distance_ratio']['p10']:.2f}-{r['distance_ratio']['p90']:.2f}) | "
            f"{pct(r['local_ppca_inlier_share'])} | {r['seconds_per_pair']} |"
        )
    return rows


def fooling_table(data: dict[str, Any]) -> list[str]:
    rows = [
        "| method | classes | generations x population | median best conf. | >= 99% | >= 99.99% | Nguyen et al. |",
        "|---|---|---|---|---|---|---|",
    ]
    fo = data.get("fooling", {})
    for key in ("gradient", "cppn", "direct", "after_harden"):
        r = fo.get(key)
        if not r or "median_conf" not in r:
            continue
        gp = f"{r['generations']} x {r['population']}" if "generations" in r else f"<= {r.get('max_steps')} Adam steps"
        rows.append(
            f"| {key} | {r['classes']} | {gp} | {pct(r['median_conf'])} | {pct(r['share_99'])} | {pct(r['share_9999'])} | {NGUYEN[key]} |"
        )
    return rows


def detector_table(data: dict[str, Any]) -> list[str]:
    det = data.get("detectors_tpr_at_1pct_fpr", {})
    sets = list(det.get("sets", {}))
    rows = ["| detector | " + " | ".join(f"{k} ({det['sets'][k]})" for k in sets) + " |", "|---|" + "---|" * len(sets)]
    for name, r in det.items():
        if isinstance(r, dict) and name not in ("sets",):
            rows.append(
                f"| {name} | "
                + " | ".join(r.get("error", "")[:60] if "error" in r else pct(r.get(k)) for k in sets)
                + " |"
            )
    return rows


def harden_table(data: dict[str, Any]) -> list[str]:
    runs = [
        (k, v["after_harden"], v["harden"])
        for k, v in data.items()
        if k.startswith("harden_run") and isinstance(v, dict)
    ]
    for key, h in (("after_harden", "harden"), ("after_harden_with_elites", "harden_with_elites")):
        if data.get("fooling", {}).get(key) and h in data:
            runs.append((f"fooling.{key}", data["fooling"][key], data[h]))
    rows = [
        "| run | classes (train / held-out images) | head rows trained | epochs, lr | fresh CPPN median best conf. before -> after "
        "| held-out top-1 before -> after | clean rejected after | round's fooling images rejected | fresh CPPN rejected |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r, h in runs:
        c = h["config"]
        rows_trained = "reject row only" if c.get("freeze_known_classes") else "all"
        rows.append(
            f"| `{name}` | {r['classes']} ({r['n_train']} / {r['n_held_out']}) | {rows_trained} | {c['epochs_per_round']}, {c['lr']} | "
            f"{pct(r['median_conf_before'])} -> {pct(r['median_conf'])} | "
            f"{pct(r['clean_top1_before'])} -> {pct(r['clean_top1_after'])} | {pct(r['clean_rejected_after'])} | "
            f"{pct(h['round']['rejected_share_of_round_attacks'])} | {pct(h['fresh_after'].get('rejected_share'))} |"
        )
    rows.append(
        "| Nguyen et al. (ImageNet AlexNet) | 1000 (ImageNet train) | all (whole net) | - | 88.1% -> 11.7% | - | - | - | - |"
    )
    return rows


def reevolve_table(data: dict[str, Any]) -> list[str]:
    """Nguyen's "evolve again" at a real budget: the same CPPN search against the original and the hardened model."""
    r = data.get("fooling", {}).get("reevolve_after_harden")
    if not r:
        return []
    b = r.get("original_model_same_run") or {}
    return [
        "| model | classes | generations x population | median best conf. | >= 99% | elites rejected |",
        "|---|---|---|---|---|---|",
        f"| EfficientNet-Lite0 (the evolve step's run at generation {b.get('generation', '-')}) | {r['classes']} | "
        f"{b.get('generation', '-')} x {r['population']} | {pct(b.get('median_conf'))} | - | - |",
        f"| hardened (`{r['harden_flags']}`) | {r['classes']} | {r['generations']} x {r['population']} | {pct(r['median_conf'])} | "
        f"{pct(r['share_99'])} | {pct(r['elites_rejected_share'])} |",
        "| Nguyen et al. (ImageNet AlexNet, before -> after retraining) | 1000 | - | 88.1% -> 11.7% | - | - |",
    ]


def subset_table(data: dict[str, Any]) -> list[str]:
    """The CPPN search over a seeded subset of classes (``--classes K``) against the full run, by
    children per cell: the same search, the same seed and population, fewer cells."""
    fo = data.get("fooling", {})
    rows = [
        "| run | cells | generations | children per cell | median best conf. (these classes) | classes >= 99.99% |",
        "|---|---|---|---|---|---|",
    ]
    for key, r in sorted(fo.items()):
        if not key.startswith("cppn_subset"):
            continue
        full = r.get("full_run_same_classes", {})
        if full:
            rows.append(
                f"| full run, its elites of the same {full.get('n', '-')} classes | 1000 | {full.get('generations', '-')} | "
                f"{full.get('children_per_cell', 0):g} | {pct(full.get('median_conf'))} | - |"
            )
        k, pop = r["classes"], r["population"]
        shown = [
            h for h in r.get("history", []) if h["generation"] in (1, 101, 401) or h["generation"] == r["generations"]
        ]
        for h in shown:
            g = h["generation"]
            rows.append(
                f"| subset (`{key}`) | {k} | {g} | {g * pop / k:g} | {pct(h['median_confidence'])} | {h['classes_fooled']}/{k} |"
            )
    return rows if len(rows) > 2 else []


def steps_table(data: dict[str, Any]) -> list[str]:
    rows = ["| step | wall s | CPU s | threads | peak RSS MiB | command |", "|---|---|---|---|---|---|"]
    for name, r in data.get("steps", {}).items():
        cmd = re.sub(r"^OMP_NUM_THREADS=\d+ \.venv/bin/python ", "", r["command"])
        rows.append(
            f"| {name} | {r['wall_s']} | {r['cpu_s']} | {r.get('threads', 1)} | {r['peak_rss_mib']} | `{cmd}` |"
        )
    return rows


def main() -> None:
    data = json.loads(RESULTS.read_text())
    for table in (
        feature_table,
        iterations_table,
        fooling_table,
        subset_table,
        detector_table,
        harden_table,
        reevolve_table,
        steps_table,
    ):
        print("\n".join(table(data)))
        print()


if __name__ == "__main__":
    main()
