"""G2LVAP's headline at ImageNet size: patches on EfficientNet-Lite0 (224 px), their detection, the export.

Issue 16. The 1,000-image sample (one image per class) is split with ``--seed`` into ``--n-train``
images the patches train on (their early stopping uses a ``val_fraction`` slice of those) and
the rest, the evaluation images, which no patch ever sees. Per patch area (1%, 2%, 4% of the
image; the side is derived from the 224-px input by ``patch_side``):

* PatchGAN with the paper's loss and defaults (-log(1 - p_y), alpha=20, beta=0.1, 2-norm L_p,
  lr 1e-3) and PatchGAN with the audit's setting (CW margin loss, alpha=1, beta=3, 1 - SSIM
  capped at 0.8; chosen on the demo model, BENCHMARKS.md "Attacks I", not tuned here);
  UniversalPatch (margin loss); RandomPatch (uniform noise). Fooling rate = the model's label of
  the patched evaluation image differs from its clean label, random placement, ``--reps`` draws.
* Diversity: median pairwise SSIM of 100 patches of each 2% generator; the class comparison
  (each patch alone on a black canvas vs the patched image's class) on a 3 x 3 grid.
* Detection: the attribution map of the predicted class (one backward pass per image; Captum's
  ``Saliency`` = |grad|, and ``InputXGradient`` = |x * grad|, both derived here from that one
  gradient to halve the cost; :func:`check_maps_match_captum` checks them against Captum on a few
  images) and its concentration (``detectors.saliency.window_share`` / ``topk_share``, the
  Jujutsu / LGS idea: a patch concentrates the gradient in one small square). The method, window
  and reduction are chosen on the *training* images (clean vs patched by the 2% generator), then
  the threshold at 1% FPR is set on one half of the evaluation images' clean scores and TPR
  (successful patched images) / FPR are measured on the other half; AUROC on that half.
* Export: ``guard.wrap(model, [the chosen SaliencyConcentration, kNN])`` fitted on the training
  images, calibrated on the calibration half, ``guard.to_onnx`` with parity, and onnxruntime CPU
  vs eager latency at batch 1 and 32 (one thread each).

Every fitted attack and every finished stage is kept under ``--work`` (safetensors + JSON), so
an interrupted run resumes where it stopped. Time (wall and CPU) and peak RSS after each stage go
into the JSON. Threads: ``torch.set_num_threads(--threads)``.

Writes benchmarks/results/imagenet_patch.json (``--out``):

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.imagenet.patch [--threads 1]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.fixtures.proc_memory import peak_rss_mb

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results" / "imagenet_patch.json"
AREAS = (0.01, 0.02, 0.04)
NAMES = ("patch_gan", "patch_gan_paper", "universal_patch", "random_patch")
# Reported beside the detector chosen on the training images, untuned: the library's default
# window (a square of 5% of the image: 50 px at 224) for both maps.
REFERENCE_AREA = 0.05


@dataclass
class Config:
    """What a run does; everything that changes a figure is here (and in the work folder's name)."""

    seed: int = 0
    n_train: int = 500
    areas: tuple[float, ...] = AREAS
    paper_areas: tuple[float, ...] = (0.02,)  # PatchGAN with the paper's settings: at these areas only (time)
    gan_steps: int = 30
    gan_batch: int = 8
    paper_steps: int = 30
    up_steps: int = 30
    up_batch: int = 16
    val_fraction: float = 0.1
    eval_every: int = 10
    reps: int = 1
    n_eval: int | None = 200  # evaluation images (None: all 500 not in training); detection uses them too
    div_n: int = 100
    cc_n: int = 10
    cc_grid: int = 3
    det_tune: int = 50
    det_eval: int = 100
    det_areas: tuple[float, ...] = AREAS
    window_areas: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05, 0.08)  # candidate windows, as image-area shares
    topks: tuple[float, ...] = (0.01, 0.02, 0.05)
    export: bool = True
    latency_reps: int = 2
    batch: int = 50

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class Stages:
    """Finished stages on disk (JSON), with the time and peak RSS of each."""

    path: Path
    done: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path) -> Stages:
        return cls(path, json.loads(path.read_text()) if path.is_file() else {})

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        from guard.core.cache import atomic_write_text

        if name in self.done:
            return self.done[name]["result"]
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        self.done[name] = {
            "result": result,
            "wall_s": round(time.perf_counter() - t0, 2),
            "cpu_s": round(time.process_time() - c0, 2),
            "peak_rss_mb": peak_rss_mb(),
        }
        atomic_write_text(self.path, json.dumps(self.done, indent=1))
        return result


