"""Issue 20: Sabour's feature adversaries and Nguyen's fooling images on a pretrained 224-px classifier.

EfficientNet-Lite0 (``imagenet_efficientnet.build``) and the 1,000-image ImageNet sample
(``benchmarks.imagenet.sample``, one image per class). A seeded split (seed 0) of the sample: 200 *pool*
images (sources, guides, held-out top-1) and 800 *reference* images (the neighbours of the kNN
and local-PPCA analyses, the detectors' clean data, the hardening data). The sample has one
image per class, so the kNN rank and the 3-NN intersection use all 800 reference images, not
the guide's class (the paper has ~1,300 training images per class).

Steps, each its own process so that its time and peak RSS are its own (``--step``):

* ``features``: logits and features of all 1,000 images at both layers, cached (safetensors).
* ``feature_adversary``: L-BFGS-B feature adversaries (``guard.attacks.FeatureAdversary``) of
  ``--pairs`` seeded source-guide pairs (guides correctly classified) at each layer and delta,
  analysed with ``guard.attacks.representation`` and ``guard.detectors.local_ppca``; the
  comparison variants (feature-fgrad, feature-linear, label-opt) at the penultimate layer,
  delta 10/255, on the first ``--variant-pairs`` pairs.
* ``art``: seconds per pair against IBM ART's ``FeatureAdversariesPyTorch`` (PGD) at equal
  distance ratio (``benchmarks/imagenet/fooling.py`` holds the fooling and hardening steps).

Tuning (iterations, batch) was done on pairs drawn with ``--seed 100`` from the reference
images, which are never reported. Results merge into
``benchmarks/results/imagenet_feature_fooling.json`` (``--out``), written by
:func:`guard.core.provenance.write_results`: each step's entry under ``steps`` keeps its own
command and commit, the top-level ``command`` joins them, and ``provenance`` is the last step's.
Writes benchmarks/results/imagenet_feature_fooling.json.

Every chunk of ``--batch`` pairs is checkpointed under the cache when done, keyed by its pairs and
settings, so an interrupted run resumes where it stopped.

Run (one thread each)::

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.imagenet.feature_fooling --step features
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.imagenet.feature_fooling --step feature_adversary --pairs 100 \
        --mid-pairs 100 --side-pairs 100 --mid-side-pairs 100 --side-iter 40 --variant-pairs 20 --max-iter 40 --more-iter 100 --batch 5
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.imagenet.feature_fooling --step art
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.imagenet import efficientnet as imagenet_efficientnet
from benchmarks.imagenet import sample as imagenet_sample
from guard.attacks.feature_adversary import FeatureAdversary
from guard.attacks.representation import active_units, distance_ratio, knn_rank_analysis, summarize
from guard.core.features import extract_features
from guard.core.provenance import git_commit, provenance, write_results
from guard.detectors.local_ppca import local_ppca

PENULT, MID = "1._fc:input", "1._blocks.10"
LAYERS = (PENULT, MID)
DELTAS = (5, 10, 15)  # /255
RESULTS = Path(__file__).resolve().parents[1] / "results" / "imagenet_feature_fooling.json"
CACHE = Path(os.environ.get("GUARD_CACHE_DIR", Path.home() / ".cache" / "guard")) / "imagenet-feature-fooling"
N_POOL = 200


def split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool indices, reference indices) into the sample's 1,000 images (sorted by class)."""
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(seed))
    return perm[:N_POOL].sort().values, perm[N_POOL:].sort().values


def load_all() -> tuple[torch.Tensor, torch.Tensor]:
    return imagenet_sample.load()


def features() -> dict[str, torch.Tensor]:
    """Cached logits and features of the 1,000 sample images at both layers."""
    from safetensors.torch import load_file, save_file

    path = CACHE / "features.safetensors"
    if path.is_file():
        return load_file(str(path))
    model = imagenet_efficientnet.build()
    x, y = load_all()
    logits, f = extract_features(model, x, list(LAYERS), batch_size=32)
    out = {"logits": logits.contiguous(), "y": y.contiguous(), **{k: v.contiguous() for k, v in f.items()}}
    CACHE.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)
    return out


