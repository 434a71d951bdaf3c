"""The ``guard`` command-line tool: it parses arguments and calls the library, nothing more."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]


# ---------------------------------------------------------------- model and data options


def _add_model_and_data(p: argparse.ArgumentParser, model_help: str) -> None:
    """--demo [NAME] | --model SPEC, and --data (a folder or an embedded data set) for --model."""
    from guard.demo import DEMOS

    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--demo",
        nargs="?",
        const="mnist",
        default=None,
        choices=DEMOS,
        metavar="NAME",
        help=f"an embedded default: its data and its demo model ({', '.join(DEMOS)}; default mnist, "
        "also when neither --demo nor --model is given)",
    )
    src.add_argument(
        "--model", metavar="SPEC", help=model_help + "; a module in the current directory is found, as uvicorn does"
    )
    p.add_argument(
        "--variant",
        default="standard",
        metavar="NAME",
        help="with --demo: which shipped model (standard; for cifar10 also robust: adversarially trained with a "
        "reject class)",
    )
    p.add_argument(
        "--data",
        metavar="DIR|NAME",
        help="for --model: an image folder (one sub-folder per class, split 80/20 with "
        f"--seed) or the name of an embedded data set ({', '.join(DEMOS)})",
    )
    p.add_argument("--image-size", type=int, default=None, help="resize folder images to this square size")
    p.add_argument("--grayscale", action="store_true", help="load folder images with one channel")
    p.add_argument("--train-size", type=int, default=None, metavar="N", help="use at most N training images")
    p.add_argument("--test-size", type=int, default=None, metavar="N", help="use at most N held-out images")


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch CPU threads (default: torch's, one per core); on a machine busy with other jobs 1 is "
        "several times faster, as idle OpenMP threads spin (BENCHMARKS.md, the CIFAR-10 audit)",
    )


def _set_threads(args: argparse.Namespace) -> None:
    n = getattr(args, "threads", None)
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"--threads must be a positive integer; got {n!r}.")
    import torch

    torch.set_num_threads(n)


def _add_key_env(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--key-env",
        metavar="VAR",
        default=None,
        help=f"sign {what} with HMAC-SHA256 under the key held in environment variable VAR (and verify what is "
        "loaded with it); without it, files carry a SHA-256 digest (FILE.sha256) only",
    )


def _check_key_env(args: argparse.Namespace) -> None:
    """Fail before any work when --key-env names an unset variable or --device a missing device."""
    if getattr(args, "key_env", None) is not None:
        from guard.core.integrity import resolve_key

        resolve_key(key_env=args.key_env)
    if getattr(args, "device", None) is not None:
        from guard.core.validation import check_device

        check_device(args.device, "--device")
    if getattr(args, "repetitions", None) is not None and args.repetitions < 1:  # before any work (0 is not "unset")
        raise ValueError(f"--repetitions must be >= 1; got {args.repetitions}.")


@dataclass
class _Setup:
    model: Any
    train: Any
    test: Any
    name: str
    source: str
    demo: str | None


def _load_user_model(spec: str) -> Any:
    import guard

    if ":" in spec and os.getcwd() not in sys.path:  # 'module:callable' from the working directory
        sys.path.insert(0, os.getcwd())
    return guard.load_model(spec)


def _setup(args: argparse.Namespace, *, progress: bool, stream: bool = False) -> _Setup:
    """The model and its (train, test) data. An image folder is split by :func:`guard.split_folder`
    (seeded 80/20, cut to --train-size / --test-size), which decodes only the images it keeps;
    with ``stream`` nothing is decoded here: train and test are ``Subset`` views of its
    ``ImageFolder`` (the same images, the same order), which the command then streams."""
    import torch

    import guard
    from guard.core.data import split_folder
    from guard.demo import DEMOS, demo_source

    if args.model is None:
        if args.data is not None:
            raise ValueError("--data needs --model (--demo NAME brings its own data).")
        demo = args.demo or "mnist"
        variant = getattr(args, "variant", "standard")
        name = (
            f"guard.demo_model({demo!r})"
            if variant == "standard"
            else f"guard.demo_model({demo!r}, variant={variant!r})"
        )
        s = _Setup(
            guard.demo_model(demo, variant=variant, progress=progress),
            *guard.demo_data(demo),
            name,
            demo_source(demo),
            demo,
        )
    else:
        if getattr(args, "variant", "standard") != "standard":
            raise ValueError(
                f"--variant picks a shipped demo model and needs --demo; got --model {args.model!r} with "
                f"--variant {args.variant!r}."
            )
        if args.data is None:
            raise ValueError(
                f"--model needs --data DIR (an image folder, one sub-folder per class) or an embedded data set ({', '.join(DEMOS)})."
            )
        model = _load_user_model(args.model)
        if args.data in DEMOS and not Path(args.data).is_dir():
            train, test = guard.demo_data(args.data)
            source = demo_source(args.data)
        elif Path(args.data).is_dir():  # decode only the images the split keeps (--train-size / --test-size)
            for attr in ("train_size", "test_size"):
                if getattr(args, attr) is not None and getattr(args, attr) < 1:
                    raise ValueError(f"--{attr.replace('_', '-')} must be >= 1; got {getattr(args, attr)}.")
            train, test = split_folder(
                args.data,
                "--data",
                seed=args.seed,
                train_size=args.train_size,
                test_size=args.test_size,
                image_size=args.image_size,
                grayscale=args.grayscale,
                lazy=stream,
            )
            source = f"image folder {args.data} (seed-{args.seed} split 80/20)"
        else:
            data = guard.load_data(args.data, "--data", image_size=args.image_size, grayscale=args.grayscale)
            perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))
            cut = int(0.8 * len(data))
            train = guard.Split(data.x[perm[:cut]], data.y[perm[:cut]])
            test = guard.Split(data.x[perm[cut:]], data.y[perm[cut:]])
            source = f"image archive {args.data} (seed-{args.seed} split 80/20)"
        s = _Setup(model, train, test, args.model, source, None)
    for attr, cap in (("train", args.train_size), ("test", args.test_size)):
        if cap is not None:
            if cap < 1:
                raise ValueError(f"--{attr}-size must be >= 1; got {cap}.")
            split = getattr(s, attr)
            if isinstance(split, guard.Split):
                setattr(s, attr, guard.Split(split.x[:cap], split.y[:cap]))
            else:  # a Subset of an image folder
                setattr(s, attr, type(split)(split.dataset, split.indices[:cap]))
    return s


# ---------------------------------------------------------------- guard audit


def _add_audit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="attack, detect, harden and export a model; write OUT/report.json and OUT/report.html",
        description="Run every capability on a model and write OUT/report.json (its keys are documented in "
        "docs/reference/report-json.md) and the page OUT/report.html. Without --model: an embedded default (--demo NAME) and its demo model.",
    )
    _add_model_and_data(p, "TorchScript file, exported program (.pt2) or 'module:callable'; takes float NCHW in [0, 1]")
    p.add_argument("--out", default="out", metavar="DIR", help="output folder (default: ./out)")
    p.add_argument("--seed", type=int, default=None, help="seeds every random choice (default 0)")
    p.add_argument("--quick", action="store_true", help="small settings everywhere (smoke test, ~1 min)")
    p.add_argument("--harden", action="store_true", help="also run guard.harden rounds (slow)")
    p.add_argument("--no-export", action="store_true", help="skip the ONNX export step")
    p.add_argument(
        "--repetitions", type=int, default=None, help="random-placement repetitions for patch curves (default 10)"
    )
    p.add_argument(
        "--settings",
        "--config",
        dest="settings",
        metavar="FILE",
        help="re-run with exactly the settings of an earlier audit: its OUT/report.json (or a JSON file holding "
        "report['settings']); seed, quick, harden, export, repetitions, threads and every step's resolved "
        "settings come from the file; a command-line value that contradicts it is refused",
    )
    p.add_argument("--resume", action="store_true", help="keep the sections already in OUT/report.json")
    p.add_argument("--device", default="cpu", help="torch device for the model (cpu, cuda)")
    _add_threads(p)
    _add_key_env(p, "OUT/guarded, the hardened model and OUT/model.onnx")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_audit)


def _audit_options(args: argparse.Namespace) -> Any:
    """The AuditOptions of the command line, or of ``--settings FILE`` (a report.json or its "settings" section)."""
    from guard.audit import AuditOptions
    from guard.audit.settings import AuditSettings

    given = {
        "seed": args.seed,
        "repetitions": args.repetitions,
        "quick": args.quick or None,
        "harden": args.harden or None,
        "export": False if args.no_export else None,
        "threads": args.threads,
    }
    common = dict(progress=not args.quiet, device=args.device, key_env=args.key_env)
    if args.settings is None:
        return AuditOptions(
            seed=0 if args.seed is None else args.seed,
            quick=args.quick,
            harden=args.harden,
            export=not args.no_export,
            repetitions=10 if args.repetitions is None else args.repetitions,
            **common,
        )
    try:
        data = json.loads(Path(args.settings).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--settings {args.settings!r} could not be read as JSON: {err}") from err
    rec = data.get("settings", data) if isinstance(data, dict) else None
    if not isinstance(rec, dict) or not isinstance(rec.get("steps"), dict):
        raise ValueError(
            f"--settings {args.settings!r} must be an audit's report.json (or its 'settings' section) with "
            "per-step settings under 'steps'; it has none (written before guard recorded its settings?)."
        )
    for key, value in given.items():
        if value is not None and key in rec and rec[key] != value:
            raise ValueError(
                f"--{key.replace('_', '-')} {value!r} contradicts --settings {args.settings!r}, which says {rec[key]!r}."
            )
    if args.threads is None and rec.get("threads") is not None:
        args.threads = int(rec["threads"])
        _set_threads(args)
    return AuditOptions(
        seed=int(rec.get("seed", 0)),
        quick=bool(rec.get("quick", False)),
        harden=bool(rec.get("harden", False)),
        export=bool(rec.get("export", True)),
        repetitions=int(rec.get("repetitions", 10)),
        settings=AuditSettings.from_dict(rec["steps"]),
        **common,
    )


def _cmd_audit(args: argparse.Namespace) -> int:
    from guard.audit import run_audit

    _check_key_env(args)
    opts = _audit_options(args)
    args.seed = opts.seed  # a user folder's 80/20 split follows the audit's seed
    s = _setup(args, progress=not args.quiet)
    report = run_audit(
        s.model, s.train, s.test, args.out, model_name=s.name, data_source=s.source, options=opts, resume=args.resume
    )
    m = report.get("model", {})
    print(
        f"clean accuracy {m.get('clean_accuracy', float('nan')):.4f} on {m.get('data', {}).get('test')} held-out images"
    )
    for name, sec in report.get("attacks", {}).items():
        if isinstance(sec, dict) and "success_rate" in sec:
            print(f"attack {name:<18} success {sec['success_rate']:.3f}")
    print(f"wrote {args.out}/report.json")
    errors = dict(report.get("errors", {}))
    page_error = errors.pop("report", None)
    if page_error is None:
        print(f"wrote {args.out}/report.html")
    else:  # the page is a view of the results; it does not fail the audit (rebuild it with guard report)
        print(f"guard audit: warning: {args.out}/report.html not written: {page_error}", file=sys.stderr)
    for step, msg in errors.items():
        print(f"guard audit: step {step} failed: {msg}", file=sys.stderr)
    return 1 if errors else 0


# ---------------------------------------------------------------- guard report


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="(re)build OUT/report.html from OUT/report.json and OUT/artifacts",
        description="Build the self-contained page OUT/report.html (inline images, no scripts, no network) from what guard "
        "audit wrote to OUT: for an interrupted or resumed audit, or after upgrading guard. Exits 2 when OUT has no readable "
        "report.json or it is newer than this guard reads; missing artifacts only leave their part of the page out.",
    )
    p.add_argument("out", metavar="OUT", help="the audit's output folder (guard audit --out OUT)")
    p.add_argument("--html", metavar="FILE", default=None, help="where to write the page (default OUT/report.html)")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from guard.report import write_page

    page = write_page(args.out, path=args.html)
    print(f"wrote {page.path} ({page.bytes / 1e6:.2f} MB, {len(page.sections)} sections, {page.seconds:.1f} s)")
    for name, why in page.missing.items():
        print(
            f"guard report: artifacts/{name}.safetensors {'is missing' if why == 'missing' else 'is unreadable: ' + why}; "
            "the page says what it leaves out",
            file=sys.stderr,
        )
    for section, err in page.failed.items():
        print(f"guard report: section {section} could not be drawn: {err}", file=sys.stderr)
    return 1 if page.failed else 0


# ---------------------------------------------------------------- guard harden


def _add_harden(sub: argparse._SubParsersAction) -> None:
    from guard.training import HardenConfig

    d = HardenConfig()
    p = sub.add_parser(
        "harden",
        help="retrain a model with an (n+1)-th reject class against fresh attacks (Nguyen et al. 2015)",
        description="Rounds of: attack the current model (fooling images by gradient ascent, direct and CPPN evolution; "
        "localized patches), label the images as a reject class, fine-tune. Writes OUT/harden.json (the report's harden "
        "section), OUT/hardened_model.safetensors (RejectClassifier.save) and checkpoints in OUT/checkpoints (resume "
        "with --resume). Runs under 'torchrun --nproc_per_node=N -m guard harden ...' as well (DDP). Defaults are "
        "guard.training.HardenConfig's.",
    )
    _add_model_and_data(p, "'module:callable' giving an nn.Module (its last nn.Linear, or --head, grows)")
    _add_harden_rounds(p, d)
    _add_harden_online(p, d)
    _add_harden_training(p, d)
    p.add_argument("--out", default="out-harden", metavar="DIR")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    p.add_argument("--device", default="cpu")
    _add_threads(p)
    _add_key_env(p, "OUT/hardened_model.safetensors")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_harden)


def _add_harden_rounds(p: argparse.ArgumentParser, d: Any) -> None:
    """``guard harden``'s options of the offline rounds (``d``: the default HardenConfig)."""
    from guard.training import ROUND_ATTACKS

    p.add_argument("--head", default=d.head, help="dotted name of the classifier's final nn.Linear")
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--epochs-per-round", type=int, default=d.epochs_per_round)
    p.add_argument(
        "--reject-share",
        type=float,
        default=d.reject_share,
        help=f"share of reject images in each epoch (default {d.reject_share})",
    )
    p.add_argument(
        "--attacks",
        default=",".join(d.attacks),
        help=f"comma-separated round attacks (default {','.join(d.attacks)}; choose from {','.join(ROUND_ATTACKS)})",
    )
    p.add_argument("--budget", choices=["quick", "default"], default="default", help="attack sizes per round")