def split(n: int, n_train: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, eval) of a seeded permutation of ``n`` images; disjoint."""
    if not 2 <= n_train <= n - 2:
        raise ValueError(f"n_train must be in [2, {n - 2}] for {n} images; got {n_train}.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:n_train], perm[n_train:]


def make_attack(name: str, area: float, cfg: Config) -> Any:
    from guard.attacks import PatchGAN, PatchTraining, RandomPatch, UniversalPatch
    from guard.audit.patches import GAN_AUDIT_KWARGS

    common = dict(val_fraction=cfg.val_fraction, eval_every=cfg.eval_every, patience=10_000, seed=cfg.seed)
    if name == "patch_gan_paper":  # the paper's loss and defaults (alpha=20, beta=0.1, 2-norm L_p, lr 1e-3)
        training = PatchTraining(steps=cfg.paper_steps, batch_size=cfg.gan_batch, **common)
        return PatchGAN(size=area, loss="paper", training=training)
    if name == "patch_gan":
        training = PatchTraining(steps=cfg.gan_steps, batch_size=cfg.gan_batch, **common)
        return PatchGAN(size=area, loss="margin", training=training, **GAN_AUDIT_KWARGS)
    if name == "universal_patch":
        training = PatchTraining(steps=cfg.up_steps, batch_size=cfg.up_batch, **common)
        return UniversalPatch(size=area, loss="margin", training=training)
    if name == "random_patch":
        return RandomPatch(size=area, seed=cfg.seed)
    raise ValueError(f"name must be one of {NAMES}; got {name!r}.")


def fitted_attack(
    name: str, area: float, cfg: Config, model: nn.Module, x_train: torch.Tensor, work: Path
) -> tuple[Any, dict]:
    """The attack fitted on ``x_train``, loaded from ``work`` when an earlier run saved it."""
    from guard.attacks import PatchGAN, UniversalPatch

    atk = make_attack(name, area, cfg)
    if name == "random_patch":
        return atk, {}
    path = work / f"{name}_{area}.safetensors"
    info_path = path.with_suffix(".json")
    if path.is_file() and info_path.is_file():
        return (PatchGAN if name.startswith("patch_gan") else UniversalPatch).load(path), json.loads(
            info_path.read_text()
        )
    t0, c0 = time.perf_counter(), time.process_time()
    atk.fit(model, x_train)
    info = {
        "side": atk.side_,
        "steps": atk.steps_,
        "val_fooling_rate": atk.val_fooling_rate_,
        "fit_wall_s": round(time.perf_counter() - t0, 2),
        "fit_cpu_s": round(time.process_time() - c0, 2),
        "history": [{k: round(v, 4) for k, v in h.items()} for h in atk.history_],
    }
    atk.save(path)
    info_path.write_text(json.dumps(info))
    return atk, info


def input_gradients(model: nn.Module, x: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d logit_pred / dx, pred) for every image: one backward pass, shared by both attribution maps."""
    grads, preds = [], []
    for i in range(0, x.shape[0], batch):
        xb = x[i : i + batch].detach().clone().requires_grad_(True)
        logits = model(xb)
        pred = logits.argmax(1)
        (g,) = torch.autograd.grad(logits.gather(1, pred[:, None]).sum(), xb)
        grads.append(g)
        preds.append(pred)
    return torch.cat(grads), torch.cat(preds)


