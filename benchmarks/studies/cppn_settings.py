"""CPPN fooling images on a demo model under one setting: how many classes reach 99.99%.

The audit's ``fooling_cppn`` evolution (MAP-Elites, population 30 = the CIFAR-10 audit's scaled
100, at most 1,500 generations, parents from the classes still short of the threshold) with the
CPPN settings given on the command line, so that pure evolution (Nguyen et al.) and Lamarckian
refinement (:mod:`attacks.cppn_refine`) can be compared seed by seed:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.studies.cppn_settings --demo cifar10 --seed 1 \\
        --hidden 8 --add-node 0.3 --refine-every 100 --refine-steps 100   # the audit's settings
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.studies.cppn_settings --demo cifar10 --seed 1 \\
        --hidden 2 --add-node 0.15 --refine-every 0                       # the library's defaults

Prints the classes at >= 99.99%, every elite's confidence and the seconds. Writes
benchmarks/results/cppn_settings.json (``--out``: one file per setting).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import guard
from benchmarks.fixtures.timing import out_option, pin_threads
from guard.attacks.cppn import MutationRates
from guard.attacks.fooling_evolution import CPPNOptions, FoolingEvolution
from guard.core.provenance import write_results


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--demo", default="cifar10")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--population", type=int, default=30)
    p.add_argument("--generations", type=int, default=1500)
    p.add_argument("--hidden", type=int, default=8, help="add-node mutations on each initial CPPN")
    p.add_argument("--connections", type=int, default=0, help="add-connection mutations on each initial CPPN")
    p.add_argument("--add-node", type=float, default=0.3)
    p.add_argument("--refine-every", type=int, default=100, help="0: pure evolution")
    p.add_argument("--refine-steps", type=int, default=100)
    p.add_argument(
        "--refine-grow", action="store_true", help="complete the refined genomes' connections first (zero weights)"
    )
    p.add_argument("--polish-steps", type=int, default=0, help="last refinement of the short classes (0: none)")
    p.add_argument("--polish-starts", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    out_option(p, "cppn_settings")
    args = p.parse_args()
    pin_threads(args.threads)
    model = guard.demo_model(args.demo, progress=False)
    shape = tuple(guard.demo_data(args.demo)[1].x.shape[1:])
    t = time.perf_counter()
    refine = (
        {"refine_every": args.refine_every, "refine_steps": args.refine_steps, "refine_grow": args.refine_grow}
        if args.refine_every
        else {}
    )
    polish = {"polish_steps": args.polish_steps, "polish_starts": args.polish_starts} if args.polish_steps else {}
    res = FoolingEvolution(
        encoding="cppn",
        population=args.population,
        generations=args.generations,
        threshold=0.9999,
        extra_samples=0,
        parent_selection="unfooled",
        cppn=CPPNOptions(
            init_hidden=args.hidden,
            init_connections=args.connections,
            rates=MutationRates(add_node=args.add_node),
            **refine,
            **polish,
        ),
        seed=args.seed,
    )(model, shape=shape)
    ex = res.extras
    conf = ex["elite_confidence"].numpy()
    out = {
        "setting": {k: v for k, v in vars(args).items() if k != "out"},
        "classes_at_9999": int((conf >= 0.9999).sum()),
        "min_confidence": float(conf.min()),
        "confidence": [round(float(c), 6) for c in conf],
        "generations": ex["generations"],
        "generation_all_fooled": ex["generation_all_fooled"],
        "refine_evaluations": ex["refine_evaluations"],
        "polish_evaluations": ex["polish_evaluations"],
        "classes_at_9999_before_polish": int((ex["elite_confidence_before_polish"] >= 0.9999).sum())
        if "elite_confidence_before_polish" in ex
        else None,
        "seconds": round(time.perf_counter() - t, 1),
    }
    print(json.dumps(out))
    write_results(args.out, out)
    print(
        f"{out['classes_at_9999']}/{conf.size} classes at >= 99.99%; min confidence {conf.min():.6f}; "
        f"{out['seconds']} s; elites {np.round(conf, 6).tolist()}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
