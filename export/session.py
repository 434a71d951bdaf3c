"""``load_session``: an onnxruntime session that never falls back to the CPU silently.

onnxruntime quietly runs a node on the CPU when the CUDA provider has no kernel for it, and
quietly drops the CUDA provider when its libraries do not load. This module asks for the
provider explicitly, checks ``InferenceSession.get_providers()`` after creation, and records
which provider each node got by running one profiled inference (onnxruntime's profiler writes
one event per node with ``args.provider``; ``end_profiling`` stops it, so serving runs are not
profiled). With ``strict=True`` a missing CUDA provider, or compute nodes (nodes with a
floating-point output; shape arithmetic in int64 is placed on the CPU on purpose) that landed
on the CPU, raise :class:`ProviderError`; with ``strict=False`` the fallback is recorded in
:attr:`GuardSession.report` and logged as a warning.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from guard.core.integrity import pinned_sha256, resolve_key
from guard.core.validation import check_int
from guard.export.signing import verify_graph

__all__ = ["load_session", "GuardSession", "SessionReport", "ProviderError"]

log = logging.getLogger(__name__)

_PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
_FLOAT_TYPES = ("float", "float16", "double", "bfloat16")


class ProviderError(RuntimeError):
    """The requested execution provider is missing or did not get the compute nodes."""


@dataclass
class SessionReport:
    """Where a session runs.

    Attributes:
        requested: the device asked for ("cuda" or "cpu").
        available: providers this onnxruntime build offers.
        providers: providers the session actually uses, in priority order.
        node_providers: provider -> number of nodes it ran in the profiled inference.
        cpu_compute_nodes: compute nodes (floating-point outputs) placed on the CPU while CUDA
            was requested.
        fell_back: True when CUDA was requested and anything ran on the CPU instead.
        notes: what happened, in words.
    """

    requested: str
    available: list[str]
    providers: list[str]
    node_providers: dict[str, int] = field(default_factory=dict)
    cpu_compute_nodes: list[str] = field(default_factory=list)
    fell_back: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class GuardSession:
    """An onnxruntime session with input checks and a placement report (see :func:`load_session`).

    Attributes:
        session: the ``onnxruntime.InferenceSession``.
        report: the :class:`SessionReport`.
        input_name, input_shape: the graph input (``None`` for a dynamic dimension).
        output_names: the graph outputs, in order.
    """

    def __init__(self, session: Any, report: SessionReport) -> None:
        self.session = session
        self.report = report
        inp = session.get_inputs()[0]
        self.input_name: str = inp.name
        self.input_shape: list[int | None] = [d if isinstance(d, int) else None for d in inp.shape]
        self.output_names: list[str] = [o.name for o in session.get_outputs()]

    def check_input(self, x: Any) -> np.ndarray:
        """``x`` as a contiguous float32 array; ValueError naming the input if its shape is wrong."""
        if isinstance(x, torch.Tensor):
            if x.is_meta:
                raise ValueError(
                    f"input {self.input_name!r} is on the meta device (a tensor without data); expected images on 'cpu' or 'cuda'."
                )
            if x.is_complex() or x.dtype == torch.bool or not x.is_floating_point():
                raise TypeError(f"input {self.input_name!r} must be floating point in [0, 1]; got dtype {x.dtype}.")
            x = x.detach().cpu().float().numpy()
        if not isinstance(x, np.ndarray):
            raise TypeError(f"input {self.input_name!r} must be a numpy array or torch tensor; got {type(x).__name__}.")
        want = ["batch" if d is None else d for d in self.input_shape]
        if x.ndim != len(self.input_shape) or any(d is not None and d != g for d, g in zip(self.input_shape, x.shape)):
            raise ValueError(f"input {self.input_name!r} must have shape {want}; got {list(x.shape)}.")
        if x.shape[0] == 0:
            raise ValueError(f"input {self.input_name!r} must hold at least one image; got shape {list(x.shape)}.")
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"input {self.input_name!r} must be floating point in [0, 1]; got dtype {x.dtype}.")
        arr = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(
                f"input {self.input_name!r} must be finite; got {int((~np.isfinite(arr)).sum())} NaN/inf value(s)."
            )
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"input {self.input_name!r} must lie in [0, 1] (pixel space); got values in [{lo:.4g}, {hi:.4g}]."
            )
        return arr

    def run(self, x: Any, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run the graph on images ``x`` (N, C, H, W); returns output name -> array."""
        arr = self.check_input(x)
        names = outputs or self.output_names
        return dict(zip(names, self.session.run(names, {self.input_name: arr})))

    __call__ = run


