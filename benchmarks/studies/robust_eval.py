"""Robust accuracy of a demo (or the user's) model under AutoAttack's components, RobustBench-style.

:func:`guard.evaluate_robust` on the first ``--n`` held-out images of the embedded data (the
demo split's test part: images the demo models were not trained on), at ``--eps``; with
``--sweep`` also :func:`guard.robust_sweep` over the budgets given (its monotonicity and
reach-zero checks). Writes the figures through ``guard.core.provenance.write_results`` to
benchmarks/results/robust_eval_<data>_<model>.json (``--out``).

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.studies.robust_eval --model demo --data cifar10 --eps 8/255 --n 200 \
        --sweep 0,1/255,2/255,4/255,8/255,0.5 --sweep-n 100
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.studies.robust_eval --model demo --data mnist --eps 0.3 --n 500 \
        --sweep 0,0.05,0.1,0.2,0.3,0.5

``--model``: ``demo`` (the shipped standard model of ``--data``), ``demo-robust`` (the hardened
variant, ``guard.demo_model(data, variant="robust")``, where it is shipped), a saved
RejectClassifier ``.safetensors`` (around the demo model of ``--data``), or any spec
``guard.load_model`` takes (TorchScript, ``.pt2``, ``module:callable``).
"""

from __future__ import annotations

import argparse
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]


def parse_eps(text: str) -> float:
    """``"8/255"`` or ``"0.3"``."""
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError) as err:
        raise argparse.ArgumentTypeError(f"eps must be a number or a fraction such as 8/255; got {text!r}.") from err


def load(spec: str, data: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    import guard
    from guard.training import RejectClassifier

    if spec == "demo":
        model = guard.demo_model(data)
    elif spec == "demo-robust":
        try:
            model = guard.demo_model(data, variant="robust")  # type: ignore[call-arg]
        except TypeError as err:
            raise SystemExit(f"--model demo-robust: this guard ships no hardened demo model yet ({err}).") from err
    elif spec.endswith(".safetensors"):
        model = RejectClassifier.load(spec, guard.demo_model(data))
    else:
        model = guard.load_model(spec)
    meta = getattr(model, "guard_meta", {}) or {}
    info = {
        "spec": spec,
        "class": type(model).__name__,
        "sha256": meta.get("sha256"),
        "test_accuracy_recorded": meta.get("test_accuracy"),
    }
    return model.eval(), info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", default="demo", help="demo | demo-robust | PATH (RejectClassifier .safetensors or a load_model spec)"
    )
    p.add_argument("--data", default="cifar10", choices=["cifar10", "mnist"])
    p.add_argument("--eps", type=parse_eps, default=None, help="L-inf budget (default 8/255 on cifar10, 0.3 on mnist)")
    p.add_argument("--n", type=int, default=500, help="held-out images evaluated (the first n)")
    p.add_argument("--budget", default="standard", choices=["standard", "cpu", "quick"])
    p.add_argument("--restarts", type=int, default=None, help="restarts of guard's APGD (default: the budget's)")
    p.add_argument("--attacks", default=None, help="comma-separated names (default: every one that applies)")
    p.add_argument("--sweep", default=None, help="comma-separated budgets for robust_sweep, e.g. 0,2/255,8/255,0.5")
    p.add_argument("--sweep-budget", default="quick", choices=["standard", "quick"])
    p.add_argument(
        "--sweep-attacks",
        default="guard-apgd-ce,apgd-ce,guard-apgd-reject",
        help="the sweep's attacks (default the white-box APGDs; guard-apgd-reject only on a reject model)",
    )
    p.add_argument("--sweep-n", type=int, default=None, help="images in the sweep (default --n)")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--out", default=None, help="results JSON (default benchmarks/results/robust_eval_<data>_<model>.json)"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import guard
    from guard.core.provenance import write_results

    eps = args.eps if args.eps is not None else {"cifar10": 8 / 255, "mnist": 0.3}[args.data]
    model, info = load(args.model, args.data)
    _, test = guard.demo_data(args.data)
    attacks = args.attacks.split(",") if args.attacks else None
    t0 = time.perf_counter()
    result = guard.evaluate_robust(
        model,
        test,
        eps=eps,
        n=args.n,
        attacks=attacks,
        seed=args.seed,
        restarts=args.restarts,
        batch_size=args.batch_size,
        budget=args.budget,
    )
    figures: dict[str, Any] = {
        "data": args.data,
        "data_source": guard.demo.demo_source(args.data),
        "model": info,
        "threads": args.threads,
        **{
            k: result[k]
            for k in (
                "eps",
                "n",
                "clean_accuracy",
                "clean_rejected",
                "robust_accuracy",
                "robust_accuracy_with_rejection",
                "attacks",
            )
        },
        "result": result,
    }
    if args.sweep:
        budgets = [parse_eps(t) for t in args.sweep.split(",")]
        sweep_attacks = [a for a in args.sweep_attacks.split(",") if a != "guard-apgd-reject" or result["reject_model"]]
        sweep = guard.robust_sweep(
            model,
            test,
            budgets,
            n=args.sweep_n or args.n,
            attacks=sweep_attacks,
            seed=args.seed,
            batch_size=args.batch_size,
            budget=args.sweep_budget,
        )
        figures["sweep"] = {k: v for k, v in sweep.items() if k != "results"}
        figures["sweep"]["per_attack"] = [r["per_attack"] for r in sweep["results"]]
        figures["sweep"]["budget"] = sweep["results"][0]["budget"]
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    name = args.model if args.model in ("demo", "demo-robust") else Path(args.model).stem
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"robust_eval_{args.data}_{name}.json"
    write_results(out, figures)
    print(
        f"{args.data} {args.model} eps={eps:.4g} n={result['n']}: clean {result['clean_accuracy']:.3f}, "
        f"rejected {result['clean_rejected']:.3f}, robust {result['robust_accuracy']:.3f}, "
        f"robust with rejection {result['robust_accuracy_with_rejection']:.3f} "
        f"(95% CI {result['intervals']['robust_accuracy_with_rejection']}); {figures['seconds']} s -> {out}"
    )
    for w in result["warnings"] + figures.get("sweep", {}).get("warnings", []):
        print("warning:", w, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
