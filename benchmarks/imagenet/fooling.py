"""Issue 20, part 2: Nguyen et al.'s fooling images and reject-class retraining on EfficientNet-Lite0 at 224 px.

Steps (``--step``), each its own process (time and peak RSS per step), results merged into
``benchmarks/results/imagenet_feature_fooling.json`` by ``benchmarks.imagenet.feature_fooling.record``:

* ``gradient``: ``guard.attacks.FoolingGradient`` (log-odds ascent from noise, default lr) on
  ``--grad-classes`` classes in a seeded order (seed 0; 1000: all), ``--grad-chunk`` classes per
  batch, each batch checkpointed.
* ``evolve``: ``guard.attacks.FoolingEvolution`` (pyribs MAP-Elites, one cell per class) over all
  1,000 classes, ``--encoding cppn|direct``, ``--population`` children per generation,
  ``--generations`` (``--classes K``: a seeded subset of K cells instead, results under
  ``fooling.cppn_subsetK`` beside the full run's figures for the same classes); images at
  224 px (the direct encoding evolves every pixel at 224 px, the CPPN renders at 224 px); a grid PNG of evolved images under ``benchmarks/results/``.
* ``harden``: ``guard.harden`` with a reject class and ``trainable=()`` (the head only; with
  ``--freeze-known-classes`` only its reject row, so that the classes without training images
  keep their logits) on the
  network restricted to ``--harden-classes`` seeded classes (seed 1; its head keeps their rows):
  at 1,000 classes every round scores its 1,000 fooling elites five times (about 6,400 forward
  passes, ~40 min of one shared core), which did not fit. Data: the reference images of those
  classes plus the fooling images harden's own round attack makes (``fooling_cppn``,
  ``--population`` children per generation, ``--harden-generations``); clean top-1 on the pool
  images of those classes before/after; harden's fresh CPPN attack with the same budget
  evolves again against the model before and after (Nguyen et al.'s median confidence).
  ``--reject-from cppn`` also gives harden the evolve step's elites (one per class, its last
  generation) as ``reject_images``: Nguyen et al. retrain on the images their evolution made
  (results under ``fooling.after_harden_with_elites``).
* ``harden_gradient``: gradient-ascent fooling images against the model before and after harden.
* ``reevolve``: Nguyen's "evolve again" at a real budget: CPPN MAP-Elites (the evolve step's seed
  and population, ``--generations``) against the hardened model of the same harden flags, beside
  the evolve step's own run against the original model at the same generation.
* ``detectors``: Mahalanobis, LID and PPCA fitted on 600 reference images' penultimate features,
  calibrated to 1% FPR on the other 200, TPR on a seeded subset (``--det-n``) of the fooling
  images of each step above.

Nothing here was tuned: every setting is a library default or was sized to the clock.

Writes benchmarks/results/imagenet_feature_fooling.json (``--out``; merged, through
:func:`guard.core.provenance.write_results`), e.g.::

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.imagenet.fooling --step evolve --encoding cppn --population 50 --generations 30
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.imagenet import efficientnet as imagenet_efficientnet
from benchmarks.imagenet.feature_fooling import CACHE, PENULT, RESULTS, features, load_all, record, split
from guard.attacks import FoolingEvolution, FoolingGradient

THRESHOLDS = {"share_99": 0.99, "share_9999": 0.9999}


def _save(name: str, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    CACHE.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(CACHE / f"{name}.safetensors"))


def _load(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(CACHE / f"{name}.safetensors"))


def _shares(conf: torch.Tensor) -> dict[str, float]:
    return {
        "median_conf": float(conf.median()),
        **{k: float((conf >= t).float().mean()) for k, t in THRESHOLDS.items()},
    }


def grid(images: torch.Tensor, name: str, nrow: int = 8) -> str:
    import torch.nn.functional as F
    from torchvision.utils import save_image

    path = RESULTS.parent / name
    save_image(F.interpolate(images, size=112, mode="area"), str(path), nrow=nrow, padding=2)
    return str(path.relative_to(RESULTS.parent.parent.parent))


def step_gradient(args: argparse.Namespace) -> dict[str, Any]:
    """Gradient ascent on ``--grad-classes`` classes in seeded order (seed 0), ``--grad-chunk`` at a
    time; each chunk is checkpointed under the cache when done (an interrupted run resumes), and
    the figures so far are recorded after every chunk. Chunk ``i`` starts from the noise of seed ``i``."""
    from guard.core.cache import load_tensors, save_tensors

    model = imagenet_efficientnet.build()
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(0))[: args.grad_classes]
    parts: list[dict[str, torch.Tensor]] = []
    t0, c0 = time.perf_counter(), time.process_time()
    out: dict[str, Any] = {}
    for i, lo in enumerate(range(0, order.numel(), args.grad_chunk)):
        cls = order[lo : lo + args.grad_chunk].sort().values
        path = CACHE / "gradient" / f"chunk-{lo}-{cls.numel()}-steps{args.grad_steps}.safetensors"
        if path.is_file():
            parts.append(load_tensors(path)[0])
        else:
            res = FoolingGradient(steps=args.grad_steps, threshold=0.9999, seed=i)(
                model, shape=(3, 224, 224), classes=cls
            )
            part = {
                "x": res.x_adv.detach().cpu(),
                "label": res.extras["label"].cpu(),
                "confidence": res.extras["confidence"].cpu(),
                "steps": res.extras["steps"].cpu(),
                "seconds": torch.tensor(res.extras["seconds"], dtype=torch.float64),
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            save_tensors(path, part)
            parts.append(part)
        conf = torch.cat([p["confidence"] for p in parts])
        steps = torch.cat([p["steps"] for p in parts])
        out = {
            "fooling": {
                "gradient": {
                    **_shares(conf),
                    "classes": int(conf.numel()),
                    "class_seed": 0,
                    "max_steps": args.grad_steps,
                    "chunk": args.grad_chunk,
                    "min_conf": float(conf.min()),
                    "steps_to_9999_median": float(steps[steps >= 0].float().median())
                    if bool((steps >= 0).any())
                    else None,
                    "steps_to_9999_max": int(steps.max()),
                    "never_reached": int((steps < 0).sum()),
                    "seconds": round(sum(float(p["seconds"]) for p in parts), 1),
                }
            }
        }
        print(f"gradient {conf.numel()} classes: {_shares(conf)} min {float(conf.min()):.6f}", flush=True)
        record("gradient_partial", t0, c0, out, args.out)
    _save(
        "fooling_gradient", {"x": torch.cat([p["x"] for p in parts]), "label": torch.cat([p["label"] for p in parts])}
    )
    return out


def step_evolve(args: argparse.Namespace) -> dict[str, Any]:
    model = imagenet_efficientnet.build()
    evo = FoolingEvolution(
        encoding=args.encoding,
        population=args.population,
        generations=args.generations,
        threshold=0.9999,
        stop_when_done=False,
        extra_samples=0,
        seed=args.seed,
    )
    last = [time.perf_counter()]

    def progress(g: int, fooled: int) -> None:
        if g % 5 == 0:
            print(f"gen {g}: {fooled} classes >= 99.99% ({time.perf_counter() - last[0]:.0f} s)", flush=True)

    cls, key = _evolve_classes(args)
    # checkpointed: a stopped run resumes, and a finished one continues with a larger --generations
    sub = f"-c{args.classes}" if args.classes < 1000 else ""
    ckpt = (
        Path(args.checkpoint_dir)
        if args.checkpoint_dir
        else CACHE / f"evolve-{args.encoding}-p{args.population}-s{args.seed}{sub}"
    )
    res = evo(
        model,
        shape=(3, 224, 224),
        classes=cls.tolist(),
        progress=progress,
        checkpoint_dir=ckpt,
        checkpoint_every=args.checkpoint_every,
    )
    conf = res.extras["elite_confidence"]
    labels = res.extras["elite_label"]
    _save(f"fooling_{key}", {"x": res.x_adv.cpu(), "label": labels.cpu(), "confidence": conf.cpu()})
    top = conf.argsort(descending=True)[:16]
    out = {
        **_shares(conf),
        "classes": int(labels.numel()),
        "generations": int(res.extras["generations"]),
        "population": args.population,
        "evaluations": int(res.extras["evaluations"]),
        "seed": args.seed,
        "seconds": round(res.extras["seconds"], 1),
        "history": res.extras["history"],
        "grid": grid(res.x_adv[top].cpu(), f"imagenet_fooling_{key}.png"),
        "grid_classes": labels[top].tolist(),
        "grid_confidence": [round(float(c), 4) for c in conf[top]],
    }
    if args.classes < 1000:
        out.update(_full_run_reference(args, cls, out["generations"]))
    print(f"{key}: {_shares(conf)}", flush=True)
    return {"fooling": {key: out}}


def _evolve_classes(args: argparse.Namespace) -> tuple[torch.Tensor, str]:
    """The evolve step's cells: all 1,000 classes (results key ``cppn`` / ``direct``), or with
    ``--classes K`` a seeded subset (seed 3, sorted; key ``cppn_subset{K}``). The subset run tests
    one explanation of the full run's shortfall: parents are drawn uniformly from the elites, so
    over 1,000 cells each class's elite breeds 1/50 of the children it would over 20."""
    if args.classes >= 1000:
        return torch.arange(1000), args.encoding
    cls = torch.randperm(1000, generator=torch.Generator().manual_seed(3))[: args.classes].sort().values
    return cls, f"{args.encoding}_subset{args.classes}"