def attribution_maps(x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Captum's Saliency (abs) and InputXGradient (abs) maps, channels summed, from the gradient."""
    return {"saliency": g.abs().sum(1), "input_x_gradient": (x * g).abs().sum(1)}


def check_maps_match_captum(model: nn.Module, x: torch.Tensor) -> float:
    """Largest abs difference between :func:`attribution_maps` and Captum's own on ``x``."""
    from captum.attr import InputXGradient, Saliency

    g, pred = input_gradients(model, x, int(x.shape[0]))
    ours = attribution_maps(x, g)
    ref = {
        "saliency": Saliency(model).attribute(x.clone().requires_grad_(True), target=pred, abs=True).sum(1),
        "input_x_gradient": InputXGradient(model).attribute(x.clone().requires_grad_(True), target=pred).abs().sum(1),
    }
    return max(float((ours[k] - ref[k].detach()).abs().max()) for k in ours)


def windows(cfg: Config, hw: tuple[int, int]) -> list[int]:
    """The candidate window sides in pixels for images of ``hw``."""
    from guard.attacks.patching import patch_side

    return sorted({patch_side(a, hw) for a in (*cfg.window_areas, REFERENCE_AREA)})


def reference_keys(hw: tuple[int, int]) -> list[str]:
    from guard.attacks.patching import patch_side

    return [f"{m}|window|{patch_side(REFERENCE_AREA, hw)}" for m in ("saliency", "input_x_gradient")]


def concentration_scores(maps: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """Every candidate detector's scores: (method, window w / top-k share) -> Tensor[N]."""
    from guard.detectors.saliency import topk_share, window_share

    out = {}
    hw = tuple(next(iter(maps.values())).shape[-2:])
    for m, a in maps.items():
        for w in windows(cfg, hw):
            out[f"{m}|window|{w}"] = window_share(a, w)
        for k in cfg.topks:
            out[f"{m}|topk|{k}"] = topk_share(a, k)
    return out


def detector_from_key(key: str) -> Any:
    """The guard detector a candidate key names (the method must be one SaliencyConcentration has)."""
    from guard.detectors import SaliencyConcentration

    method, reduce, v = key.split("|")
    if reduce == "window":
        return SaliencyConcentration(method, window=int(v), reduce="window")
    return SaliencyConcentration(method, reduce="topk", topk=float(v))


def scores_of(model: nn.Module, x: torch.Tensor, cfg: Config) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g, pred = input_gradients(model, x, cfg.batch)
    return concentration_scores(attribution_maps(x, g), cfg), pred


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, x.shape[0], batch)])


def patched(atk: Any, x: torch.Tensor, seed: int) -> torch.Tensor:
    """``x`` with the attack's patches at random positions (a fixed draw for ``seed``)."""
    from guard.attacks.patch_analysis import patch_sampler
    from guard.attacks.patching import apply_patches, random_positions

    gen = torch.Generator().manual_seed(seed)
    p = patch_sampler(atk, int(x.shape[1]), tuple(x.shape[-2:]))(int(x.shape[0]), gen)
    pos = random_positions(int(x.shape[0]), int(p.shape[-1]), x.shape[-2:], generator=gen)
    return apply_patches(x, p, pos)


