"""PGD throughput: guard's LinfPGD vs torchattacks.PGD on the demo model (same eps, steps, step size, batch).

Prints images/s of each and the ratio guard / torchattacks (images/s over images/s: above 1,
guard is faster), for guard with per-sample early stop (its default: an image stops once it is
misclassified) and without (the same work as torchattacks, which always runs every step), and the
success rates of all three. Writes benchmarks/results/pgd_vs_torchattacks.json:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.peers.pgd_vs_torchattacks --threads 1 [--n 2000] [--batch 500] [--steps 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.fixtures.timing import out_option, pin_threads
from guard.core.provenance import write_results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    out_option(ap, "pgd_vs_torchattacks")
    args = ap.parse_args()
    pin_threads(args.threads)

    import torchattacks

    import guard
    from guard.attacks.gradient import LinfPGD

    model = guard.demo_model(progress=False).eval()
    _, test = guard.demo_data()
    x = test.x[: args.n]
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
    keys = {
        "torchattacks.PGD": "torchattacks",
        "guard LinfPGD early_stop=False": "guard_full_steps",
        "guard LinfPGD early_stop=True": "guard_early_stop",
    }
    rows = {
        keys[name]: {"seconds": round(t, 3), "images_per_second": round(args.n / t, 1), "success_rate": round(s, 4)}
        for name, (t, s) in results.items()
    }
    write_results(
        args.out,
        {
            "model": "guard.demo_model('mnist') (DemoNet)",
            "images": args.n,
            "batch": args.batch,
            "eps": args.eps,
            "steps": args.steps,
            "step_size": alpha,
            "random_start": True,
            "threads": args.threads,
            "repeats": args.repeats,
            "timing": "best of --repeats interleaved rounds",
            "labels": "the model's own predictions",
            "runs": rows,
            "ratio_guard_full_steps_over_torchattacks": round(
                rows["guard_full_steps"]["images_per_second"] / rows["torchattacks"]["images_per_second"], 3
            ),
            "ratio_guard_early_stop_over_torchattacks": round(
                rows["guard_early_stop"]["images_per_second"] / rows["torchattacks"]["images_per_second"], 3
            ),
            "ratio_note": "images/s of guard over images/s of torchattacks.PGD (> 1: guard is faster)",
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