def _full_run_reference(args: argparse.Namespace, cls: torch.Tensor, generations: int) -> dict[str, Any]:
    """For a ``--classes`` subset run of ``generations`` generations: the children bred per cell,
    and the full 1,000-class run's median for the same classes (its last elites), its
    generations and its children per cell."""
    ref: dict[str, Any] = {"class_seed": 3, "children_per_cell": generations * args.population / args.classes}
    path = CACHE / f"fooling_{args.encoding}.safetensors"
    if path.is_file():
        d = _load(f"fooling_{args.encoding}")
        keep = torch.isin(d["label"], cls)
        ref["full_run_same_classes"] = {"median_conf": float(d["confidence"][keep].median()), "n": int(keep.sum())}
    if Path(args.out).is_file():
        full = json.loads(Path(args.out).read_text()).get("fooling", {}).get(args.encoding, {})
        if full:
            ref["full_run_same_classes"] = {
                **ref.get("full_run_same_classes", {}),
                "generations": full.get("generations"),
                "children_per_cell": full.get("generations", 0) * full.get("population", 0) / 1000,
            }
    return ref


def subset_model(classes: torch.Tensor) -> torch.nn.Module:
    """The pretrained network restricted to ``classes``: its head keeps only their rows."""
    model = imagenet_efficientnet.build()
    fc = model[1]._fc
    head = torch.nn.Linear(fc.in_features, int(classes.numel()))
    with torch.no_grad():
        head.weight.copy_(fc.weight[classes])
        head.bias.copy_(fc.bias[classes])
    model[1]._fc = head
    return model.eval()


