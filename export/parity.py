"""Parity: the exported graph in onnxruntime against PyTorch, output by output.

Two references:

* :func:`check_parity`: the ``ExportHead`` run eagerly in PyTorch vs the graph, at batch sizes
  1, an odd size and 64 (a dynamic batch dimension that only works at the example's size is
  the commonest export bug).
* :func:`compare_with_guarded`: the ``GuardedModel`` itself (FAISS kNN, float64 PPCA, Captum
  saliency) vs the graph on a whole image set: scores, argmax and flags.

Float outputs are compared with an absolute and a relative tolerance each
(``|a - b| <= atol + rtol |b|``, as ``numpy.allclose``); TopK outputs are compared by their
values (sorted distances), never by indices, since ties may be ordered differently; integer
outputs by agreement; boolean flags by count of differences, with the differences whose score
lies within the score tolerance of the threshold counted as borderline. The conformal combined
score is a step function of the detector scores (see :data:`STEP_OUTPUTS`): its figures are
reported and its parity is judged by the flags.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from guard.core.budget import grad_chunk
from guard.core.models import eval_mode

__all__ = [
    "check_parity",
    "compare_outputs",
    "compare_with_guarded",
    "run_reference",
    "run_session",
    "ParityReport",
    "DEFAULT_TOLERANCES",
    "DEFAULT_TOLERANCE",
]

#: output name -> (atol, rtol); anything else: :data:`DEFAULT_TOLERANCE`.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "logits": (1e-4, 1e-4),
    "reject_prob": (1e-5, 1e-4),
}
DEFAULT_TOLERANCE = (1e-4, 1e-4)
#: outputs that are step functions of other scores: the conformal combined score counts clean
#: calibration scores >= s, so an input that *is* a calibration image (its score equals a stored
#: one) moves by a whole step for a last-bit difference. Their figures are reported; their
#: parity is judged by the flags they feed.
STEP_OUTPUTS = frozenset({"combined_score"})
# A detector head adds its own step outputs (``head.step_outputs``: the kNN rank is a step
# function of the kNN distance, which is compared with tolerance instead).


def _tol(name: str, tolerances: Mapping[str, tuple[float, float]]) -> tuple[float, float]:
    return tolerances.get(name, DEFAULT_TOLERANCE)


def _flag_score(flag: str) -> str:
    """The output a flag column thresholds."""
    return "reject_prob" if flag == "reject" else f"{flag}_score"


@dataclass
class ParityReport:
    """Per-output figures (``outputs``), per batch size (``by_batch``), and ``passed``."""

    outputs: dict[str, dict[str, Any]]
    by_batch: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    n: int = 0
    passed: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def compare_outputs(
    ref: Mapping[str, Any],
    got: Mapping[str, Any],
    *,
    tolerances: Mapping[str, tuple[float, float]] | None = None,
    flag_names: Sequence[str] = (),
    thresholds: Mapping[str, float] | None = None,
    step_outputs: Sequence[str] = (),
) -> dict[str, dict[str, Any]]:
    """Per-output comparison of ``got`` (onnxruntime) against ``ref`` (PyTorch), names in both.

    Returns output -> figures: floats ``max_abs``, ``max_rel``, ``atol``, ``rtol``, ``passed``;
    ints ``agreement``; bools ``n_diff`` and ``borderline`` (differences whose score is within
    tolerance of the threshold), ``identical``.
    """
    tol = dict(DEFAULT_TOLERANCES)
    tol.update(tolerances or {})
    out: dict[str, dict[str, Any]] = {}
    for name in ref:
        if name not in got:
            continue
        a, b = _np(got[name]), _np(ref[name])
        if a.shape != b.shape:
            out[name] = {"passed": False, "error": f"shape {list(a.shape)} vs PyTorch {list(b.shape)}"}
            continue
        if b.dtype == np.bool_:
            diff = a != b
            rows = np.nonzero(diff.reshape(diff.shape[0], -1).any(1))[0] if diff.ndim > 1 else np.nonzero(diff)[0]
            borderline = 0
            if diff.any() and thresholds is not None and diff.ndim == 2 and flag_names:
                for j, fname in enumerate(flag_names):
                    s = _flag_score(fname)
                    if s in ref and fname in thresholds:
                        atol, rtol = _tol(s, tol)
                        sc = _np(ref[s])
                        near = np.abs(sc - thresholds[fname]) <= atol + rtol * np.abs(sc)
                        borderline += int((diff[:, j] & near).sum())
            out[name] = {
                "n": int(b.shape[0]),
                "n_diff": int(diff.sum()),
                "rows_diff": int(len(rows)),
                "borderline": borderline,
                "identical": bool(not diff.any()),
                "passed": bool(not diff.any()),
            }
        elif np.issubdtype(b.dtype, np.integer):
            agree = float((a == b).mean()) if b.size else 1.0
            out[name] = {"agreement": agree, "n": int(b.shape[0]), "passed": agree == 1.0}
        else:
            atol, rtol = _tol(name, tol)
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            finite = np.isfinite(b64) & np.isfinite(a64)
            same_inf = (a64 == b64) | (np.isnan(a64) & np.isnan(b64))
            d = np.abs(a64 - b64)
            d = np.where(finite, d, np.where(same_inf, 0.0, np.inf))
            rel = d / np.maximum(np.abs(b64), 1e-6)
            bad = d > atol + rtol * np.where(finite, np.abs(b64), 0.0)
            bad_rows = int(bad.reshape(bad.shape[0], -1).any(1).sum()) if bad.size else 0
            ok = bad_rows == 0 or name in STEP_OUTPUTS or name in step_outputs
            out[name] = {
                "max_abs": float(d.max()) if d.size else 0.0,
                "max_rel": float(rel.max()) if rel.size else 0.0,
                "atol": atol,
                "rtol": rtol,
                "n_out_of_tol": bad_rows,
                "passed": bool(ok),
                "n": int(b.shape[0]),
            }
    return out


def serving_batch(x: Any, cap: int = 256) -> int:
    """Images per batch when the graph, or its PyTorch reference, runs many images: at most ``cap``
    and at most what the fused forward + input-gradient pass takes at a time
    (:func:`guard.core.budget.grad_chunk`: 682 images at 3 x 32 x 32, 13 at 3 x 224 x 224).

    Why: both the exported saliency head (an explicit VJP in the graph) and its reference keep
    every activation of the batch. On EfficientNet-Lite0 at 224 px one batch of 64 peaked at
    7.4 GB in PyTorch and 5.6 GB in onnxruntime, and the audit's export step, which ran the
    graph on 256 images at once, at 18.9 GB. Small images keep batches of ``cap``.
    """
    return max(1, min(int(cap), grad_chunk(x if hasattr(x, "shape") else np.asarray(x))))


@torch.no_grad()
def run_reference(head: torch.nn.Module, x: torch.Tensor, *, batch_size: int | None = None) -> dict[str, np.ndarray]:
    """The ExportHead's outputs in PyTorch (eval mode), batched (default :func:`serving_batch`), as numpy arrays."""
    batch_size = serving_batch(x) if batch_size is None else batch_size
    names = list(head.output_names)  # type: ignore[attr-defined]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    with eval_mode(head.float_model), eval_mode(head.backbone):  # type: ignore[arg-type]
        for i in range(0, x.shape[0], batch_size):
            for n, v in zip(names, head(x[i : i + batch_size].float())):
                parts[n].append(_np(v))
    return {n: np.concatenate(v) for n, v in parts.items()}