def _node_placement(sess: Any) -> list[dict[str, Any]]:
    path = sess.end_profiling()
    try:
        events = json.loads(Path(path).read_text())
    finally:
        try:
            os.remove(path)
        except OSError:
            pass
    nodes = []
    for ev in events:
        args = ev.get("args", {})
        if ev.get("cat") == "Node" and "provider" in args and ev.get("name", "").endswith("_kernel_time"):
            types = [t for out in args.get("output_type_shape", []) for t in out]
            nodes.append(
                {
                    "name": ev["name"][: -len("_kernel_time")],
                    "op": args.get("op_name", "?"),
                    "provider": args["provider"],
                    "float_output": any(t in _FLOAT_TYPES for t in types),
                }
            )
    return nodes


def load_session(
    path: str | os.PathLike[str],
    device: str = "cuda",
    strict: bool = True,
    *,
    threads: int | None = None,
    optimization: str = "all",
    key: bytes | None = None,
    key_env: str | None = None,
    expected_sha256: str | None = None,
) -> GuardSession:
    """Open an exported graph with onnxruntime on ``device``, never falling back silently.

    Args:
        path: the .onnx file (external data beside it is found automatically).
        device: "cuda" (CUDAExecutionProvider, CPU only for what CUDA cannot run) or "cpu".
        strict: with "cuda", raise :class:`ProviderError` when the CUDA provider is not
            available or not active, or when compute nodes ran on the CPU; False records the
            fallback in ``report`` and warns.
        threads: intra-op threads (None: onnxruntime's default, all cores); pin it to compare
            latencies.
        optimization: graph optimisation level: "all", "extended", "basic" or "disabled".
        key: the HMAC key the graph was signed with (bytes; ``to_onnx(..., key=...)``): a
            signed graph needs it, and with a key an unsigned graph is refused.
        key_env: read the key from this environment variable instead.
        expected_sha256: the digest ``to_onnx`` returned (``report.sha256``); the graph must
            match it. Without a pin, ``PATH.sha256`` beside the graph (when present) is checked.

    Returns:
        a :class:`GuardSession`.

    Raises:
        guard.core.integrity.IntegrityError: (a ValueError) the graph or its external data
            fail the checks of :func:`guard.export.signing.verify_graph`; nothing is served.
    """
    import onnxruntime as ort

    p, device, threads, secret, expected_sha256, level = _checked_arguments(
        path, device, strict, threads, optimization, key, key_env, expected_sha256
    )
    available = list(ort.get_available_providers())
    report = SessionReport(requested=device, available=available, providers=[])
    providers = _providers(device, available, strict, report)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(
        tempfile.gettempdir(), f"guard_ort_profile_{os.getpid()}_{time.monotonic_ns()}"
    )
    graph, external = verify_graph(p, secret, expected_sha256)
    try:  # the verified bytes themselves, unless onnxruntime must find external data beside the file
        sess = ort.InferenceSession(str(p) if external else graph, sess_options=opts, providers=providers)
    except Exception as err:  # onnxruntime raises its own exception types (InvalidGraph, Fail, ...)
        raise ValueError(f"onnxruntime cannot load {str(p)!r}: {err}") from err
    report.providers = list(sess.get_providers())
    if device == "cuda" and "CUDAExecutionProvider" in providers and "CUDAExecutionProvider" not in report.providers:
        msg = (
            "CUDAExecutionProvider is available but did not initialise (CUDA/cuDNN libraries missing or no GPU visible)"
        )
        if strict:
            sess.end_profiling()
            raise ProviderError(
                msg + f"; the session fell back to {report.providers}. Pass strict=False to accept that."
            )
        report.fell_back = True
        report.notes.append(msg + "; running on the CPU (strict=False).")
        log.warning("%s; running on the CPU (strict=False)", msg)
    gs = GuardSession(sess, report)
    dummy = np.zeros([1 if d is None else d for d in gs.input_shape], dtype=np.float32)
    sess.run(None, {gs.input_name: dummy})
    _check_placement(sess, device, strict, report)
    return gs