def step_harden(args: argparse.Namespace) -> dict[str, Any]:
    import guard
    from guard.training.harden import harden
    from guard.training.round_attacks import AttackBudget

    cls = _harden_classes(args)
    x, y = load_all()
    pool, ref = split()
    remap = torch.full((1000,), -1, dtype=torch.long)
    remap[cls] = torch.arange(cls.numel())
    tr, te = ref[remap[y[ref]] >= 0], pool[remap[y[pool]] >= 0]
    train, test = guard.Split(x[tr].contiguous(), remap[y[tr]]), guard.Split(x[te].contiguous(), remap[y[te]])
    del x
    budget = AttackBudget(per_class=1, generations=args.harden_generations, population=args.population, evolved_extra=0)
    tag = _harden_tag(args)
    given, given_info = _reject_images(args, cls)
    res = harden(
        subset_model(cls),
        train,
        test=test,
        rounds=1,
        epochs_per_round=args.epochs,
        attacks=("fooling_cppn",),
        budget=budget,
        trainable=(),
        head="1._fc",
        batch_size=32,
        lr=args.lr,
        seed=0,
        progress=False,
        freeze_known_classes=args.freeze_known_classes,
        checkpoint_dir=CACHE / f"harden-{tag}",
        reject_images=given,
    )
    h = res.history[-1]
    print(json.dumps(h, default=str)[:2000], flush=True)
    fresh_b, fresh_a = res.baseline.get("fresh", {}), h.get("fresh", {})
    return {
        "fooling": {
            "after_harden" + _with(args): {
                "reject_images": given_info,
                "harden_flags": tag,
                "median_conf": fresh_a.get("fooling_median_confidence"),
                "median_conf_before": fresh_b.get("fooling_median_confidence"),
                "share_99": fresh_a.get("fooling_classes_ge99"),
                "share_99_before": fresh_b.get("fooling_classes_ge99"),
                "share_9999": None,
                "classes": int(cls.numel()),
                "class_seed": 1,
                "generations": args.harden_generations,
                "population": args.population,
                "encoding": "cppn",
                "freeze_known_classes": args.freeze_known_classes,
                "epochs": args.epochs,
                "lr": args.lr,
                "clean_top1_before": res.baseline["clean_accuracy"],
                "clean_top1_after": h["clean_accuracy"],
                "clean_rejected_after": h["clean_rejected_share"],
                "n_train": len(train),
                "n_held_out": len(test),
                "fresh_rejected_share_after": fresh_a.get("rejected_share"),
            }
        },
        "harden" + _with(args): {
            "config": res.config.to_dict() if res.config else None,
            "archive_size": res.archive_size,
            "timings": res.timings,
            "round": {k: v for k, v in h.items() if k != "fresh"},
            "fresh_after": fresh_a,
            "baseline_fresh": fresh_b,
            "model": f"EfficientNet-Lite0 restricted to {cls.numel()} seeded classes (head rows), head-only fine-tuning",
            "train": "the reference images of those classes",
            "held_out": "the pool images of those classes",
        },
    }