def run_session(session: Any, x: Any, *, batch_size: int | None = None) -> dict[str, np.ndarray]:
    """A GuardSession's outputs on all of ``x``, batched (default :func:`serving_batch`)."""
    x = _np(x)
    batch_size = serving_batch(x) if batch_size is None else batch_size
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, x.shape[0], batch_size):
        for n, v in session.run(x[i : i + batch_size]).items():
            parts.setdefault(n, []).append(v)
    return {n: np.concatenate(v) for n, v in parts.items()}


def _merge(figs: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for f in figs:
        for name, v in f.items():
            m = out.setdefault(name, dict(v))
            if m is v:
                continue
            for k, val in v.items():
                if k in ("max_abs", "max_rel"):
                    m[k] = max(m[k], val)
                elif k in ("n", "n_diff", "rows_diff", "borderline", "n_out_of_tol"):
                    m[k] = m[k] + val
                elif k in ("passed", "identical"):
                    m[k] = m[k] and val
                elif k == "agreement":
                    m[k] = min(m[k], val)
    return out


def parity_batch_sizes(x: Any) -> tuple[int, ...]:
    """The batch sizes :func:`check_parity` tries by default: 1, 7 and 64, or the :func:`serving_batch`
    where that is smaller (13 at 3 x 224 x 224): three sizes, so the batch dimension is checked dynamic."""
    return (1, 7, max(8, min(64, serving_batch(x))))


def check_parity(
    head: torch.nn.Module,
    session_or_path: Any,
    x: torch.Tensor,
    *,
    batch_sizes: Sequence[int] | None = None,
    tolerances: Mapping[str, tuple[float, float]] | None = None,
) -> ParityReport:
    """Compare the ExportHead in PyTorch with the graph in onnxruntime at several batch sizes.

    Args:
        head: the ExportHead that was exported.
        session_or_path: a :class:`export.session.GuardSession` or the .onnx path (opened on CPU).
        x: images (N, C, H, W); batch size b uses the first b (repeated if N < b).
        batch_sizes: batch sizes tried (default :func:`parity_batch_sizes`).
        tolerances: per-output (atol, rtol) overriding :data:`DEFAULT_TOLERANCES`.
    """
    from guard.export.session import GuardSession, load_session

    sess = session_or_path if isinstance(session_or_path, GuardSession) else load_session(session_or_path, "cpu")
    batch_sizes = parity_batch_sizes(x) if batch_sizes is None else batch_sizes
    thresholds = dict(getattr(head, "thresholds", {}))
    flag_names = list(getattr(head, "flag_names", []))
    by_batch: dict[str, dict[str, dict[str, Any]]] = {}
    for b in batch_sizes:
        xb = x[:b] if x.shape[0] >= b else x.repeat((b + x.shape[0] - 1) // x.shape[0], 1, 1, 1)[:b]
        ref = run_reference(head, xb, batch_size=b)
        got = sess.run(xb)
        by_batch[str(b)] = compare_outputs(
            ref,
            got,
            tolerances=tolerances,
            flag_names=flag_names,
            thresholds=thresholds,
            step_outputs=getattr(head, "step_outputs", ()),
        )
    merged = _merge(list(by_batch.values()))
    return ParityReport(
        outputs=merged,
        by_batch=by_batch,
        n=int(sum(batch_sizes)),
        passed=all(v.get("passed", True) for v in merged.values()),
    )


def _near_step(combined: Any, scores: Mapping[str, torch.Tensor]) -> np.ndarray:
    """Inputs whose member score sits (within tolerance) on a stored clean score of ``Combined``.

    The conformal combined score counts stored clean scores >= s, so such an input (typically a
    calibration image itself) jumps by a whole step for a last-bit difference in s.
    """
    out = None
    for i, name in enumerate(combined.names_):
        s = scores[name].detach().double().cpu()[:, None]
        ref = combined.ref_[i][: int(combined.counts_[i])].double()[None, :]
        atol, rtol = DEFAULT_TOLERANCE
        hit = ((s - ref).abs() <= atol + rtol * s.abs()).any(1).numpy()
        out = hit if out is None else out | hit
    return out if out is not None else np.zeros(0, dtype=bool)


def compare_with_guarded(
    guarded: Any, session: Any, x: torch.Tensor, *, batch_size: int | None = None, head: torch.nn.Module | None = None
) -> dict[str, dict[str, Any]]:
    """The GuardedModel's own logits, scores and flags (FAISS, Captum) vs the graph's, on all of ``x``.

    Each detector's score is compared with the graph's ``<name>_score``, and each flag with
    the graph's ``flags`` column of the same name (``head.flag_names``).
    """
    logits, scores, errors = guarded.score(x)
    if errors:
        raise RuntimeError(f"the GuardedModel's detectors failed on the parity inputs: {errors}")
    got = run_session(session, x, batch_size=batch_size)
    ref: dict[str, Any] = {"logits": logits.float(), "pred": logits.argmax(1)}
    thresholds: dict[str, float] = {}
    flag_cols: dict[str, torch.Tensor] = {}
    for name, det in guarded.detectors.items():
        if f"{name}_score" not in got:
            continue
        ref[f"{name}_score"] = scores[name]
        if hasattr(det, "threshold_"):
            thresholds[name] = float(det.threshold_)
            flag_cols[name] = det.predict_scores(scores[name])
    if guarded.combined is not None and "combined_score" in got and not getattr(head, "combined_partial", False):
        comb = guarded.combined.combine(scores)
        ref["combined_score"] = comb
        thresholds["combined"] = float(guarded.combined.threshold_)
        flag_cols["combined"] = guarded.combined.predict_scores(comb)
    figs = compare_outputs(ref, got, step_outputs=getattr(head, "step_outputs", ()))
    flag_names = list(getattr(head, "flag_names", [])) if head is not None else []
    if "flags" in got and flag_names:
        for j, fname in enumerate(flag_names):
            if fname in flag_cols:
                diff = got["flags"][:, j] != _np(flag_cols[fname])
                atol, rtol = _tol(_flag_score(fname), DEFAULT_TOLERANCES)
                sc = _np(ref[_flag_score(fname)]).astype(np.float64)
                near = np.abs(sc - thresholds[fname]) <= atol + rtol * np.abs(sc)
                if fname == "combined":
                    near = near | _near_step(guarded.combined, scores)
                figs[f"flag_{fname}"] = {
                    "n": int(diff.shape[0]),
                    "n_diff": int(diff.sum()),
                    "borderline": int((diff & near).sum()),
                    "identical": bool(not diff.any()),
                    "passed": bool(not diff.any()),
                }
    return figs