def _add_harden_online(p: argparse.ArgumentParser, d: Any) -> None:
    """``guard harden``'s options of the online methods (``d``: the default HardenConfig)."""
    from guard.training.online_losses import ONLINE_METHODS

    p.add_argument(
        "--method",
        default="rounds",
        choices=["rounds", *ONLINE_METHODS],
        help="rounds (default): the offline rounds above; pgd, fgsm_rs, trades or reject: attack every training "
        "batch against the current model and train on it at once (adversarial training; reject: the reject "
        "class absorbs what the attack finds)",
    )
    p.add_argument(
        "--eps",
        type=float,
        default=None,
        help="online methods: the L-inf radius (required; e.g. 0.3 MNIST, 0.0314 CIFAR-10)",
    )
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"online methods: epochs (default {d.epochs})")
    p.add_argument(
        "--attack-steps", type=int, default=d.attack_steps, help="online methods: the training attack's steps"
    )
    p.add_argument(
        "--step-size",
        type=float,
        default=None,
        help="online methods: the attack's step (default: 1.25 eps for fgsm_rs, 2.5 eps / steps otherwise)",
    )
    p.add_argument("--trades-beta", type=float, default=d.trades_beta)
    p.add_argument("--reject-weight", type=float, default=d.reject_weight)
    p.add_argument("--eps-warmup-epochs", type=float, default=d.eps_warmup_epochs)
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="BATCHES",
        help="online methods: also checkpoint every this many batches inside an epoch",
    )