def _harden_tag(args: argparse.Namespace) -> str:
    tag = f"c{args.harden_classes}-g{args.harden_generations}-p{args.population}-e{args.epochs}-lr{args.lr:g}-f{int(args.freeze_known_classes)}"
    return tag + (f"-r{args.reject_from}" if args.reject_from != "none" else "")


def _harden_classes(args: argparse.Namespace) -> torch.Tensor:
    """The ``--harden-classes`` seeded classes (seed 1, not the split's seed 0), sorted."""
    return torch.randperm(1000, generator=torch.Generator().manual_seed(1))[: args.harden_classes].sort().values


def _with(args: argparse.Namespace) -> str:
    """The results-key suffix of a run whose reject class also trains on the evolution run's
    elites (Nguyen et al.'s protocol): ``after_harden`` -> ``after_harden_with_elites``."""
    return "" if args.reject_from == "none" else "_with_elites"


def _reject_images(args: argparse.Namespace, cls: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, Any] | None]:
    """``--reject-from cppn``: the elites of the ``--step evolve --encoding cppn`` run (one per
    class, its last generation) whose class is among the hardened ones, as ``harden(reject_images=)``.
    Nguyen et al. retrain on the images their evolution run produced."""
    if args.reject_from == "none":
        return None, None
    path = CACHE / f"fooling_{args.reject_from}.safetensors"
    if not path.is_file():
        raise SystemExit(
            f"{path} is missing: run --step evolve --encoding {args.reject_from} first (it resumes from its checkpoint)"
        )
    d = _load(f"fooling_{args.reject_from}")
    keep = torch.isin(d["label"], cls)
    meta = json.loads(Path(args.out).read_text())["fooling"][args.reject_from] if Path(args.out).is_file() else {}
    info = {
        "from": args.reject_from,
        "n": int(keep.sum()),
        "generations": meta.get("generations"),
        "median_conf": float(d["confidence"][keep].median()),
    }
    return d["x"][keep].contiguous(), info


def _hardened(args: argparse.Namespace, cls: torch.Tensor) -> torch.nn.Module:
    """The RejectClassifier the ``harden`` step of the same flags wrote (its final checkpoint)."""
    from guard.training.checkpoint import load_checkpoint
    from guard.training.reject import RejectClassifier, grow_head

    found = load_checkpoint(CACHE / f"harden-{_harden_tag(args)}")
    if found is None:
        raise SystemExit(
            f"no harden checkpoint for these flags ({_harden_tag(args)}): run --step harden with them first"
        )
    model_state, _, _, meta = found
    if int(meta.get("round_done", 0)) < 1:
        raise SystemExit(
            f"the harden checkpoint {_harden_tag(args)} is unfinished: run --step harden with these flags again"
        )
    net, head = grow_head(subset_model(cls), num_classes=int(cls.numel()), head="1._fc")
    net.load_state_dict(model_state)
    return RejectClassifier(net, int(cls.numel()), head).eval()


