"""Audit step ``export``: write OUT/model.onnx and fill report["export"].

Exports the hardened model (the harden step's RejectClassifier) with the guarded model's
detectors refitted on it, else the GuardedModel of the detectors step, else the bare model; checks parity (ExportHead in PyTorch vs onnxruntime at batch sizes 1, 7 and 64, or fewer than 64 for large images: export.parity.parity_batch_sizes; and,
for a GuardedModel, its own FAISS/Captum scores and flags vs the graph on the held-out images
and on the attack sets) and measures latency (onnxruntime CPU vs PyTorch eager) at batch 1 and
at ``batch_B``, B = 256 (quick: 64) or fewer for large images (export.parity.serving_batch).
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import torch

from guard.audit.step import AttackSet, AuditContext, Step
from guard.guarded import GuardedModel
from guard.training.reject import RejectClassifier

log = logging.getLogger(__name__)


def _median_ms(fn: Any, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def _harden_guarded(ctx: AuditContext, hardened: torch.nn.Module, guarded: Any) -> Any:
    """The guarded model's detector configuration refitted on the hardened model."""
    import guard
    from guard.detectors import Detector

    prefix = "model." if hasattr(hardened, "reject_index") and hasattr(hardened, "model") else ""
    dets: dict[str, Detector] = {}
    for name, det in guarded.detectors.items():
        params = dict(det.get_params())
        for key in ("layer", "layers"):
            if key in params and params[key] is not None:
                v = params[key]
                params[key] = prefix + v if isinstance(v, str) else [prefix + s for s in v]
        dets[name] = type(det)(**params)
    g = guard.wrap(hardened, dets, pool=guarded.pool)
    s = ctx.settings.export
    n = s.refit_calibration_images
    m = len(ctx.train) if s.refit_train_images is None else s.refit_train_images
    g.fit(ctx.train.x[:m], ctx.train.y[:m])
    perm = torch.randperm(len(ctx.test), generator=torch.Generator().manual_seed(ctx.options.seed + 5))
    g.calibrate(ctx.test.x[perm[:n]], fpr=0.05)
    return g


class ExportStep(Step):
    """One ONNX graph of the model and its detector heads, with parity and latency figures."""

    name = "export"
    needs = {"guarded": GuardedModel, "hardened": RejectClassifier, "attacks": AttackSet}

    def skip_reason(self, ctx: AuditContext) -> str | None:
        return None if ctx.options.export else "export turned off (--no-export)"

    def run(
        self,
        ctx: AuditContext,
        guarded: GuardedModel | None = None,
        hardened: RejectClassifier | None = None,
        attacks: AttackSet | None = None,
    ) -> None:
        _run(ctx, guarded, hardened, attacks.results if attacks is not None else {})


def _run(
    ctx: AuditContext, guarded: GuardedModel | None, hardened: RejectClassifier | None, attack_results: dict[str, Any]
) -> None:
    from guard.export import load_session, to_onnx

    t0 = time.perf_counter()
    obj, source = _export_source(ctx, guarded, hardened)
    path = ctx.out / "model.onnx"
    x_test = ctx.test.x
    rep = to_onnx(obj, path, x_test[:8], strict=False, parity_inputs=x_test[:64], key_env=ctx.options.key_env)
    sess = load_session(
        path, device="cpu", strict=True, threads=1, key_env=ctx.options.key_env, expected_sha256=rep.sha256
    )
    section = _export_section(path, source, rep, sess)
    _full_parity(ctx, obj, sess, attack_results, section)
    section["latency_ms"] = _latency(ctx, obj, sess)
    section["seconds"] = round(time.perf_counter() - t0, 3)
    ctx.report["export"] = section


def _export_source(
    ctx: AuditContext, guarded: GuardedModel | None, hardened: RejectClassifier | None
) -> tuple[Any, str]:
    """What to export, and its name: the hardened model (with the detectors refitted on it), the guarded model or the model."""
    source = "model"
    if hardened is not None:
        obj = _harden_guarded(ctx, hardened, guarded) if guarded is not None else hardened
        source = "hardened+guarded" if guarded is not None else "hardened"
    elif guarded is not None:
        obj, source = guarded, "guarded"
    else:
        obj = ctx.model
    return obj, source