def _checked_arguments(
    path: Any,
    device: Any,
    strict: Any,
    threads: int | None,
    optimization: str,
    key: bytes | None,
    key_env: str | None,
    expected_sha256: str | None,
) -> tuple[Path, str, int | None, bytes | None, str | None, Any]:
    """``load_session``'s arguments checked, in order: (path, device, threads, secret, pinned digest, optimisation level)."""
    import onnxruntime as ort

    if not isinstance(strict, bool):
        raise TypeError(f"strict must be True or False; got {type(strict).__name__} {strict!r}.")
    if not isinstance(device, str) or device.lower() not in _PROVIDERS:
        raise ValueError(f"device must be 'cuda' or 'cpu'; got {device!r}.")
    device = device.lower()
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}.")
    p = Path(os.fspath(path))
    if not p.is_file():
        raise ValueError(f"path {str(p)!r} is not a file; export one with export.to_onnx first.")
    if threads is not None:
        threads = check_int(threads, "threads", "load_session", low=1)
    secret = resolve_key(key, key_env)
    expected_sha256 = pinned_sha256(expected_sha256)
    levels = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }
    if optimization not in levels:
        raise ValueError(f"optimization must be one of {sorted(levels)}; got {optimization!r}.")
    return p, device, threads, secret, expected_sha256, levels[optimization]


def _providers(device: str, available: list[str], strict: bool, report: SessionReport) -> list[str]:
    """The execution providers to ask for; a CUDA request without CUDA raises (strict) or is recorded as a fallback."""
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            msg = (
                f"device='cuda' was requested but this onnxruntime build has no CUDAExecutionProvider (available: "
                f"{available}); install onnxruntime-gpu (the 'gpu' extra) on a machine with an NVIDIA GPU, or pass device='cpu'"
            )
            if strict:
                raise ProviderError(msg + ", or strict=False to record the fallback and run on the CPU.")
            report.fell_back = True
            report.notes.append(msg + "; running on CPUExecutionProvider (strict=False).")
            log.warning("%s; running on the CPU (strict=False)", msg)
        else:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return providers


def _check_placement(sess: Any, device: str, strict: bool, report: SessionReport) -> None:
    """Record where the nodes of the first run went; on CUDA, compute nodes on the CPU raise (strict) or are recorded."""
    nodes = _node_placement(sess)
    report.node_providers = dict(Counter(n["provider"] for n in nodes))
    if device == "cuda" and "CUDAExecutionProvider" in report.providers:
        cpu = [
            f"{n['name']} ({n['op']})" for n in nodes if n["provider"] == "CPUExecutionProvider" and n["float_output"]
        ]
        report.cpu_compute_nodes = cpu
        if cpu:
            msg = f"{len(cpu)} compute node(s) ran on CPUExecutionProvider instead of CUDA: {cpu[:10]}"
            if strict:
                raise ProviderError(msg + ". Pass strict=False to accept the fallback.")
            report.fell_back = True
            report.notes.append(msg)
            log.warning("%s", msg)