def _add_harden_training(p: argparse.ArgumentParser, d: Any) -> None:
    """``guard harden``'s fine-tuning options shared by every method (``d``: the default HardenConfig)."""
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"learning rate (default {d.lr} with Adam for the rounds, "
        "0.05 with SGD and a cosine schedule for the online methods)",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument(
        "--online-fooling-steps",
        type=int,
        default=d.online_fooling_steps,
        metavar="K",
        help="also train on fresh gradient-ascent fooling images (K steps) in every batch (default 0: off)",
    )
    p.add_argument(
        "--trainable",
        default=None,
        metavar="NAMES",
        help="comma-separated dotted module names to fine-tune besides the head ('' = the head only; default: everything)",
    )
    p.add_argument(
        "--freeze-known-classes",
        action="store_true",
        help="keep the head's rows for the known classes; only the reject row learns (for data that lacks some classes)",
    )
    p.add_argument(
        "--reject-images",
        metavar="FILE",
        default=None,
        help="a safetensors file of known-bad images (tensor 'x', N x C x H x W floats in [0, 1]), labelled reject "
        "from round 1 on beside each round's attacks (e.g. fooling images of a longer evolution run)",
    )


def _cmd_harden(args: argparse.Namespace) -> int:
    from guard.audit.harden import run_harden_job, summary_lines
    from guard.demo import demo_augment

    _check_key_env(args)
    s = _setup(args, progress=not args.quiet, stream=True)  # an image folder is streamed, never loaded whole
    section = run_harden_job(
        s.model,
        s.train,
        s.test,
        _harden_config(args),
        args.out,
        augment=demo_augment(s.demo),
        resume=args.resume,
        progress=not args.quiet,
        reject_images=args.reject_images,
        checkpoint_every=args.checkpoint_every,
        key_env=args.key_env,
        device=args.device,
    )
    if section is not None:  # rank 0 (or no torchrun)
        print("\n".join(summary_lines(section)))
    return 0


