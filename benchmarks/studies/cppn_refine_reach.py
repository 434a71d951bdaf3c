"""How far gradient refinement alone takes random CPPN genomes toward one class (no evolution).

Renders ``--genomes`` random genomes (seed 0) of the shape asked for, runs
:func:`attacks.cppn_refine.refine_weights` on them toward ``--target`` on the demo model, and
prints the best confidences. The table "Denser CPPNs" in BENCHMARKS.md ("CPPN fooling images on
CIFAR-10") comes from these runs:

    .venv/bin/python -m benchmarks.studies.cppn_refine_reach --target 5 --hidden 8 --steps 300 --lr 0.1
    .venv/bin/python -m benchmarks.studies.cppn_refine_reach --target 5 --hidden 8 --connections 40 --steps 400 --lr 0.05
    .venv/bin/python -m benchmarks.studies.cppn_refine_reach --target 5 --dense 16 16 --steps 400 --lr 0.05
    .venv/bin/python -m benchmarks.studies.cppn_refine_reach --target 7 --hidden 8 --grow --steps 100 --objective log_prob

Writes benchmarks/results/cppn_refine_reach.json (``--out``: one file per setting).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import guard
from benchmarks.fixtures.timing import out_option, pin_threads
from guard.attacks.cppn import ACTIVATIONS, NUM_INPUTS, Genome, random_genome
from guard.attacks.cppn_refine import refine_weights
from guard.core.provenance import write_results


def dense_genome(channels: int, layers: list[int], rng: np.random.Generator) -> Genome:
    """Fully connected layers of hidden nodes (random activations), N(0, 4/fan-in) weights."""
    acts = {i: "linear" for i in range(NUM_INPUTS)}
    outs = list(range(NUM_INPUTS, NUM_INPUTS + channels))
    acts.update({o: "sigmoid" for o in outs})
    order, prev, conns, nid = list(range(NUM_INPUTS)), list(range(NUM_INPUTS)), [], NUM_INPUTS + channels
    for n in [*layers, None]:
        cur = outs if n is None else list(range(nid, nid + n))
        for c in cur:
            if n is not None:
                acts[c] = ACTIVATIONS[int(rng.integers(len(ACTIVATIONS)))]
            conns += [[p, c, float(rng.normal() * 2 / np.sqrt(len(prev)))] for p in prev]
        if n is not None:
            nid += n
            order += cur
            prev = cur
    g = Genome(channels=channels, activations=acts, order=order + outs, connections=conns, next_id=nid)
    g.validate()
    return g


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", default="cifar10")
    p.add_argument("--target", type=int, default=5)
    p.add_argument("--genomes", type=int, default=8)
    p.add_argument("--hidden", type=int, default=8)
    p.add_argument("--connections", type=int, default=0)
    p.add_argument("--dense", type=int, nargs="+", help="hidden layer widths of a dense genome instead")
    p.add_argument("--grow", action="store_true", help="refine_weights(grow=True)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--objective", default="log_odds", choices=["log_odds", "log_prob"])
    p.add_argument("--threads", type=int, default=1)
    out_option(p, "cppn_refine_reach")
    args = p.parse_args()
    pin_threads(args.threads)
    model = guard.demo_model(args.demo, progress=False).eval()
    for q in model.parameters():
        q.requires_grad_(False)
    c, h, w = guard.demo_data(args.demo)[1].x.shape[1:]
    rng = np.random.default_rng(0)
    gs = [
        dense_genome(c, args.dense, rng)
        if args.dense
        else random_genome(c, rng=rng, hidden=args.hidden, connections=args.connections)
        for _ in range(args.genomes)
    ]
    t0 = time.perf_counter()
    out, obj = refine_weights(
        gs,
        model,
        torch.full((len(gs),), args.target),
        h,
        w,
        steps=args.steps,
        lr=args.lr,
        objective=args.objective,
        grow=args.grow,
    )
    prob = torch.sigmoid(obj) if args.objective == "log_odds" else obj.exp()
    best = prob.sort(descending=True).values[:4].tolist()
    seconds = time.perf_counter() - t0
    print(f"connections {len(out[0].connections)}: best confidences {[round(v, 6) for v in best]} ({seconds:.0f} s)")
    setting = {k: v for k, v in vars(args).items() if k != "out"}
    write_results(
        args.out,
        {
            "setting": setting,
            "connections": len(out[0].connections),
            "confidence": [round(float(v), 6) for v in prob.tolist()],
            "best_confidences": [round(v, 6) for v in best],
            "seconds": round(seconds, 1),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
