"""The audit's fooling-image step over several seeds: how much "classes reached" moves between runs.

Runs exactly the ``attacks_fooling`` step of ``guard audit`` (same defaults, transfer check off)
on the embedded demo model for each seed and prints, per method, the classes with an image at
>= 99.99% confidence, the generation (step) at which all classes had one, and the seconds. A
fixed seed gives the same result on one machine; across machines, float reductions differ in the
last bits and an evolutionary search that is near its threshold can end one class apart, so the
figure to quote is the spread over seeds.

Writes benchmarks/results/fooling_seed_spread.json:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.studies.fooling_seed_spread --demo mnist --seeds 0 1 2 3 4

``--set KEY=VALUE`` passes an option of the step (``AuditOptions.extra``), e.g. ``fooling_refine_every=0``
for pure CPPN evolution (no Lamarckian refinement).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import guard
from benchmarks.fixtures.timing import out_option, pin_threads
from guard.audit.fooling import FoolingStep
from guard.audit.runner import run_audit
from guard.audit.step import AuditOptions
from guard.core.provenance import write_results

METHODS = ("fooling_gradient", "fooling_direct", "fooling_cppn")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--demo", default="mnist")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--threads", type=int, default=1)
    out_option(p, "fooling_seed_spread")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an option of the step (a number)")
    args = p.parse_args()
    pin_threads(args.threads)
    options = {"fooling_transfer": False}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set takes KEY=VALUE; got {item!r}")
        options[key] = float(value) if "." in value else int(value)
    model = guard.demo_model(args.demo, progress=False)
    train, test = guard.demo_data(args.demo)
    rows: dict[str, list[dict]] = {m: [] for m in METHODS}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as out:
            rep = run_audit(
                model,
                train,
                test,
                out,
                steps=[FoolingStep()],
                fail_fast=True,
                options=AuditOptions(seed=seed, progress=False, extra=dict(options)),
            )
        for m in METHODS:
            e = rep["attacks"][m]
            rows[m].append(
                {
                    "seed": seed,
                    "classes": len(e["classes_fooled"]),
                    "median_confidence": e["median_confidence"],
                    "all_at": e.get("generation_all_fooled", e.get("steps")),
                    "seconds": e["seconds"],
                }
            )
            if "classes_fooled_before_polish" in e:  # the CPPN search's last polish (fooling_polish_steps=0: none)
                rows[m][-1]["classes_before_polish"] = len(e["classes_fooled_before_polish"])
        print(
            f"seed {seed}: "
            + ", ".join(
                f"{m} {rows[m][-1]['classes']}/10"
                + (
                    f" ({rows[m][-1]['classes_before_polish']}/10 before the polish)"
                    if "classes_before_polish" in rows[m][-1]
                    else ""
                )
                for m in METHODS
            ),
            flush=True,
        )
    for m in METHODS:
        c = [r["classes"] for r in rows[m]]
        print(
            f"{m:<18} classes reached: {c}  min {min(c)} median {statistics.median(c)} max {max(c)}; "
            f"seconds median {statistics.median(r['seconds'] for r in rows[m]):.1f}"
        )
    write_results(
        args.out,
        {
            "demo": args.demo,
            "seeds": args.seeds,
            "threads": args.threads,
            "options": options,
            "rows": rows,
            "spread": {
                m: {
                    "min": min(r["classes"] for r in rows[m]),
                    "max": max(r["classes"] for r in rows[m]),
                    "median": statistics.median(r["classes"] for r in rows[m]),
                }
                for m in METHODS
            },
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