def run(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Config, work: Path, *, log: Callable[[str], None] = print
) -> dict:
    """Every stage on ``model`` with images ``x`` (N, 3, H, W) in [0, 1] and labels ``y``; returns the results."""
    from guard.attacks.patch_analysis import class_comparison, fooling_rate_repeated, pairwise_diversity, patch_sampler
    from guard.detectors.base import quantile_threshold
    from guard.evaluation import detection_metrics

    work.mkdir(parents=True, exist_ok=True)
    st = Stages.open(work / "stages.json")
    model = model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tr, ev = split(int(x.shape[0]), cfg.n_train, cfg.seed)
    if cfg.n_eval is not None:
        ev = ev[: cfg.n_eval]
    x_tr, x_ev, y_ev = x[tr], x[ev], y[ev]
    hw = tuple(x.shape[-2:])
    res: dict[str, Any] = {"fooling": {}, "fooling_detail": {}, "fit": {}}
    res["clean_accuracy_eval"] = st.run(
        "clean", lambda: float((predict(model, x_ev, cfg.batch) == y_ev).float().mean())
    )
    attacks: dict[tuple[str, float], Any] = {}
    mid = 0.02 if 0.02 in cfg.areas else cfg.areas[len(cfg.areas) // 2]

    def fool(area: float) -> None:
        key = f"{area:g}"
        res["fooling"][key], res["fooling_detail"][key] = {}, {}
        for name in NAMES:
            if name == "patch_gan_paper" and area not in cfg.paper_areas:
                continue

            def fit_and_eval(name: str = name, area: float = area) -> dict:
                atk, info = fitted_attack(name, area, cfg, model, x_tr, work)
                stats = fooling_rate_repeated(
                    model,
                    x_ev,
                    patch_sampler(atk, int(x.shape[1]), hw),
                    repetitions=cfg.reps,
                    seed=cfg.seed + 100,
                    y=y_ev,
                    batch_size=cfg.batch,
                )
                return {"fit": info, "fooling": stats}

            out = st.run(f"fooling/{name}/{area:g}", fit_and_eval)
            attacks[(name, area)] = fitted_attack(name, area, cfg, model, x_tr, work)[0]
            res["fooling"][key][name] = out["fooling"]["mean"]
            res["fooling_detail"][key][name] = {
                k: out["fooling"][k]
                for k in ("mean", "std", "rates", "mean_correct", "n", "n_correct")
                if k in out["fooling"]
            }
            res["fit"][f"{name}/{key}"] = {k: v for k, v in out["fit"].items() if k != "history"}
            log(
                f"area {key} {name:<16} fooling {out['fooling']['mean']:.3f} (fit {out['fit'].get('fit_wall_s', 0)} s, "
                f"val {out['fit'].get('val_fooling_rate', float('nan'))})"
            )

    # The middle area first, then its analyses, detection and the export; the other areas last.
    fool(mid)
    gen_div = torch.Generator().manual_seed(cfg.seed + 7)
    gans = [n for n in ("patch_gan", "patch_gan_paper") if (n, mid) in attacks]
    res["diversity"] = st.run(
        "diversity",
        lambda: {n: pairwise_diversity(attacks[(n, mid)].sample(cfg.div_n, generator=gen_div)) for n in gans},
    )
    res["ssim_median"] = res["diversity"]["patch_gan"]["ssim_median"]
    if "patch_gan_paper" in res["diversity"]:
        res["ssim_median_paper_settings"] = res["diversity"]["patch_gan_paper"]["ssim_median"]

    def cc() -> dict:
        out = {}
        for n in gans:
            atk = attacks[(n, mid)]
            xs = x_ev[: cfg.cc_n]
            patches = atk.sample(int(xs.shape[0]), generator=torch.Generator().manual_seed(cfg.seed + 8))
            stride = max(1, (hw[0] - atk.side_) // max(cfg.cc_grid - 1, 1))
            r = class_comparison(model, xs, patches, stride=stride, batch_size=cfg.batch)
            out[n] = {
                k: r[k]
                for k in (
                    "positions",
                    "stride",
                    "pairs",
                    "patched_takes_canvas_class",
                    "fooled_takes_canvas_class",
                    "fooling_rate",
                )
            }
        return out

    res["class_comparison"] = st.run("class_comparison", cc)
    res["class_comparison_area"] = mid

    # ---- detection: choose the detector on the training images, report on the evaluation images
    tune_gan = attacks[("patch_gan", mid)]

    def tune() -> dict:
        xt = x_tr[: cfg.det_tune]
        s_clean, _ = scores_of(model, xt, cfg)
        clean_pred = predict(model, xt, cfg.batch)
        pos: dict[str, list[torch.Tensor]] = {k: [] for k in s_clean}
        for name in ("patch_gan", "universal_patch"):  # positives: the training images these two fool
            s_adv, pred = scores_of(model, patched(attacks[(name, mid)], xt, cfg.seed + 11), cfg)
            for k in s_clean:
                pos[k].append(s_adv[k][pred != clean_pred])
        fooled = torch.cat(pos[next(iter(pos))])
        table = {k: detection_metrics(torch.cat(pos[k]), s_clean[k]) for k in s_clean}
        best = max(table, key=lambda k: (table[k]["tpr_at_1fpr"] or 0.0, table[k]["auroc"] or 0.0))
        return {
            "n_clean": int(xt.shape[0]),
            "n_fooled": int(fooled.numel()),
            "best": best,
            "table": {k: {m: v[m] for m in ("auroc", "tpr_at_1fpr", "tpr_at_5fpr")} for k, v in table.items()},
        }

    tuned = st.run("detector_tuning", tune)
    best = tuned["best"]
    keys = sorted({best, *reference_keys(hw)})
    n_cal = cfg.det_eval
    x_cal, x_test = x_ev[n_cal : 2 * n_cal], x_ev[:n_cal]

    def clean_scores() -> dict:
        s_cal, _ = scores_of(model, x_cal, cfg)
        s_test, _ = scores_of(model, x_test, cfg)
        return {"cal": {k: s_cal[k].tolist() for k in keys}, "test": {k: s_test[k].tolist() for k in keys}}

    clean = st.run("detection_clean", clean_scores)
    res["detection"], res["detection_detail"] = (
        {},
        {"chosen_on_train": best, "tuning": tuned, "n_calibration": len(clean["cal"][best])},
    )

    def detect(area: float) -> None:
        for name in ("patch_gan", "patch_gan_paper", "universal_patch"):
            if (area != mid and (name != "patch_gan" or area not in cfg.det_areas)) or (name, area) not in attacks:
                continue  # the other attacks at the middle area only (time)

            def adv_scores(name: str = name, area: float = area) -> dict:
                xa = patched(attacks[(name, area)], x_test, cfg.seed + 12)
                s, pred = scores_of(model, xa, cfg)
                fooled = pred != predict(model, x_test, cfg.batch)
                return {"fooled": fooled.tolist(), "scores": {k: s[k].tolist() for k in keys}}

            adv = st.run(f"detection_adv/{name}/{area:g}", adv_scores)
            fooled = torch.tensor(adv["fooled"])
            for k in keys:
                thr = quantile_threshold(torch.tensor(clean["cal"][k]), 0.01)
                m = detection_metrics(
                    torch.tensor(adv["scores"][k])[fooled], torch.tensor(clean["test"][k]), threshold=thr
                )
                label = k.replace("|", "_")
                entry = {
                    "tpr_at_1fpr": m["tpr_at_threshold"],
                    "fpr_at_threshold": m["fpr_at_threshold"],
                    "auroc": m["auroc"],
                    "roc_tpr_at_1fpr": m["tpr_at_1fpr"],
                    "n_pos": m["n_pos"],
                    "n_neg": m["n_neg"],
                    "chosen_on_train": k == best,
                }
                res["detection_detail"].setdefault(f"{name}/{area:g}", {})[label] = entry
                if name == "patch_gan" and area == mid:
                    res["detection"][label] = {"tpr_at_1fpr": entry["tpr_at_1fpr"], "auroc": entry["auroc"]}

    detect(mid)
    if cfg.export:
        res["export"] = st.run(
            "export",
            lambda: export_guarded(
                model, x_tr, x_cal, x_test, detector_from_key(best), patched(tune_gan, x_test[:32], cfg.seed + 13), cfg
            ),
        )
    for area in cfg.areas:
        if area != mid:
            fool(area)
            detect(area)
    res["stages"] = {k: {m: v[m] for m in ("wall_s", "cpu_s", "peak_rss_mb")} for k, v in st.done.items()}
    res["config"] = asdict(cfg)
    res["split"] = {
        "train": int(tr.numel()),
        "eval": int(ev.numel()),
        "seed": cfg.seed,
        "calibration": n_cal,
        "detection_test": n_cal,
    }
    return res


def export_guarded(
    model: nn.Module,
    x_tr: torch.Tensor,
    x_cal: torch.Tensor,
    x_test: torch.Tensor,
    sal: Any,
    x_adv: torch.Tensor,
    cfg: Config,
) -> dict:
    """guard.wrap(model, [saliency, kNN]) -> fit, calibrate (1% FPR) -> to_onnx with parity -> latency."""
    import guard
    from benchmarks.fixtures.timing import paired_median_ms
    from guard.export import compare_with_guarded, load_session, to_onnx

    out: dict[str, Any] = {
        "detectors": ["saliency", "knn"],
        "saliency": sal.get_params() if hasattr(sal, "get_params") else repr(sal),
    }
    t = time.perf_counter()
    g = guard.wrap(model, [sal, "knn"], batch_size=cfg.batch).fit(x_tr)
    out["fit_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    g.calibrate(x_cal, fpr=0.01)
    out["calibrate_s"] = round(time.perf_counter() - t, 2)
    path = Path(tempfile.mkdtemp()) / "guarded.onnx"
    t = time.perf_counter()
    rep = to_onnx(g, path, x_test[:2], parity_inputs=x_test[:8])
    out["export_s"] = round(time.perf_counter() - t, 2)
    out.update(
        opset=rep.opset, outputs=rep.output_names, heads=rep.heads, onnx_mb=round(path.stat().st_size / 2**20, 1)
    )
    out["parity_vs_exporthead"] = {
        k: {m: v[m] for m in ("max_abs", "max_rel", "agreement", "n_diff") if m in v}
        for k, v in rep.parity["outputs"].items()
    }
    sess = load_session(path, "cpu", threads=1)
    out["parity_vs_guarded"] = {}
    for name, xs in (("clean_32", x_test[:32]), ("patched_32", x_adv)):
        figs = compare_with_guarded(g, sess, xs)
        out["parity_vs_guarded"][name] = {
            k: {m: v[m] for m in ("max_abs", "max_rel", "agreement", "n_diff", "n_out_of_tol") if m in v}
            for k, v in figs.items()
        }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out["latency_ms"] = {}
        for b in (1, 32):
            xb = x_test[:b].contiguous()
            eager, ort = paired_median_ms(lambda: g(xb), lambda: sess.run(xb), cfg.latency_reps)
            out["latency_ms"][str(b)] = {
                "eager": round(eager, 1),
                "onnxruntime": round(ort, 1),
                "ratio": round(ort / eager, 3),
            }
    finally:
        torch.set_num_threads(threads)
    return out


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def tables(res: dict) -> str:
    """The BENCHMARKS.md tables (markdown) from a results JSON."""
    f = res["fooling"]
    areas = sorted(f, key=float)
    lines = [
        "| patch area | side px | PatchGAN (audit setting) | PatchGAN (paper setting) | UniversalPatch | random noise |",
        "|---|---|---|---|---|---|",
    ]
    for a in areas:
        side = res["fit"].get(f"patch_gan/{a}", {}).get("side", "")
        cell = [
            f"{f[a][n]:.3f}" if n in f[a] else "—"
            for n in ("patch_gan", "patch_gan_paper", "universal_patch", "random_patch")
        ]
        lines.append(f"| {float(a):.0%} | {side} | " + " | ".join(cell) + " |")
    lines += [
        "",
        "| attack (area) | detector | TPR at the 1%-FPR threshold | FPR there | AUROC | fooled images |",
        "|---|---|---|---|---|---|",
    ]
    for att, row in res.get("detection_detail", {}).items():
        if "/" not in att:
            continue
        for det, d in row.items():
            mark = " (chosen on train)" if d.get("chosen_on_train") else ""
            fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
            lines.append(
                f"| {att} | {det}{mark} | {fmt(d['tpr_at_1fpr'])} | {fmt(d['fpr_at_threshold'])} | {fmt(d['auroc'])} | {d['n_pos']} |"
            )
    lines += ["", "| stage | wall s | CPU s | peak RSS MB |", "|---|---|---|---|"]
    for k, v in res.get("stages", {}).items():
        lines.append(f"| {k} | {v['wall_s']} | {v['cpu_s']} | {v['peak_rss_mb']} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=None, help="folder for fitted attacks and finished stages (default: the cache)")
    ap.add_argument("--out", default=str(RESULTS))
    for f in (
        "seed",
        "n_train",
        "gan_steps",
        "gan_batch",
        "paper_steps",
        "up_steps",
        "up_batch",
        "eval_every",
        "reps",
        "n_eval",
        "det_tune",
        "det_eval",
        "cc_n",
        "latency_reps",
    ):
        ap.add_argument("--" + f.replace("_", "-"), type=int, default=getattr(Config, f))
    ap.add_argument("--areas", type=float, nargs="+", default=list(AREAS))
    ap.add_argument("--paper-areas", type=float, nargs="+", default=list(Config.paper_areas))
    ap.add_argument("--no-export", action="store_true")
    ap.add_argument("--tables", metavar="JSON", help="only print the markdown tables of a results file")
    args = ap.parse_args()
    if args.tables:
        print(tables(json.loads(Path(args.tables).read_text())))
        return 0
    torch.set_num_threads(args.threads)
    from benchmarks.imagenet import sample as imagenet_sample
    from benchmarks.imagenet.efficientnet import build
    from guard.core.cache import cache_dir
    from guard.core.provenance import write_results

    cfg = Config(
        **{
            f: getattr(args, f)
            for f in (
                "seed",
                "n_train",
                "gan_steps",
                "gan_batch",
                "paper_steps",
                "up_steps",
                "up_batch",
                "eval_every",
                "reps",
                "n_eval",
                "det_tune",
                "det_eval",
                "cc_n",
                "latency_reps",
            )
        },
        areas=tuple(args.areas),
        det_areas=tuple(args.areas),
        paper_areas=tuple(args.paper_areas),
        export=not args.no_export,
    )
    work = Path(args.work) if args.work else cache_dir() / "imagenet_patch" / cfg.key()
    print(f"work folder {work}; torch threads {torch.get_num_threads()}")
    t0, c0 = time.perf_counter(), time.process_time()
    model = build()
    x, y = imagenet_sample.load()
    load_s = {
        "wall_s": round(time.perf_counter() - t0, 2),
        "cpu_s": round(time.process_time() - c0, 2),
        "peak_rss_mb": peak_rss_mb(),
    }
    res = run(model, x, y, cfg, work)
    res["stages"] = {"load": load_s, **res["stages"]}
    res["threads"] = args.threads
    res["total"] = {
        "wall_s": round(time.perf_counter() - t0, 1),
        "cpu_s": round(time.process_time() - c0, 1),
        "peak_rss_mb": peak_rss_mb(),
    }
    write_results(args.out, json_safe(res))  # adds command, commit and machine
    print(json.dumps({k: res[k] for k in ("fooling", "ssim_median", "detection")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