def step_reevolve(args: argparse.Namespace) -> dict[str, Any]:
    """Nguyen et al.'s "evolve again": CPPN MAP-Elites against the model the ``harden`` step of the
    same flags made, ``--generations`` generations, the evolve step's seed and population, the
    softmax over every output (the reject class competes). Beside it, the evolve step's own run
    against the original model at the same generation (``fooling.cppn.history``): the same
    search, the same budget, only the model differs. Checkpointed under the cache."""
    from guard.core.models import predict_labels

    cls = _harden_classes(args)
    model = _hardened(args, cls)
    n = int(cls.numel())
    evo = FoolingEvolution(
        encoding="cppn",
        population=args.population,
        generations=args.generations,
        threshold=0.9999,
        stop_when_done=False,
        extra_samples=0,
        seed=args.seed,
    )

    def progress(g: int, fooled: int) -> None:
        if g % 10 == 0:
            print(f"reevolve gen {g}: {fooled} classes >= 99.99%", flush=True)

    ckpt = CACHE / f"reevolve-{_harden_tag(args)}-s{args.seed}"  # the tag holds the population
    res = evo(
        model,
        shape=(3, 224, 224),
        classes=range(n),
        progress=progress,
        checkpoint_dir=ckpt,
        checkpoint_every=args.checkpoint_every,
    )
    conf = res.extras["elite_confidence"]
    rejected = float((predict_labels(model, res.x_adv) == n).float().mean())
    before = None
    if Path(args.out).is_file() and n == 1000:
        hist = json.loads(Path(args.out).read_text()).get("fooling", {}).get("cppn", {}).get("history", [])
        at = [h for h in hist if h["generation"] <= args.generations]
        if at:
            before = {"generation": at[-1]["generation"], "median_conf": at[-1]["median_confidence"]}
    out = {
        **_shares(conf),
        "classes": n,
        "generations": int(res.extras["generations"]),
        "population": args.population,
        "seed": args.seed,
        "elites_rejected_share": rejected,
        "seconds": round(res.extras["seconds"], 1),
        "original_model_same_run": before,
        "harden_flags": _harden_tag(args),
        "history": res.extras["history"],
    }
    print("reevolve", {k: v for k, v in out.items() if k != "history"}, flush=True)
    return {"fooling": {"reevolve_after_harden": out}}


def step_harden_gradient(args: argparse.Namespace) -> dict[str, Any]:
    """Gradient-ascent fooling images (``FoolingGradient``, the softmax over every output, the
    reject class included) against the model before and after the ``harden`` step of the same
    flags, rebuilt from that step's final checkpoint: the attacker who knows the reject class is
    there, beside Nguyen's re-evolution. ``--grad-classes`` of the hardened classes (seed 2)."""
    from guard.core.models import predict_labels

    cls = _harden_classes(args)
    base = subset_model(cls)
    hardened = _hardened(args, cls)
    targets = (
        torch.randperm(int(cls.numel()), generator=torch.Generator().manual_seed(2))[: args.grad_classes].sort().values
    )
    out: dict[str, Any] = {
        "classes": int(targets.numel()),
        "class_seed": 2,
        "max_steps": args.grad_steps,
        "harden_flags": _harden_tag(args),
    }
    for name, model in (("before", base), ("after", hardened)):
        res = FoolingGradient(steps=args.grad_steps, threshold=0.9999, seed=0)(
            model, shape=(3, 224, 224), classes=targets
        )
        conf = res.extras["confidence"]
        top = predict_labels(model, res.x_adv)
        out[name] = {
            **_shares(conf),
            "rejected_share": float((top == int(cls.numel())).float().mean()) if name == "after" else 0.0,
            "seconds": round(res.extras["seconds"], 1),
        }
        print(name, out[name], flush=True)
    return {"harden_gradient" + _with(args): out}


