"""The ``guard`` command-line tool."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

__all__ = ["main", "build_parser"]

DEMO_SOURCE = "embedded MNIST test split (LeCun, Cortes, Burges; CC BY-SA 3.0), seed-0 split 8000/2000"


def _add_audit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="attack, detect, harden and export a model; write OUT/report.json",
        description="Run every capability on a model and write OUT/report.json (see DESIGN.md for the keys). "
        "With --demo: the embedded MNIST split and the cached demo LeNet.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--demo", action="store_true", help="use the embedded MNIST default and the demo model (the default when no --model is given)")
    src.add_argument("--model", metavar="SPEC", help="TorchScript file, exported program (.pt2) or 'module:callable'; takes float NCHW in [0, 1]")
    p.add_argument("--data", metavar="DIR", help="image folder (one sub-folder per class) for --model; split 80/20 with --seed")
    p.add_argument("--image-size", type=int, default=None, help="resize folder images to this square size")
    p.add_argument("--grayscale", action="store_true", help="load folder images with one channel")
    p.add_argument("--out", default="out", metavar="DIR", help="output folder (default: ./out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small settings everywhere (smoke test, ~1 min)")
    p.add_argument("--harden", action="store_true", help="also run guard.harden rounds (slow)")
    p.add_argument("--no-export", action="store_true", help="skip the ONNX export step")
    p.add_argument("--repetitions", type=int, default=10, help="random-placement repetitions for patch curves (default 10)")
    p.add_argument("--resume", action="store_true", help="keep the sections already in OUT/report.json")
    p.add_argument("--device", default="cpu", help="torch device for the model (cpu, cuda)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_audit)


def _cmd_audit(args: argparse.Namespace) -> int:
    import guard
    from guard.audit import AuditOptions, run_audit

    if args.model is None and args.data is not None:
        raise ValueError("--data needs --model (the demo uses the embedded MNIST).")
    if args.model is not None:
        if args.data is None:
            raise ValueError("--model needs --data DIR (an image folder, one sub-folder per class).")
        model = guard.load_model(args.model)
        data = guard.load_data(args.data, "--data", image_size=args.image_size, grayscale=args.grayscale)
        import torch

        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))
        cut = int(0.8 * len(data))
        train = guard.Split(data.x[perm[:cut]], data.y[perm[:cut]])
        test = guard.Split(data.x[perm[cut:]], data.y[perm[cut:]])
        name, source = args.model, f"image folder {args.data} (seed-{args.seed} split 80/20)"
    else:
        model = guard.demo_model(progress=not args.quiet)
        train, test = guard.demo_data()
        name, source = "guard.demo_model (DemoNet)", DEMO_SOURCE
    opts = AuditOptions(seed=args.seed, quick=args.quick, harden=args.harden, export=not args.no_export,
                        repetitions=args.repetitions, progress=not args.quiet, device=args.device)
    report = run_audit(model, train, test, args.out, model_name=name, data_source=source, options=opts, resume=args.resume)
    m = report.get("model", {})
    print(f"clean accuracy {m.get('clean_accuracy', float('nan')):.4f} on {m.get('data', {}).get('test')} held-out images")
    for name_, sec in report.get("attacks", {}).items():
        if isinstance(sec, dict) and "success_rate" in sec:
            print(f"attack {name_:<18} success {sec['success_rate']:.3f}")
    print(f"wrote {args.out}/report.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guard", description="Attack, detect, harden and export PyTorch image classifiers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_audit(sub)
    return parser


def _version() -> str:
    from guard import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except (ValueError, TypeError) as err:
        print(f"guard {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
