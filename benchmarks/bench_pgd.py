"""PGD throughput: guard's LinfPGD vs torchattacks.PGD on the demo model (same eps, steps, step size, batch).

Usage: OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_pgd.py [--n 2000] [--batch 500] [--steps 40] [--threads 2]

Prints images/s of each and the ratio guard / torchattacks, for guard with per-sample early
stop (its default: an image stops once it is misclassified) and without (the same work as
torchattacks, which always runs every step), and the success rates of all three.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import torchattacks

    import guard
    from guard.attacks.gradient import LinfPGD

    model = guard.demo_model(progress=False).eval()
    _, test = guard.demo_data()
    x, y = test.x[: args.n], test.y[: args.n]
    with torch.no_grad():
        y_model = torch.cat([model(x[i : i + 1000]).argmax(1) for i in range(0, args.n, 1000)])
    alpha = 2.5 * args.eps / args.steps

    def run_ta() -> tuple[float, float]:
        atk = torchattacks.PGD(model, eps=args.eps, alpha=alpha, steps=args.steps, random_start=True)
        t0 = time.perf_counter()
        succ = []
        for i in range(0, args.n, args.batch):
            xa = atk(x[i : i + args.batch], y_model[i : i + args.batch])
            with torch.no_grad():
                succ.append(model(xa).argmax(1) != y_model[i : i + args.batch])
        return time.perf_counter() - t0, float(torch.cat(succ).float().mean())

    def run_guard(early: bool) -> tuple[float, float]:
        atk = LinfPGD(eps=args.eps, steps=args.steps, step_size=alpha, random_start=True, early_stop=early)
        t0 = time.perf_counter()
        succ = []
        for i in range(0, args.n, args.batch):
            succ.append(atk(model, x[i : i + args.batch], y_model[i : i + args.batch]).success)
        return time.perf_counter() - t0, float(torch.cat(succ).float().mean())

    results: dict[str, tuple[float, float]] = {}
    runs = [
        ("torchattacks.PGD", run_ta),
        ("guard LinfPGD early_stop=False", lambda: run_guard(False)),
        ("guard LinfPGD early_stop=True", lambda: run_guard(True)),
    ]
    for _ in range(args.repeats):  # interleaved rounds, best time of each: fairer on a shared machine
        for name, fn in runs:
            t, s = fn()
            if name not in results or t < results[name][0]:
                results[name] = (t, s)
    for name, (t, s) in results.items():
        print(f"{name:<34} {args.n / t:9.1f} images/s  ({t:.2f} s)  success {s:.4f}")
    ta = results["torchattacks.PGD"][0]
    for name in list(results)[1:]:
        print(f"ratio {name} / torchattacks: {ta / results[name][0]:.2f}x")
    print(
        f"settings: n={args.n} batch={args.batch} eps={args.eps} steps={args.steps} step_size={alpha:.5f} threads={args.threads}"
    )


if __name__ == "__main__":
    main()
