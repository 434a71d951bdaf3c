"""The feature-adversary sweep: delta x layer x variant on the demo model (the "must show" table).

For each layer (conv2, fc1), variant (lbfgs, feature-fgrad, feature-linear, label-opt) and delta
(0.05, 0.1, 0.2, 0.3): guide-label agreement and the distance-ratio median / p10 / p90 over
``--n`` test sources with guides of another true class from the test split (seeded, disjoint
from the sources). For the L-BFGS result also the kNN analysis against the training split
(3-NN intersection, rank difference) and the IoU of active units. Prints a Markdown table.
Writes benchmarks/results/sweep_feature_adversary.json:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.studies.sweep_feature_adversary [--n 100] [--max-iter 50]
"""

from __future__ import annotations

import argparse
import json
import time

import guard
from benchmarks.fixtures.timing import out_option, pin_threads
from guard.attacks.representation import representation_report
from guard.audit.features import _pick, feature_curves
from guard.core.provenance import write_results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--max-iter", type=int, default=50)
    ap.add_argument("--layers", nargs="+", default=["conv2", "fc1"])
    ap.add_argument("--deltas", nargs="+", type=float, default=[0.05, 0.1, 0.2, 0.3])
    ap.add_argument("--seed", type=int, default=0)
    out_option(ap, "sweep_feature_adversary")
    args = ap.parse_args()
    pin_threads(1)
    model = guard.demo_model(progress=False)
    train, test = guard.demo_data()
    t0 = time.perf_counter()
    curves = feature_curves(
        model, test, layers=args.layers, deltas=args.deltas, n=args.n, max_iter=args.max_iter, seed=args.seed
    )
    print(
        f"n={curves['n']} sources, max_iter={args.max_iter}, guides: {curves['guides']}; {time.perf_counter() - t0:.0f} s\n"
    )
    print("| layer | variant | delta | guide-label agreement | distance ratio median | p10 | p90 | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for layer, by_var in curves["by_layer"].items():
        for variant, by_delta in by_var.items():
            for delta, r in by_delta.items():
                d = r["distance_ratio"]
                print(
                    f"| {layer} | {variant} | {delta} | {r['guide_label_agreement']:.2f} | {d['median']:.3f} | {d['p10']:.3f} | {d['p90']:.3f} | {r['seconds']:.1f} |"
                )
    from guard.attacks.feature_adversary import FeatureAdversary

    src, gid = _pick(test, args.n, args.seed)
    knn_rows = []
    print(
        "\n| layer | delta | 3-NN intersection mean | rank diff median (p10, p90) | rank adv median | rank guide median | IoU(adv, guide) | IoU(adv, source) | IoU(source, guide)* |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for layer in args.layers:
        for delta in args.deltas:
            res = FeatureAdversary(layer=layer, delta=delta, max_iter=args.max_iter).generate(
                model, test.x[src], test.x[gid]
            )
            s = representation_report(
                model, layer, test.x[src], res.x_adv, test.x[gid], train_x=train.x, train_y=train.y
            )["summary"]
            base = representation_report(model, layer, test.x[src], test.x[src], test.x[gid])["summary"]
            rd = s["rank_difference"]
            knn_rows.append({"layer": layer, "delta": delta, "summary": s, "baseline_source_as_adversary": base})
            print(
                f"| {layer} | {delta} | {s['nn_intersection']['mean']:.2f} | {rd['median']:.1f} ({rd['p10']:.1f}, {rd['p90']:.1f}) | "
                f"{s['rank_adv']['median']:.1f} | {s['rank_guide']['median']:.1f} | {s['iou_adv_guide']['median']:.2f} | "
                f"{s['iou_adv_source']['median']:.2f} | {base['iou_adv_guide']['median']:.2f} |"
            )
    print("\n*IoU(source, guide): the same measure with the unperturbed source in place of the adversary (baseline).")
    write_results(
        args.out,
        json.loads(
            json.dumps(
                {
                    "model": "guard.demo_model('mnist') (DemoNet)",
                    "n": args.n,
                    "max_iter": args.max_iter,
                    "layers": args.layers,
                    "deltas": args.deltas,
                    "seed": args.seed,
                    "threads": 1,
                    "curves": curves,
                    "representation": knn_rows,
                },
                default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v),
            )
        ),
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
