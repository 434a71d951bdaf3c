"""The adaptive attacker against the audit's guarded model: misclassification and evasion per budget (issue 34).

The guarded model is built as ``guard audit`` builds it (:mod:`guard.audit.detectors`: the five
default detectors and the Mahalanobis / LID anchors in the flag, the "weighted" combiner,
fitted on the demo's training images, calibrated at 5% FPR on the calibration half of the
held-out images); :func:`guard.adaptive_eval.evaluate_adaptive` then attacks the first ``--n``
images of the evaluation half with :class:`guard.attacks.AdaptiveEnsemble` (plain PGD,
AdaptivePGD at each ``--weights`` with ``--restarts`` starts, orthogonal and selective PGD,
logit matching with guides from the rest of the evaluation half) at each budget. Writes
``benchmarks/results/adaptive_<demo>.json`` through :func:`guard.core.provenance.write_results`,
rewritten after each budget (largest first; ``"complete"`` says whether every budget ran).
The settings below are small (few images and steps) because the run shared two cores with
several training jobs; the intervals in the file say how little n = 16 pins down.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.studies.adaptive_eval --demo mnist --quick --n 16 --steps 10 --restarts 1
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.studies.adaptive_eval --demo cifar10 --quick --n 8 --steps 10 --restarts 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import guard
from guard.adaptive_eval import default_budgets, evaluate_adaptive
from guard.audit.detectors import ANCHORS, COMBINE, FPR, split_heldout
from guard.core.data import Split
from guard.core.provenance import write_results
from guard.guarded import DEFAULT_DETECTORS, proxy_inputs

RESULTS = Path(__file__).resolve().parents[1] / "results"


def guarded_as_the_audit_builds_it(
    model: torch.nn.Module, train: Split, test: Split, seed: int, quick: bool = False
) -> tuple[guard.GuardedModel, torch.Tensor]:
    """(the calibrated GuardedModel, the evaluation-half indices of ``test``); ``quick`` as
    ``guard audit --quick``: 1,000 training images, halves of at most 256."""
    if quick and len(train) > 1000:
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:1000]
        train = Split(train.x[idx], train.y[idx])
    guarded = guard.wrap(model, [*DEFAULT_DETECTORS, *ANCHORS], combine=COMBINE).fit(train)
    cal, ev = split_heldout(len(test), seed)
    if quick:
        cal, ev = cal[:256], ev[:256]
    _, scores, errors = guarded.score(test.x[cal])
    proxy = guarded.score(proxy_inputs(test.x[cal], seed=seed))[1] if guarded.combine == "weighted" else None
    guarded.calibrate_scores(scores, FPR, errors=errors, proxy_scores=proxy)
    return guarded, ev


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", choices=["mnist", "cifar10"], default="mnist")
    ap.add_argument("--n", type=int, default=100, help="images attacked per budget")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--restarts", type=int, default=2)
    ap.add_argument("--weights", type=float, nargs="+", default=[0.1, 1.0, 10.0])
    ap.add_argument(
        "--eps", type=float, nargs="+", default=None, help="default: 0.1 0.2 0.3 (MNIST), 2 4 8 / 255 (CIFAR-10)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--quick", action="store_true", help="the guarded model of guard audit --quick (1,000 training images)"
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = guard.demo_model(args.demo, progress=False).eval()
    train, test = guard.demo_data(args.demo)
    guarded, ev = guarded_as_the_audit_builds_it(model, train, test, args.seed, quick=args.quick)
    t_fit = time.perf_counter() - t0
    data = Split(test.x[ev], test.y[ev])
    out = args.out or RESULTS / f"adaptive_{args.demo}.json"
    budgets = args.eps or default_budgets(test.x)[0]
    per_eps: list[dict] = []
    # budgets from the largest down, the results file rewritten after each: a run cut short keeps what it finished
    for e in sorted(budgets, reverse=True):
        rep = evaluate_adaptive(
            guarded,
            data,
            eps=[e],
            steps=args.steps,
            n=args.n,
            seed=args.seed,
            weights=args.weights,
            restarts=args.restarts,
        )
        per_eps = sorted(per_eps + rep["per_eps"], key=lambda p: p["eps"])
        rep = {**rep, "eps": max(budgets), "per_eps": per_eps, "budgets_planned": sorted(budgets)}
        head = next((p for p in per_eps if p["eps"] == max(budgets)), None)
        rep["evasion"], rep["misclassified"] = (head["evasion"], head["misclassified"]) if head else (None, None)
        figures = {
            "demo": args.demo,
            "detectors": list(guarded.detectors),
            "flag_with": list(guarded.combined.names_),
            "combine": guarded.combine,
            "calibration_fpr": FPR,
            "quick": args.quick,
            "threads": args.threads,
            "fit_seconds": round(t_fit, 1),
            "total_seconds": round(time.perf_counter() - t0, 1),
            "complete": len(per_eps) == len(budgets),
            "adaptive": rep,
        }
        write_results(out, figures)
        x = per_eps[[p["eps"] for p in per_eps].index(e)]
        print(
            f"{args.demo}: n={rep['n']} (correct clean {rep['n_correct']}), steps {rep['steps']}, restarts {rep['restarts']}, "
            f"weights {rep['weights']}, eot {rep['eot']}",
            flush=True,
        )
        print(
            f"  eps {x['eps']:.4f}: misclassified {x['misclassified']:.3f} {x['misclassified_ci95']}, evasion {x['evasion']:.3f} "
            f"{x['evasion_ci95']} (correct-clean {x['evasion_correct']}), plain PGD evasion {x['oblivious_evasion']:.3f} "
            f"(full-step {x['oblivious_full_evasion']:.3f}), {x['seconds']} s",
            flush=True,
        )
        for name, fig in x["per_member"].items():
            print(f"      {name:18s} misclassified {fig['misclassified']:.3f} evasion {fig['evasion']:.3f}", flush=True)
    print("wrote", out)


if __name__ == "__main__":
    main()