def _harden_config(args: argparse.Namespace) -> Any:
    """The :class:`~guard.training.HardenConfig` that ``guard harden``'s flags describe."""
    from guard.training import AttackBudget, HardenConfig

    lr = args.lr if args.lr is not None else (HardenConfig().lr if args.method == "rounds" else 0.05)
    return HardenConfig(
        method=args.method,
        eps=args.eps,
        epochs=args.epochs,
        attack_steps=args.attack_steps,
        step_size=args.step_size,
        trades_beta=args.trades_beta,
        reject_weight=args.reject_weight,
        eps_warmup_epochs=args.eps_warmup_epochs,
        rounds=args.rounds,
        epochs_per_round=args.epochs_per_round,
        reject_share=args.reject_share,
        lr=lr,
        batch_size=args.batch_size,
        attacks=tuple(a.strip() for a in args.attacks.split(",") if a.strip()),
        budget=AttackBudget.quick() if args.budget == "quick" else AttackBudget(),
        seed=args.seed,
        head=args.head,
        online_fooling_steps=args.online_fooling_steps,
        freeze_known_classes=args.freeze_known_classes,
        trainable=None if args.trainable is None else tuple(t.strip() for t in args.trainable.split(",") if t.strip()),
    )


# ---------------------------------------------------------------- guard export


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a model (and its fitted detectors) as one ONNX graph; check parity with onnxruntime",
        description="Export the model, a hardened model (--hardened) and/or a saved GuardedModel folder (--guarded; "
        "guard audit writes OUT/guarded) as one ONNX graph: logits, detector scores and flags; then compare PyTorch "
        "and onnxruntime on held-out images.",
    )
    _add_model_and_data(p, "TorchScript file, exported program (.pt2) or 'module:callable'")
    p.add_argument(
        "--hardened",
        metavar="FILE",
        help="a saved RejectClassifier (guard harden's OUT/hardened_model.safetensors) grown from the model",
    )
    p.add_argument(
        "--guarded", metavar="DIR", help="a saved GuardedModel folder (GuardedModel.save / guard audit's OUT/guarded)"
    )
    p.add_argument(
        "--out", default="model.onnx", metavar="FILE", help="the .onnx file to write (its folder must exist)"
    )
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument(
        "--fp16-backbone", action="store_true", help="run the classifier in float16, detector heads in float32"
    )
    p.add_argument(
        "--leave-out", default="", metavar="NAMES", help="comma-separated detectors whose heads stay out of the graph"
    )
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime parity check")
    p.add_argument("--seed", type=int, default=0)
    _add_threads(p)
    _add_key_env(p, "the .onnx file (FILE.sig)")
    p.add_argument(
        "--guarded-sha256",
        metavar="HEX",
        default=None,
        help="refuse the --guarded folder unless its guarded.json has this SHA-256 (what GuardedModel.save returned)",
    )
    p.add_argument(
        "--hardened-sha256", metavar="HEX", default=None, help="refuse the --hardened file unless it has this SHA-256"
    )
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    import guard
    from guard.export import to_onnx

    _check_key_env(args)
    s = _setup(args, progress=False)
    model = s.model
    if args.hardened:
        try:
            model = guard.RejectClassifier.load(
                args.hardened, model, key_env=args.key_env, expected_sha256=args.hardened_sha256
            )
        except ValueError as err:
            if "layer name" not in str(err):
                raise
            raise ValueError(
                f"--hardened {args.hardened!r} does not fit the model built by {s.name!r}: {err} Pass the "
                "--demo NAME or --model SPEC that the model was hardened from."
            ) from err
    obj = (
        guard.GuardedModel.load(args.guarded, model, key_env=args.key_env, expected_sha256=args.guarded_sha256)
        if args.guarded
        else model
    )
    x = s.test.x[:64]
    rep = to_onnx(
        obj,
        args.out,
        x[:8],
        opset=args.opset,
        fp16_backbone=args.fp16_backbone,
        leave_out=[n for n in args.leave_out.split(",") if n],
        parity_inputs=None if args.no_check else x,
        key_env=args.key_env,
    )
    print(
        f"wrote {rep.path} (opset {rep.opset}, {rep.file_bytes / 1e6:.1f} MB, outputs: {', '.join(rep.output_names)})"
    )
    print(f"sha256 {rep.sha256} (also in {rep.digest_path}); serve it with load_session(..., expected_sha256=...)")
    if rep.signed:
        print(f"signed with HMAC-SHA256 under the key in ${args.key_env}: {rep.signature_path}")
    if rep.heads.get("left_out"):
        print(f"left out: {rep.heads['left_out']}")
    if rep.parity is not None:
        for name, v in rep.parity["outputs"].items():
            figs = "  ".join(f"{k} {v[k]:.3g}" for k in ("max_abs", "max_rel", "agreement", "n_diff") if k in v)
            print(f"parity {name:<22} {figs}  {'ok' if v.get('passed') else 'OUT OF TOLERANCE'}")
        return 0 if rep.parity["passed"] else 1
    return 0


# ---------------------------------------------------------------- the parser

_COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_audit,
    _add_report,
    _add_harden,
    _add_export,
)


def build_parser() -> argparse.ArgumentParser:
    from guard import __version__

    parser = argparse.ArgumentParser(
        prog="guard", description="Attack, detect, harden and export PyTorch image classifiers."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.command is None:
        parser.print_help()
        return 2
    try:
        _set_threads(args)
        return int(args.func(args))
    except (ValueError, TypeError) as err:
        print(f"guard {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
