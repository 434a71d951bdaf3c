"""The ``guard`` command-line tool."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

__all__ = ["main", "build_parser"]

DEMO_SOURCE = "embedded MNIST test split (LeCun, Cortes, Burges; CC BY-SA 3.0), seed-0 split 8000/2000"


def _add_model_and_data(p: argparse.ArgumentParser, model_help: str) -> None:
    """--demo | --model SPEC, and the image-folder options that go with --model."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--demo", action="store_true", help="the embedded MNIST default and the demo model (the default when no --model is given)")
    src.add_argument("--model", metavar="SPEC", help=model_help)
    p.add_argument("--data", metavar="DIR", help="image folder (one sub-folder per class) for --model; split 80/20 with --seed")
    p.add_argument("--image-size", type=int, default=None, help="resize folder images to this square size")
    p.add_argument("--grayscale", action="store_true", help="load folder images with one channel")


def _add_audit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="attack, detect, harden and export a model; write OUT/report.json",
        description="Run every capability on a model and write OUT/report.json (its keys are documented in the README, section \"report.json\"). "
        "With --demo: the embedded MNIST split and the cached demo LeNet.",
    )
    _add_model_and_data(p, "TorchScript file, exported program (.pt2) or 'module:callable'; takes float NCHW in [0, 1]")
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


def _user_model_and_data(args: argparse.Namespace):
    """--model and --data: the user's model and a seeded 80/20 split of the image folder."""
    import torch

    import guard

    if args.data is None:
        raise ValueError("--model needs --data DIR (an image folder, one sub-folder per class).")
    model = guard.load_model(args.model)
    data = guard.load_data(args.data, "--data", image_size=args.image_size, grayscale=args.grayscale)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))
    cut = int(0.8 * len(data))
    train = guard.Split(data.x[perm[:cut]], data.y[perm[:cut]])
    test = guard.Split(data.x[perm[cut:]], data.y[perm[cut:]])
    return model, train, test


def _cmd_audit(args: argparse.Namespace) -> int:
    import guard
    from guard.audit import AuditOptions, run_audit

    if args.model is None and args.data is not None:
        raise ValueError("--data needs --model (the demo uses the embedded MNIST).")
    if args.model is not None:
        model, train, test = _user_model_and_data(args)
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
    errors = report.get("errors", {})
    for step, msg in errors.items():
        print(f"guard audit: step {step} failed: {msg}", file=sys.stderr)
    return 1 if errors else 0


def _add_harden(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "harden",
        help="retrain a model with an (n+1)-th reject class against fresh attacks (Nguyen et al. 2015)",
        description="Rounds of: attack the current model (fooling images by gradient ascent, direct and CPPN evolution; "
        "localized patches), label the images as a reject class, fine-tune. Writes OUT/harden.json (the report's harden "
        "section), OUT/hardened_model.safetensors and checkpoints in OUT/checkpoints (resume with --resume). "
        "Runs under torchrun --nproc_per_node=N as well (DDP).",
    )
    _add_model_and_data(p, "'module:callable' giving an nn.Module (its last nn.Linear, or --head, grows)")
    p.add_argument("--head", default=None, help="dotted name of the classifier's final nn.Linear")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs-per-round", type=int, default=2)
    p.add_argument("--reject-share", type=float, default=0.12, help="share of reject images in each epoch (default 0.12)")
    p.add_argument("--attacks", default=None, help="comma-separated round attacks (default: fooling_gradient,fooling_direct,fooling_cppn,universal_patch; also random_patch, pgd)")
    p.add_argument("--budget", choices=["quick", "default"], default="default", help="attack sizes per round")
    p.add_argument("--attack-engine", choices=["builtin", "attacks"], default="builtin",
                   help="fooling images from the small built-in generators (default) or the attacks package's classes")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--out", default="out-harden", metavar="DIR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    p.add_argument("--device", default="cpu")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_harden)