def _export_section(path: Any, source: str, rep: Any, sess: Any) -> dict[str, Any]:
    """The export report's first entries: the graph, its parity on 64 images and the session."""
    return {
        "path": str(path),
        "source": source,
        "opset": rep.opset,
        "outputs": rep.output_names,
        "heads": rep.heads,
        "file_bytes": rep.file_bytes,
        "external_data": rep.external_data,
        "sha256": rep.sha256,
        "signed": rep.signed,
        "parity": {
            k: {m: v[m] for m in ("max_abs", "max_rel", "agreement", "n_diff", "identical", "passed") if m in v}
            for k, v in rep.parity["outputs"].items()
        },  # type: ignore[index]
        "parity_batch_sizes": [int(b) for b in rep.parity["by_batch"]],  # type: ignore[index]
        "providers": sess.report.providers,
        "session": sess.report.to_dict(),
        "cuda": "no CUDAExecutionProvider in this onnxruntime build; GPU parity/latency not measured"
        if "CUDAExecutionProvider" not in sess.report.available
        else "available",
        "export_seconds": rep.seconds,
        "versions": rep.versions,
    }


def _full_parity(
    ctx: AuditContext, obj: Any, sess: Any, attack_results: dict[str, Any], section: dict[str, Any]
) -> None:
    """Full-set checks: PyTorch vs the graph on the held-out images and every attack set, into ``section``."""
    from guard.export import build_export_head, compare_with_guarded
    from guard.export.parity import compare_outputs, run_reference, run_session

    s = ctx.settings.export
    x_test = ctx.test.x
    n_eval = len(ctx.test) if s.eval_images is None else s.eval_images
    sets: dict[str, torch.Tensor] = {"clean": x_test[:n_eval]}
    for name, res in attack_results.items():
        xa = getattr(res, "x_adv", None)
        if isinstance(xa, torch.Tensor) and xa.numel():
            sets[name] = xa[: s.attack_images].detach().float().cpu()  # 500 per attack keeps the step near 1 min
    head, _ = build_export_head(obj, x_test[:8], strict=False)
    full: dict[str, Any] = {}
    flags_identical = True
    unexplained = 0  # flag differences not on a threshold / calibration-score step
    for name, xs in sets.items():
        if hasattr(obj, "detectors"):
            figs = compare_with_guarded(obj, sess, xs, head=head)
        else:
            figs = compare_outputs(run_reference(head, xs), run_session(sess, xs))
        full[name] = {
            k: {m: v[m] for m in ("max_abs", "max_rel", "agreement", "n_diff", "borderline", "passed") if m in v}
            for k, v in figs.items()
        }
        for k, v in figs.items():
            if k.startswith("flag") and not v.get("identical", True):
                flags_identical = False
                unexplained += int(v.get("n_diff", 0)) - int(v.get("borderline", 0))
    section["parity_full"] = full
    section["flags_identical"] = flags_identical
    # a calibration image whose score *is* the threshold may flip on a last-bit difference
    section["flags_identical_except_borderline"] = unexplained == 0


def _latency(ctx: AuditContext, obj: Any, sess: Any) -> dict[str, Any]:
    """Latency: onnxruntime CPU (1 thread) vs PyTorch eager (the guarded model as served), at batch 1 and batch_B."""
    from guard.export.parity import serving_batch

    s = ctx.settings.export
    x_test = ctx.test.x
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lat: dict[str, Any] = {}
        # the large batch is bounded like the parity runs' (serving_batch: 13 at 3 x 224 x 224), so
        # that a 224-px graph with a saliency head does not need tens of GB here
        for b in (1, serving_batch(x_test, s.latency_batch)):
            xb = x_test[:b].contiguous()
            reps = s.latency_repeats_one if b == 1 else s.latency_repeats
            ort_ms = _median_ms(lambda: sess.run(xb), reps)
            if hasattr(obj, "detectors"):
                eager_ms = _median_ms(lambda: obj(xb), reps)
            else:
                with torch.no_grad():
                    eager_ms = _median_ms(lambda: obj(xb), reps)
            lat[f"batch_{b}"] = {
                "onnxruntime_cpu_ms": round(ort_ms, 3),
                "pytorch_eager_ms": round(eager_ms, 3),
                "ratio": round(ort_ms / eager_ms, 4) if eager_ms > 0 else None,
            }
        lat["threads"] = 1
    finally:
        torch.set_num_threads(torch_threads)
    return lat