def step_detectors(args: argparse.Namespace) -> dict[str, Any]:
    from guard.core.features import extract_features
    from guard.detectors import LIDDetector, MahalanobisDetector, PPCAManifold

    feats = features()
    _, ref = split()
    perm = ref[torch.randperm(ref.numel(), generator=torch.Generator().manual_seed(0))]
    fit_i, cal_i = perm[:600], perm[600:]
    model = imagenet_efficientnet.build()
    pool, _ = split()
    sets = {"clean_pool_fpr_check": (feats[PENULT][pool], feats["logits"][pool])}  # should be flagged ~1%
    for name in ("gradient", "cppn", "direct"):
        path = CACHE / f"fooling_{name}.safetensors"
        if path.is_file():
            d = _load(f"fooling_{name}")
            pick = torch.randperm(d["x"].shape[0], generator=torch.Generator().manual_seed(0))[: args.det_n]
            logits, f = extract_features(model, d["x"][pick], [PENULT], batch_size=32)
            sets[name] = (f[PENULT], logits)
    out: dict[str, Any] = {
        "fit": 600,
        "calibrate": 200,
        "fpr": 0.01,
        "layer": PENULT,
        "fooling_images_per_set": args.det_n,
        "sets": {k: int(v[0].shape[0]) for k, v in sets.items()},
    }

    # One image per class leaves no within-class covariance, so Mahalanobis is fitted as one
    # Gaussian over all clean features (every label 0, scored under class 0); PPCA falls back to
    # its pooled PPCA for classes below min_class_size (all of them here); LID is class-agnostic.
    def one_class(lg: torch.Tensor) -> torch.Tensor:
        return torch.zeros(lg.shape[0], 1)

    dets = ((MahalanobisDetector([PENULT]), True), (LIDDetector([PENULT], k=20), False), (PPCAManifold(PENULT), False))
    for det, pooled in dets:
        name = type(det).__name__ + (" (one Gaussian)" if pooled else "")
        lab = (lambda lg: one_class(lg)) if pooled else (lambda lg: lg)
        try:
            det.fit_features({PENULT: feats[PENULT][fit_i]}, torch.zeros_like(fit_i) if pooled else feats["y"][fit_i])
            det.calibrate(det.score_features({PENULT: feats[PENULT][cal_i]}, lab(feats["logits"][cal_i])), 0.01)
            out[name] = {
                k: float(det.predict_scores(det.score_features({PENULT: f}, lab(lg))).float().mean())
                for k, (f, lg) in sets.items()
            }
        except (ValueError, RuntimeError) as err:  # reported, not hidden: e.g. one image per class
            out[name] = {"error": str(err)[:300]}
        print(name, out[name], flush=True)
    return {"detectors_tpr_at_1pct_fpr": out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--step", required=True, choices=["gradient", "evolve", "harden", "harden_gradient", "reevolve", "detectors"]
    )
    ap.add_argument("--encoding", default="cppn", choices=["cppn", "direct"])
    ap.add_argument("--population", type=int, default=50)
    ap.add_argument("--generations", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--classes", type=int, default=1000, help="evolve: a seeded subset of K classes as the cells (seed 3)"
    )
    ap.add_argument("--grad-classes", type=int, default=10)
    ap.add_argument("--grad-steps", type=int, default=60)
    ap.add_argument("--checkpoint-every", type=int, default=20, help="evolve: generations between checkpoints")
    ap.add_argument("--checkpoint-dir", default=None, help="evolve: the checkpoint folder (default: under the cache)")
    ap.add_argument("--grad-chunk", type=int, default=20, help="classes per gradient-ascent batch (each checkpointed)")
    ap.add_argument("--harden-generations", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--harden-classes", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--freeze-known-classes",
        action="store_true",
        help="harden trains the reject row only (HardenConfig.freeze_known_classes): the training images "
        "cover 79 of the classes, one image each, and the held-out images are of the other 21",
    )
    ap.add_argument(
        "--reject-from",
        default="none",
        choices=["none", "cppn", "direct"],
        help="harden / harden_gradient / reevolve: also train the reject class on the elites of that evolve run",
    )
    ap.add_argument(
        "--det-n", type=int, default=200, help="fooling images per set scored by the detectors (seeded subset)"
    )
    ap.add_argument("--out", default=str(RESULTS), help="the results JSON the step merges into (default: %(default)s)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    np.random.seed(0)
    t0, c0 = time.perf_counter(), time.process_time()
    fn = {
        "gradient": step_gradient,
        "evolve": step_evolve,
        "harden": step_harden,
        "harden_gradient": step_harden_gradient,
        "reevolve": step_reevolve,
        "detectors": step_detectors,
    }[args.step]
    extra = fn(args)
    name = args.step + (f"_{_evolve_classes(args)[1]}" if args.step == "evolve" else "")
    name += (
        f"_reject_{args.reject_from}"
        if args.step in ("harden", "harden_gradient", "reevolve") and args.reject_from != "none"
        else ""
    )
    record(name, t0, c0, extra, args.out)


if __name__ == "__main__":
    main()
