"""What the masking detector's one-mask round costs at serving time: guarded against bare, eager and onnxruntime.

The mask-trained CIFAR-10 ResNet-20 (``guard.demo_model("cifar10", variant="masked")``) wrapped with
``MaskingDetector(5)`` alone (36 masks for a 5x5 patch: every image runs 36 more times, the
one-mask round; the two-mask round that certifies recovery stays offline) against the bare
model, on one batch of ``--batch`` held-out images, both in PyTorch eager and both as ONNX graphs in
onnxruntime (:func:`guard.export.to_onnx`: the guarded graph holds the one-mask round, its score,
its majority label and the flag). One thread each (``torch.set_num_threads(1)``,
``intra_op_num_threads=1``); calls interleaved pair by pair, medians kept
(:func:`benchmarks.fixtures.timing.paired_median_ms`). The ratios are guarded ms / bare ms, per
runtime. Writes benchmarks/results/masking_serving_cost.json:

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.peers.masking_serving_cost --batch 64 --reps 5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.fixtures.timing import out_option, paired_median_ms, pin_threads
from guard.core.provenance import write_results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--patch", type=int, default=5)
    out_option(ap, "masking_serving_cost")
    args = ap.parse_args(argv)
    pin_threads(1)

    import guard
    from guard.detectors import MaskingDetector
    from guard.export import load_session, to_onnx

    model = guard.demo_model("cifar10", variant="masked").eval()
    train, test = guard.demo_data("cifar10")
    g = guard.wrap(model, [MaskingDetector(args.patch)]).fit(train.x[:64], train.y[:64])
    g.calibrate(test.x[:500], fpr=0.05)
    x = test.x[500 : 500 + args.batch].contiguous()
    tmp = Path(tempfile.mkdtemp())
    report = to_onnx(g, tmp / "guarded.onnx", test.x[:8], parity_inputs=x)
    to_onnx(model, tmp / "bare.onnx", test.x[:8])
    s_guard = load_session(tmp / "guarded.onnx", "cpu", threads=1)
    s_bare = load_session(tmp / "bare.onnx", "cpu", threads=1)

    def bare() -> None:
        with torch.no_grad():
            model(x)

    rows = {}
    for runtime, fb, fg in (
        ("eager", bare, lambda: g(x)),
        ("onnxruntime", lambda: s_bare.run(x), lambda: s_guard.run(x)),
    ):
        bare_ms, guarded_ms = paired_median_ms(fb, fg, args.reps)
        rows[runtime] = {
            "bare_ms": round(bare_ms, 2),
            "guarded_ms": round(guarded_ms, 2),
            "ratio_guarded_over_bare": round(guarded_ms / bare_ms, 2),
        }
        print(runtime, rows[runtime], flush=True)
    masking = g.detectors["masking"]
    write_results(
        args.out,
        {
            "model": "guard.demo_model('cifar10', variant='masked') (ResNet-20)",
            "detector": repr(masking),
            "masks": len(masking.masks_),
            "batch": int(x.shape[0]),
            "threads": 1,
            "reps": args.reps,
            "timing": "median ms over interleaved calls of bare and guarded (one warm-up of each)",
            "onnx_parity_passed": bool(report.parity and report.parity.get("passed")),
            "by_runtime": rows,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