def _cmd_harden(args: argparse.Namespace) -> int:
    import time
    from dataclasses import asdict
    from pathlib import Path

    import guard
    from guard.audit.harden import harden_section
    from guard.core.cache import atomic_write_text, save_tensors
    from guard.training.harden import harden
    from guard.training.round_attacks import DEFAULT_ATTACKS, AttackBudget

    if args.model is not None:
        model, train, test = _user_model_and_data(args)
        augment = None
    else:
        if args.data is not None:
            raise ValueError("--data needs --model (the demo uses the embedded MNIST).")
        from guard.demo import shift_augment

        model = guard.demo_model(progress=not args.quiet)
        train, test = guard.demo_data()
        augment = shift_augment
    out = Path(args.out)
    attacks = [a for a in args.attacks.split(",") if a.strip()] if args.attacks is not None else list(DEFAULT_ATTACKS)
    budget = AttackBudget.quick() if args.budget == "quick" else AttackBudget()
    from guard.training.distributed import init_from_env, world

    created = init_from_env(args.device)  # under torchrun: every rank runs harden, rank 0 writes
    rank = world()[0]
    t0 = time.perf_counter()
    try:
        res = harden(model.to(args.device), train, test=test, attacks=attacks, rounds=args.rounds, epochs_per_round=args.epochs_per_round,
                     reject_share=args.reject_share, head=args.head, budget=budget, lr=args.lr, augment=augment,
                     checkpoint_dir=out / "checkpoints", resume=args.resume, seed=args.seed, progress=not args.quiet and rank == 0,
                     attack_engine=args.attack_engine)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank != 0:
        return 0
    section = harden_section(res, attacks=attacks, budget=asdict(budget), seconds=time.perf_counter() - t0,
                             settings={"rounds": args.rounds, "epochs_per_round": args.epochs_per_round, "reject_share": args.reject_share,
                                       "lr": args.lr, "seed": args.seed, "checkpoint_dir": str(out / "checkpoints"),
                                       "attack_engine": args.attack_engine})
    path = out / "hardened_model.safetensors"
    save_tensors(path, res.model.model.state_dict(), {"num_classes": res.model.num_classes, "head": res.model.head,
                                                       "reject_index": res.model.reject_index})
    section["model_path"] = str(path)
    atomic_write_text(out / "harden.json", json.dumps({"harden": section}, indent=2) + "\n")
    def f(v, spec: str) -> str:
        return "n/a" if v is None else format(v, spec)

    for r in [section["baseline"], *section["rounds"]]:
        print(f"round {r['round']}: clean {f(r['clean_accuracy'], '.4f')}  classes fooled >=99% "
              f"{f(r['fooling_classes_ge99_count'], 'd')}/{section['num_classes']}  median fooling conf "
              f"{f(r['fooling_median_confidence'], '.4f')}  patch fooling {f(r['patch_fooling_rate'], '.3f')}  "
              f"rejects {f(r.get('rejected_share_of_round_attacks'), '.3f')} of its round's attacks")
    print(f"clean accuracy drop {section['clean_accuracy_drop_points']:.2f} points; wrote {out}/harden.json and {path}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a model (and its fitted detectors) as one ONNX graph; check parity with onnxruntime",
        description="Export the model, or a saved GuardedModel folder (guard audit writes OUT/guarded), as one ONNX "
        "graph: logits, detector scores and flags; then compare PyTorch and onnxruntime on held-out images.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--demo", action="store_true", help="the cached demo model (the default when no --model is given)")
    src.add_argument("--model", metavar="SPEC", help="TorchScript file, exported program (.pt2) or 'module:callable'")
    p.add_argument("--guarded", metavar="DIR", help="a saved GuardedModel folder (GuardedModel.save / guard audit's OUT/guarded)")
    p.add_argument("--out", default="model.onnx", metavar="FILE", help="the .onnx file to write (its folder must exist)")
    p.add_argument("--image-shape", default="1,28,28", metavar="C,H,W", help="input shape without the batch (default 1,28,28)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--fp16-backbone", action="store_true", help="run the classifier in float16, detector heads in float32")
    p.add_argument("--no-saliency", action="store_true", help="leave the saliency head out")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime parity check")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    import torch

    import guard
    from guard.export import to_onnx

    model = guard.load_model(args.model) if args.model is not None else guard.demo_model(progress=False)
    try:
        shape = [int(v) for v in args.image_shape.split(",")]
    except ValueError:
        shape = []
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"--image-shape must be C,H,W with positive ints; got {args.image_shape!r}.")
    if args.model is None:
        _, test = guard.demo_data()
        x = test.x[:64]
    else:
        x = torch.rand([64, *shape], generator=torch.Generator().manual_seed(0))
    obj = guard.GuardedModel.load(args.guarded, model) if args.guarded else model
    rep = to_onnx(obj, args.out, x[:8], opset=args.opset, fp16_backbone=args.fp16_backbone,
                  saliency=not args.no_saliency, parity_inputs=None if args.no_check else x)
    print(f"wrote {rep.path} (opset {rep.opset}, {rep.file_bytes / 1e6:.1f} MB, outputs: {', '.join(rep.output_names)})")
    if rep.heads.get("left_out"):
        print(f"left out: {rep.heads['left_out']}")
    if rep.parity is not None:
        for name, v in rep.parity["outputs"].items():
            figs = "  ".join(f"{k} {v[k]:.3g}" for k in ("max_abs", "max_rel", "agreement", "n_diff") if k in v)
            print(f"parity {name:<22} {figs}  {'ok' if v.get('passed') else 'OUT OF TOLERANCE'}")
        return 0 if rep.parity["passed"] else 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guard", description="Attack, detect, harden and export PyTorch image classifiers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_audit(sub)
    _add_harden(sub)
    _add_export(sub)
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