def pairs(
    n: int, seed: int, candidates: torch.Tensor, pred: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` (source, guide) index pairs among ``candidates``: guides correctly classified, all distinct."""
    gen = torch.Generator().manual_seed(seed)
    c = candidates[torch.randperm(candidates.numel(), generator=gen)]
    ok = c[pred[c] == y[c]]
    guides = ok[:n]
    rest = c[~torch.isin(c, guides)]
    if guides.numel() < n or rest.numel() < n:
        raise ValueError(f"not enough images for {n} pairs")
    return rest[:n], guides


def record(step: str, t0: float, c0: float, extra: dict[str, Any], path: str | os.PathLike[str] = RESULTS) -> None:
    """Merge a step's results, wall/CPU seconds and peak RSS into the JSON at ``path`` (under a lock:
    steps run side by side, and each reads, merges and rewrites the one file)."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _merge_into_results(path, step, t0, c0, extra)


def _merge_into_results(path: Path, step: str, t0: float, c0: float, extra: dict[str, Any]) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    for key in ("command", "commit", "provenance"):  # write_results writes them again, for the file as it now is
        data.pop(key, None)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    cmd = f"OMP_NUM_THREADS={torch.get_num_threads()} " + provenance()["command"]
    data.setdefault("steps", {})[step] = {
        "wall_s": round(time.perf_counter() - t0, 1),
        "cpu_s": round(time.process_time() - c0, 1),
        "peak_rss_mib": round(rss),
        "threads": torch.get_num_threads(),
        "command": cmd,
        "commit": git_commit(),
    }

    def merge(into: dict[str, Any], new: dict[str, Any]) -> None:
        for key, val in new.items():
            if isinstance(val, dict) and isinstance(into.get(key), dict):
                merge(into[key], val)
            else:
                into[key] = val

    merge(data, extra)
    write_results(path, dict(sorted(data.items())), command="; ".join(s["command"] for s in data["steps"].values()))


def analyse(
    fa: torch.Tensor,
    fs: torch.Tensor,
    fg: torch.Tensor,
    ref: torch.Tensor,
    pred_a: torch.Tensor,
    pred_s: torch.Tensor,
    pred_g: torch.Tensor,
    seed: int,
) -> dict[str, Any]:
    """Sabour's measures for one (layer, delta, variant) batch, JSON-ready."""
    lp = local_ppca(fa, fg, ref, seed=seed)
    knn = knn_rank_analysis(
        fa, fg, torch.zeros(fa.shape[0], dtype=torch.long), ref, torch.zeros(ref.shape[0], dtype=torch.long), k=3
    )
    g_nearest = (fa - fg).norm(dim=1) < torch.cdist(fa, ref).min(1).values
    au_s, au_g = active_units(fa, fs), active_units(fa, fg)
    return {
        "n": int(fa.shape[0]),
        "guide_agreement": float((pred_a == pred_g).float().mean()),
        "source_agreement": float((pred_a == pred_s).float().mean()),
        "distance_ratio_median": float(distance_ratio(fa, fs, fg).median()),
        "distance_ratio": summarize(distance_ratio(fa, fs, fg)),
        "local_ppca_inlier_share": float(lp["inlier"].float().mean()),
        "local_ppca_relative_loglik": summarize(lp["relative_loglik"]),
        "local_ppca_heldout_relative_loglik": summarize(lp["heldout_median"] - lp["loglik_guide"]),
        "angular_sine_adv": summarize(lp["sine_adv"]),
        "angular_sine_heldout_neighbours": summarize(lp["sine_heldout_median"]),
        "nn3_intersection_mean": float(knn["nn_intersection"].float().mean()),
        "knn_rank_difference": summarize(knn["rank_difference"]),
        "guide_is_nearest_share": float(g_nearest.float().mean()),
        "sparsity_adv": summarize(au_s["sparsity_a"]),
        "sparsity_source": summarize(au_s["sparsity_b"]),
        "sparsity_guide": summarize(au_g["sparsity_b"]),
        "iou_adv_source": summarize(au_s["iou"]),
        "iou_adv_guide": summarize(au_g["iou"]),
    }


def run_attack(
    model: torch.nn.Module,
    layer: str,
    delta: int,
    variant: str,
    xs: torch.Tensor,
    xg: torch.Tensor,
    args: argparse.Namespace,
    max_iter: int | None = None,
    keys: list[str] | None = None,
) -> tuple[torch.Tensor, float]:
    """The adversaries of ``xs`` toward ``xg`` and the attack's seconds.

    With ``keys`` (one id per pair), every chunk of ``--batch`` pairs (one L-BFGS-B problem) is
    checkpointed under the cache as soon as it is done, with its seconds, so an interrupted run
    resumes where it stopped and its timing stays the attack's own.
    """
    from guard.core.cache import load_tensors, save_tensors

    attack = FeatureAdversary(
        layer=layer,
        delta=delta / 255,
        variant=variant,
        max_iter=max_iter or args.max_iter,
        batch_size=args.batch,
        label_c=0.0,
    )
    advs, secs = [], 0.0
    for lo in range(0, xs.shape[0], args.batch):
        hi = min(lo + args.batch, xs.shape[0])
        path = None
        if keys is not None:
            tag = f"{layer}|{delta}|{variant}|{max_iter or args.max_iter}|{args.batch}|" + ",".join(keys[lo:hi])
            path = CACHE / "adversaries" / (hashlib.sha256(tag.encode()).hexdigest()[:24] + ".safetensors")
            if path.is_file():
                d, _ = load_tensors(path)
                advs.append(d["x_adv"])
                secs += float(d["seconds"])
                continue
        t0 = time.perf_counter()
        a = attack.generate(model, xs[lo:hi], xg[lo:hi]).x_adv
        t = time.perf_counter() - t0
        secs += t
        advs.append(a)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_tensors(path, {"x_adv": a, "seconds": torch.tensor(t, dtype=torch.float64)})
    return torch.cat(advs), secs


def step_feature_adversary(args: argparse.Namespace) -> dict[str, Any]:
    t_start, c_start = time.perf_counter(), time.process_time()
    feats = features()
    pred, y = feats["logits"].argmax(1), feats["y"]
    pool, ref_idx = split()
    cand = ref_idx if args.tuning else pool
    si, gi = pairs(args.pairs, args.seed, cand, pred, y)
    x, _ = load_all()
    model = imagenet_efficientnet.build()
    xs, xg = x[si].contiguous(), x[gi].contiguous()
    del x
    out: dict[str, Any] = {}
    variants: dict[str, Any] = {}
    layers = [PENULT] if args.tuning else list(LAYERS)
    deltas = [10] if args.tuning else list(DELTAS)

    def one(layer: str, delta: int, variant: str, n: int, max_iter: int | None = None) -> dict[str, Any]:
        keys = [f"{int(a)}-{int(b)}" for a, b in zip(si[:n], gi[:n])]
        adv, secs = run_attack(model, layer, delta, variant, xs[:n], xg[:n], args, max_iter, keys)
        logits_a, fa = extract_features(model, adv, [layer], batch_size=32)
        r = analyse(
            fa[layer],
            feats[layer][si[:n]],
            feats[layer][gi[:n]],
            feats[layer][ref_idx],
            logits_a.argmax(1),
            pred[si[:n]],
            pred[gi[:n]],
            args.seed,
        )
        r.update(
            {
                "seconds": round(secs, 1),
                "seconds_per_pair": round(secs / n, 2),
                "max_iter": max_iter or args.max_iter,
                "linf_max": float((adv - xs[:n]).abs().max()) * 255,
            }
        )
        print(
            f"{layer} delta {delta} {variant} n={n}: guide {r['guide_agreement']:.2f} source {r['source_agreement']:.2f} ratio "
            f"{r['distance_ratio_median']:.3f} inlier {r['local_ppca_inlier_share']:.2f} ({secs:.0f} s)",
            flush=True,
        )
        return r

    # the goal's configuration first; every configuration is recorded as soon as it is done
    plan = [(PENULT, 10, args.pairs, args.max_iter), (MID, 10, args.mid_pairs, args.max_iter)]
    if not args.tuning:
        mid_side = args.side_pairs // 2 if args.mid_side_pairs is None else args.mid_side_pairs
        plan += [(PENULT, d, args.side_pairs, args.side_iter) for d in (5, 15)] + [
            (MID, d, mid_side, args.side_iter) for d in (5, 15)
        ]
    key = "feature_adversary_tuning" if args.tuning else "feature_adversary"
    out = Path(args.out)
    previous = json.loads(out.read_text()) if args.resume and out.is_file() else {}
    done = previous.get(key, {})
    for layer, delta, n, iters in plan:
        if str(delta) in done.get(layer, {}):  # --resume: a configuration an interrupted run recorded
            out.setdefault(layer, {})[str(delta)] = done[layer][str(delta)]
        elif layer in layers and delta in deltas and n > 0:
            out.setdefault(layer, {})[str(delta)] = one(layer, delta, "lbfgs", n, iters)
            record("feature_adversary_partial", t_start, c_start, {key: out})
    iters_out: dict[str, Any] = dict(previous.get(key + "_iterations", {}))  # --resume keeps the counts already run
    for iters in args.more_iter:  # the goal's configuration again with a larger L-BFGS-B budget, on the same pairs
        if str(iters) in iters_out:
            continue
        iters_out[str(iters)] = one(PENULT, 10, "lbfgs", args.pairs, iters)
        record("feature_adversary_partial", t_start, c_start, {key + "_iterations": iters_out})
    variants.update(previous.get(key + "_variants", {}))
    if not args.tuning and args.variant_pairs and not variants:
        for variant, iters in (
            ("feature-fgrad", 1),
            ("label-opt", args.max_iter),
            ("feature-linear", args.linear_iter),
        ):
            variants[variant] = one(PENULT, 10, variant, args.variant_pairs, iters)
            record("feature_adversary_partial", t_start, c_start, {key + "_variants": variants})
    meta = {
        "pairs": args.pairs,
        "mid_pairs": args.mid_pairs,
        "side_pairs": args.side_pairs,
        "side_iter": args.side_iter,
        "note": "delta 10: --pairs (penultimate) / --mid-pairs; deltas 5, 15: the first --side-pairs (penultimate) and half as many (mid)",
        "pair_seed": args.seed,
        "max_iter": args.max_iter,
        "batch": args.batch,
        "pairs_from": "reference images (tuning)" if args.tuning else "pool images",
        "reference": "800 sample images (one per class), not the pool",
        "variant_pairs": args.variant_pairs,
        "variants_at": {"layer": PENULT, "delta": 10},
    }
    meta["mid_side_pairs"] = mid_side if not args.tuning else 0
    meta["more_iter"] = sorted(int(k) for k in iters_out)
    if variants:
        meta["variant_pairs"] = previous.get(key + "_meta", {}).get("variant_pairs", args.variant_pairs)
    return {
        key: out,
        key + "_variants": variants,
        key + "_meta": meta,
        **({key + "_iterations": iters_out} if iters_out else {}),
    }


class _Trunk(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.norm, self.net = model[0], model[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net._avg_pooling(self.net.extract_features(self.norm(x))).flatten(1)


class _Head(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.net = model[1]

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net._fc(self.net._dropout(f))


def step_art(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per pair, ours vs ART's FeatureAdversariesPyTorch, until ART's median ratio reaches ours."""
    import logging

    from art.attacks.evasion import FeatureAdversariesPyTorch
    from art.estimators.classification import PyTorchClassifier

    logging.getLogger("art").setLevel(logging.WARNING)
    feats = features()
    pred, y = feats["logits"].argmax(1), feats["y"]
    pool, _ = split()
    si, gi = pairs(args.art_pairs, args.seed + 1, pool, pred, y)  # other pairs than the protocol's
    x, _ = load_all()
    xs, xg = x[si].contiguous(), x[gi].contiguous()
    del x
    model = imagenet_efficientnet.build()
    delta = 10 / 255
    adv, t_ours = run_attack(model, PENULT, 10, "lbfgs", xs, xg, args)
    fs, fg = feats[PENULT][si], feats[PENULT][gi]

    def ratio(a: torch.Tensor) -> float:
        _, fa = extract_features(model, a, [PENULT], batch_size=32)
        return float(distance_ratio(fa[PENULT], fs, fg).median())

    r_ours = ratio(adv)
    # ART reads the outputs of the model's *top-level* modules only, so the same network is handed
    # to it as (trunk -> pooled features, head); layer 0 is then the head's input, our PENULT.
    art_model = torch.nn.Sequential(_Trunk(model), _Head(model)).eval()
    with torch.no_grad():
        if not torch.allclose(art_model(xs[:1]), model(xs[:1]), atol=1e-4):
            raise RuntimeError("the (trunk, head) split does not reproduce the model")
    clf = PyTorchClassifier(
        model=art_model,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=(3, 224, 224),
        nb_classes=1000,
        clip_values=(0.0, 1.0),
    )
    art_layer = 0
    tries = []
    for iters in args.art_iters:
        t0 = time.perf_counter()
        a = FeatureAdversariesPyTorch(
            clf, delta=delta, layer=art_layer, max_iter=iters, step_size=delta / 10, batch_size=len(si), verbose=False
        ).generate(xs.numpy(), xg.numpy())
        t = time.perf_counter() - t0
        tries.append(
            {
                "pgd_iterations": iters,
                "seconds_per_pair": round(t / len(si), 2),
                "ratio_median": ratio(torch.from_numpy(a).float()),
            }
        )
        print(f"ART PGD {iters}: {tries[-1]}", flush=True)
        if tries[-1]["ratio_median"] <= r_ours:
            break
    return {
        "art_comparison": {
            "pairs": len(si),
            "pair_seed": args.seed + 1,
            "layer": PENULT,
            "delta": 10,
            "guard": {
                "lbfgs_iterations": args.max_iter,
                "seconds_per_pair": round(t_ours / len(si), 2),
                "ratio_median": r_ours,
            },
            "art_feature_adversaries_pytorch": tries,
            "art_reached_guard_ratio": bool(tries and tries[-1]["ratio_median"] <= r_ours),
        }
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--step", required=True, choices=["features", "feature_adversary", "art"])
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument(
        "--mid-pairs", type=int, default=10, help="pairs at the mid layer, delta 10 (the first of the --pairs)"
    )
    ap.add_argument(
        "--side-pairs", type=int, default=10, help="pairs at deltas 5 and 15 (penultimate; half at the mid layer)"
    )
    ap.add_argument("--side-iter", type=int, default=30)
    ap.add_argument(
        "--mid-side-pairs",
        type=int,
        default=None,
        help="pairs at the mid layer, deltas 5 and 15 (default: half of --side-pairs)",
    )
    ap.add_argument(
        "--more-iter",
        type=int,
        nargs="*",
        default=[],
        help="also run the penultimate, delta-10 configuration on all --pairs with these L-BFGS-B iteration counts",
    )
    ap.add_argument("--variant-pairs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-iter", type=int, default=40)
    ap.add_argument("--linear-iter", type=int, default=20)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--tuning", action="store_true", help="pairs from the reference images (never reported)")
    ap.add_argument("--resume", action="store_true", help="keep the configurations already in the JSON")
    ap.add_argument("--art-pairs", type=int, default=3)
    ap.add_argument("--art-iters", type=int, nargs="+", default=[40, 120])
    ap.add_argument("--out", default=str(RESULTS), help="the results JSON the step merges into (default: %(default)s)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t0, c0 = time.perf_counter(), time.process_time()
    steps: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
        "features": lambda a: {
            "split": {"pool": N_POOL, "reference": 1000 - N_POOL, "seed": 0},
            "clean_top1_sample": float((features()["logits"].argmax(1) == features()["y"]).float().mean()),
        },
        "feature_adversary": step_feature_adversary,
        "art": step_art,
    }
    extra = steps[args.step](args)
    # a resumed run is timed under its own name: the first run's wall time stays in the JSON
    record(
        args.step + ("_tuning" if args.tuning else "") + ("_resumed" if args.resume else ""), t0, c0, extra, args.out
    )


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
