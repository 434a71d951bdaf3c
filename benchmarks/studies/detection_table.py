"""Print the detector x attack table of a report.json written by ``guard audit``.

Run: ``guard audit --demo --no-export --out OUT`` then
``.venv/bin/python -m benchmarks.studies.detection_table OUT/report.json``.

Not a benchmark: it measures nothing and only renders a report.json (which carries its own
provenance) as markdown, so it prints and writes no results file.
"""

from __future__ import annotations

import json
import sys

ATTACKS = [
    "patch_gan",
    "universal_patch",
    "random_patch",
    "fgsm",
    "pgd",
    "feature_adversary",
    "fooling_gradient",
    "fooling_direct",
    "fooling_cppn",
]


def _cell(e: dict | None) -> str:
    if not e or e.get("auroc") is None:
        return "n/a"
    return f"{e['auroc']:.3f} / {e['tpr_at_1fpr']:.3f}"


def main(path: str) -> None:
    r = json.load(open(path))
    d = r["detectors"]
    dets = [k for k in d if k != "combined"] + (["combined"] if "combined" in d else [])
    atts = [a for a in ATTACKS if a in d.get("knn", d[dets[0]])]
    print("AUROC / TPR at 1% FPR (successful adversarials as positives)\n")
    print("| attack (n_pos) | " + " | ".join(dets) + " |")
    print("|---|" + "---|" * len(dets))
    for a in atts:
        print(f"| {a} ({d[dets[0]][a]['n_pos']}) | " + " | ".join(_cell(d[k].get(a)) for k in dets) + " |")
    info = r.get("detectors_info", {})
    pl = info.get("knn_per_layer", {})
    if pl:
        layers = list(pl)
        print("\nkNN rank per layer alone (AUROC / TPR at 1% FPR):\n")
        print("| attack | " + " | ".join(layers) + " | knn |")
        print("|---|" + "---|" * (len(layers) + 1))
        for a in atts:
            print(
                f"| {a} | " + " | ".join(_cell(pl[layer].get(a)) for layer in layers) + f" | {_cell(d['knn'].get(a))} |"
            )
    if "clean_flag_rate" in info:
        print("\n| detector | clean flag rate (eval half) | halves swapped | mean |")
        print("|---|---|---|---|")
        for k in dets:
            print(
                f"| {k} | {info['clean_flag_rate'][k]:.3f} | {info['clean_flag_rate_swapped_halves'][k]:.3f} | "
                f"{info['clean_flag_rate_mean_of_both'][k]:.4f} |"
            )
        print(
            f"\nclean accuracy: bare {info['clean_accuracy_bare']:.4f}, wrapped {info['clean_accuracy_wrapped']:.4f}, "
            f"identical predictions: {info['predictions_identical']}; seconds: {info['seconds']}"
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out/report.json")
