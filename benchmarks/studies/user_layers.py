"""Which features the detectors see: a user's CIFAR ResNet-20 before and after default layers came from the graph.

The model is issue 19's: a user's own ResNet-20 module (akamaster's pretrained weights, a
Normalize layer in front, ``nn.AdaptiveAvgPool2d`` + ``nn.Flatten`` + ``linear``), given as
``module:callable``; the data is the embedded CIFAR-10 split (8,000 to fit, 2,000 held out:
1,000 calibrate, 1,000 evaluate). Two configurations of ``guard.wrap``, the same code:

* **before** (the landed commit's choice): the children with parameters before the head
  (``conv1, bn1, layer1, layer2, layer3``), kNN rank and consistency on the last two
  (``layer2``, ``layer3``, flattened: 8,192 and 4,096 values), saliency with a 6-pixel window,
  1-bit squeezing; PPCA left out (it needed 68.7 GB there);
* **after**: ``guard.wrap(model)`` as it comes (layers read from the forward pass and pooled,
  windows and bit depth from the data);
* **anchors**: the issue's own check (a Mahalanobis score on the pooled 64-d head input alone,
  class-conditional with a tied covariance) beside guard's Mahalanobis and LID anchors on their
  default layers (every stage, pooled) — to see whether the detector or the features decide.

Printed: each detector's TPR at 5% FPR (ROC) and share flagged at its threshold calibrated to 5%
FPR, on the successful FGSM and PGD examples at 8/255.

Writes benchmarks/results/user_layers.json:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.studies.user_layers --module benchmarks/fixtures/user_cifar_resnet20.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time

import torch

import guard
from benchmarks.fixtures.timing import out_option, pin_threads
from guard.attacks import FGSM, LinfPGD
from guard.core.features import default_feature_layers
from guard.core.provenance import write_results
from guard.detectors import (
    BitDepthSqueeze,
    KNNConsistency,
    KNNRank,
    LIDDetector,
    MahalanobisDetector,
    SaliencyConcentration,
)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--module", required=True, help="a .py file with build() -> the user's model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--eval", type=int, default=1000, help="held-out images evaluated (after the 1,000 calibration images)"
    )
    p.add_argument("--fit", type=int, default=0, help="training images the detectors are fitted on (0: all 8,000)")
    out_option(p, "user_layers")
    args = p.parse_args()
    pin_threads(args.threads)
    spec = importlib.util.spec_from_file_location("user_model", args.module)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    model = mod.build().eval()
    train, test = guard.demo_data("cifar10")
    perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(5))
    cal, ev = (
        test.x[perm[:1000]],
        guard.Split(test.x[perm[1000 : 1000 + args.eval]], test.y[perm[1000 : 1000 + args.eval]]),
    )
    if args.fit:
        train = guard.Split(train.x[: args.fit], train.y[: args.fit])
    attacks = {
        "fgsm": FGSM(eps=8 / 255)(model, ev.x, ev.y),
        "pgd": LinfPGD(eps=8 / 255, steps=40, seed=0)(model, ev.x, ev.y),
    }
    prefix = "1." if isinstance(model, torch.nn.Sequential) else ""
    before = {
        "knn": KNNRank([prefix + "layer2", prefix + "layer3"]),
        "knn_consistency": KNNConsistency([prefix + "layer2", prefix + "layer3"]),
        "saliency": SaliencyConcentration(window=6),
        "squeeze": BitDepthSqueeze(bits=1),
    }
    out = {}
    head = default_feature_layers(model, test.x[:2])
    anchors = {
        "mahalanobis_head": MahalanobisDetector([head[-1]]),
        "mahalanobis": MahalanobisDetector(head),
        "lid": LIDDetector(head),
    }
    for name, g in (
        ("before", guard.wrap(model, before, pool="flatten")),
        ("after", guard.wrap(model)),
        ("anchors", guard.wrap(model, anchors)),
    ):
        t0 = time.perf_counter()
        g.fit(train).calibrate(cal, fpr=0.05)
        rep = guard.evaluate(g, ev.x, attacks)
        out[name] = {
            "layers": g.describe(),
            "left_out": g.left_out_,
            "seconds": round(time.perf_counter() - t0, 1),
            "tpr_at_5fpr": {d: {a: rep[d][a]["tpr_at_5fpr"] for a in attacks} for d in rep},
            "flagged_at_calibrated_5fpr": {d: {a: rep[d][a].get("tpr_at_threshold") for a in attacks} for d in rep},
        }
        print(
            f"{name}: "
            + "  ".join(f"{d}: FGSM {v['fgsm']:.3f} PGD {v['pgd']:.3f}" for d, v in out[name]["tpr_at_5fpr"].items())
        )
    out["attack_success"] = {a: r.success_rate for a, r in attacks.items()}
    out = json.loads(
        json.dumps(
            {
                "module": args.module,
                "threads": args.threads,
                "fit_images": len(train),
                "calibration_images": len(cal),
                "eval_images": len(ev.x),
                **out,
            },
            default=str,
        )
    )  # non-JSON params as str
    print(json.dumps(out, indent=1))
    write_results(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
