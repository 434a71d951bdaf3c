"""CPPN rendering + scoring throughput, and seconds to fool all 10 demo classes at >= 99.99%.

Side by side in one process:

* guard's :func:`attacks.cppn.render` (every pixel of a genome in one vectorised torch pass);
* a per-pixel Python evaluation of the same genomes, the way NEAT libraries such as
  neat-python evaluate a network (``net.activate([x, y, r, 1])`` once per pixel); written
  here because neat-python is not installed; its output is checked equal to ours.

Then the MAP-Elites CPPN evolution on the demo model until all 10 classes reach 99.99%
(``--generations`` at most, 0 to leave the evolution out; ``--selection`` uniform as in the paper,
or unfooled). The ratio is guard's images/s over the per-pixel evaluation's. Writes
benchmarks/results/cppn_vs_per_pixel.json:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.peers.cppn_vs_per_pixel [--population 100] [--generations 1500]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

import guard
from benchmarks.fixtures.timing import out_option, pin_threads
from guard.attacks.cppn import NUM_INPUTS, Genome, MutationRates, mutate, random_genome, render
from guard.attacks.fooling_evolution import FoolingEvolution
from guard.core.provenance import write_results

_ACT = {
    "sine": math.sin,
    "sigmoid": lambda s: 1.0 / (1.0 + math.exp(-s)) if s > -60 else 0.0,
    "gaussian": lambda s: math.exp(-0.5 * s * s),
    "linear": lambda s: s,
}


def render_per_pixel(g: Genome, h: int, w: int) -> np.ndarray:
    incoming: dict[int, list[tuple[int, float]]] = {}
    for a, b, wt in g.connections:
        incoming.setdefault(int(b), []).append((int(a), float(wt)))
    out = np.zeros((g.channels, h, w), dtype=np.float32)
    for i in range(h):
        yv = -1.0 + 2.0 * i / (h - 1)
        for j in range(w):
            xv = -1.0 + 2.0 * j / (w - 1)
            vals = {0: xv, 1: yv, 2: math.sqrt(xv * xv + yv * yv), 3: 1.0}
            for n in g.order[NUM_INPUTS:]:
                s = sum(vals[a] * wt for a, wt in incoming.get(n, []))
                vals[n] = _ACT[g.activations[n]](s)
            for c, o in enumerate(g.outputs()):
                out[c, i, j] = min(1.0, max(0.0, vals[o]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--population", type=int, default=100)
    ap.add_argument("--generations", type=int, default=1500)
    ap.add_argument("--selection", default="uniform", choices=["uniform", "unfooled"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=5, help="renders of the population timed (the mean counts)")
    ap.add_argument("--per-pixel", type=int, default=10, help="genomes rendered by the per-pixel evaluation")
    out_option(ap, "cppn_vs_per_pixel")
    args = ap.parse_args()
    pin_threads(1)
    model = guard.demo_model(progress=False)
    rng = np.random.default_rng(0)
    pop = [random_genome(1, rng=rng, hidden=2) for _ in range(args.population)]
    for _ in range(20):  # grow them a little, as after some generations
        pop = [mutate(g, rng, MutationRates(add_node=0.3, add_connection=0.3)) for g in pop]
    hidden = float(np.mean([g.num_hidden for g in pop]))
    print(
        f"population {len(pop)}, mean hidden nodes {hidden:.1f}, mean connections {np.mean([len(g.connections) for g in pop]):.1f}"
    )

    reps = args.reps
    t0 = time.perf_counter()
    for _ in range(reps):
        x = render(pop, 28)
    t_r = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(reps):
            F.softmax(model(render(pop, 28)), 1)
    t_rs = (time.perf_counter() - t0) / reps
    k = min(args.per_pixel, len(pop))
    t0 = time.perf_counter()
    ref = np.stack([render_per_pixel(g, 28, 28) for g in pop[:k]])
    t_py = (time.perf_counter() - t0) / k * len(pop)
    err = float(np.abs(ref - x[:k].numpy()).max())
    print(f"guard render 28x28:            {len(pop) / t_r:9.0f} img/s")
    print(f"guard render + demo-model score: {len(pop) / t_rs:7.0f} img/s")
    print(
        f"per-pixel Python (NEAT-style):   {len(pop) / t_py:7.1f} img/s  -> render speed-up {t_py / t_r:.0f}x (max abs diff {err:.2e})"
    )
    t0 = time.perf_counter()
    big = render(pop[:10], 256)
    big_rate = len(big) / (time.perf_counter() - t0)
    print(f"guard render 256x256: {big_rate:.0f} img/s, shape {tuple(big.shape)}")
    figures: dict[str, object] = {
        "model": "guard.demo_model('mnist') (DemoNet)",
        "threads": 1,
        "population": len(pop),
        "render_reps": reps,
        "per_pixel_genomes": k,
        "mean_hidden_nodes": round(hidden, 2),
        "mean_connections": round(float(np.mean([len(g.connections) for g in pop])), 2),
        "guard_render_28px_images_per_second": round(len(pop) / t_r, 1),
        "guard_render_and_score_28px_images_per_second": round(len(pop) / t_rs, 1),
        "per_pixel_python_28px_images_per_second": round(len(pop) / t_py, 2),
        "ratio_guard_render_over_per_pixel": round(t_py / t_r, 1),
        "ratio_note": "images/s of guard's vectorised render over the per-pixel Python evaluation's (NEAT-style)",
        "max_abs_difference_vs_per_pixel": err,
        "guard_render_256px_images_per_second": round(big_rate, 1),
        "evolution": None,
    }
    if args.generations <= 0:
        write_results(args.out, figures)
        print(f"wrote {args.out} (no evolution: --generations {args.generations})")
        return

    t0 = time.perf_counter()
    res = FoolingEvolution(
        encoding="cppn",
        population=args.population,
        generations=args.generations,
        parent_selection=args.selection,
        seed=args.seed,
    )(model)
    sec = time.perf_counter() - t0
    ex = res.extras
    conf = ex["elite_confidence"]
    print(
        f"CPPN MAP-Elites ({args.selection} parents, pop {args.population}): all 10 classes >= 99.99% at generation "
        f"{ex['generation_all_fooled']} (-1: not within {args.generations}); {ex['generations']} generations, {sec:.1f} s; "
        f"classes fooled {int((conf >= 0.9999).sum())}/10; elite confidence min {float(conf.min()):.6f} median {float(conf.double().median()):.6f}"
    )
    figures["evolution"] = {
        "selection": args.selection,
        "population": args.population,
        "max_generations": args.generations,
        "seed": args.seed,
        "generation_all_fooled": int(ex["generation_all_fooled"]),
        "generations": int(ex["generations"]),
        "seconds": round(sec, 1),
        "classes_at_9999": int((conf >= 0.9999).sum()),
        "min_confidence": float(conf.min()),
        "median_confidence": float(conf.double().median()),
    }
    write_results(args.out, figures)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
