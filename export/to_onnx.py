"""``to_onnx``: export a model, guarded model or hardened model as one ONNX graph.

The :class:`~guard.export.graph.ExportHead` is traced with backward passes made explicit
(:func:`guard.export.graph.trace`), then exported by ``torch.onnx.export(..., dynamo=True)``
(torch.export + onnxscript translation) with a dynamic batch dimension; the file is checked
with ``onnx.checker.check_model(path, full_check=True)`` (given the path, so weights stored as
external data beyond 2 GB are checked too) and the opset is read back from it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from guard.core.integrity import resolve_key
from guard.core.models import eval_mode, model_device
from guard.core.validation import call_model, check_images, check_int
from guard.export.graph import build_export_head, trace
from guard.export.signing import bind_external_data, commit, seal_graph, staging_dir

__all__ = ["to_onnx", "ExportReport", "ExportError"]

log = logging.getLogger(__name__)

INPUT_NAME = "input"
_TWO_GB = 2 * 1024**3


class ExportError(ValueError):
    """The model cannot be exported to ONNX; the message names the failing op or line."""


@dataclass
class ExportReport:
    """What ``to_onnx`` wrote and checked.

    Attributes:
        path: the .onnx file.
        opset: the default-domain opset read back from the file.
        input_name / input_shape: the graph input; ``"batch"`` marks the dynamic dimension.
        output_names: graph outputs in order.
        heads: which detector heads are in the graph, and notes on those left out.
        external_data: True when weights were written beside the file (models > 2 GB).
        external_files: the names of those files (their SHA-256 is recorded inside the graph).
        sha256: SHA-256 of the .onnx file (also in ``path + ".sha256"``, ``digest_path``).
        signed: True when an HMAC-SHA256 signature was written (``signature_path``).
        parity: per-output figures from :func:`guard.export.parity.check_parity` (when inputs given).
    """

    path: str
    opset: int
    input_name: str
    input_shape: list[Any]
    output_names: list[str]
    heads: dict[str, Any]
    fp16_backbone: bool
    external_data: bool
    file_bytes: int
    seconds: float
    checker: str = "onnx.checker.check_model(full_check=True): passed"
    versions: dict[str, str] = field(default_factory=dict)
    parity: dict[str, Any] | None = None
    sha256: str = ""
    signed: bool = False
    digest_path: str = ""
    signature_path: str | None = None
    external_files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _failing_op(err: BaseException) -> str:
    """The op or source line that made the export fail, read from the exception chain."""
    texts = []
    e: BaseException | None = err
    while e is not None:
        texts.append(str(e))
        e = e.__cause__ or e.__context__
    text = "\n".join(texts)
    m = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'\)>", text)
    if m:
        return f"op {m.group(1)}.{m.group(2)} has no ONNX translation"
    m = re.search(r"target=(torch\.ops\.[\w.]+)", text)
    if m:
        return f"op {m.group(1)} could not be translated"
    m = re.search(r"Unsupported: ONNX export of operator (\w+)", text) or re.search(r"aten::(\w+)", text)
    if m:
        return f"op aten::{m.group(1)} is not supported"
    m = re.search(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(.+)', text)
    first = next((t for t in texts[1:] if t.strip()), texts[0]).strip().splitlines()[0][:300]
    if m:
        return f"{first} (at {m.group(1)}:{m.group(2)} in {m.group(3)}: {m.group(4).strip()})"
    return first


def _check_written(proto: Any, out: Path, opset: int | None, names: list[str]) -> tuple[int, list[Any], list[str]]:
    """The opset, input dims and output names of the written graph, checked against what was asked."""
    got_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got_opset is None:
        raise ValueError(f"{str(out)!r} declares no default-domain opset.")
    if opset is not None and got_opset != opset:
        raise ValueError(f"asked for opset {opset} but the exporter wrote opset {got_opset} to {str(out)!r}.")
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    if dims and not isinstance(dims[0], str):
        raise ValueError(f"the exported graph's batch dimension is fixed to {dims[0]}, not dynamic.")
    got_names = [o.name for o in proto.graph.output]
    if got_names != names:
        raise ValueError(f"the exported graph's outputs are {got_names}; expected {names}.")
    return int(got_opset), dims, got_names


def to_onnx(
    guarded_or_hardened: nn.Module,
    path: str | os.PathLike[str],
    example_input: torch.Tensor,
    *,
    opset: int | None = None,
    fp16_backbone: bool = False,
    leave_out: Sequence[str] = (),
    strict: bool = True,
    parity_inputs: torch.Tensor | None = None,
    key: bytes | None = None,
    key_env: str | None = None,
) -> ExportReport:
    """Export the model and its detector heads as one ONNX graph with a dynamic batch.

    Args:
        guarded_or_hardened: an ``nn.Module`` classifier (images in [0, 1] -> logits), a
            hardened model (with a reject class) or a ``GuardedModel`` (model + fitted detectors).
        path: the .onnx file to write; its directory must exist.
        example_input: (N, C, H, W) float images in [0, 1]; fixes C, H, W (the batch is dynamic).
        opset: default-domain ONNX opset to target (None: the exporter's recommended one);
            checked against the written file.
        fp16_backbone: run the classifier in float16, keep every detector head in float32
            (a float16 kNN bank would change neighbour order).
        leave_out: detector names whose heads stay out of the graph.
        strict: a detector without an export head raises (True) or is left out with a note.
        parity_inputs: if given, compare PyTorch and onnxruntime on them (batch sizes 1, 7, 64)
            and put the figures in the report.
        key: sign the graph with HMAC-SHA256 under this secret (bytes): ``PATH.sig``;
            :func:`~guard.export.load_session` then needs the key.
        key_env: read the key from this environment variable instead.

    The graph is written atomically (a temporary folder beside ``path``, checked there, then
    renamed into place) and its SHA-256 is written to ``PATH.sha256`` and returned in
    ``report.sha256``: pin it with ``load_session(..., expected_sha256=...)``
    (:mod:`guard.export.signing`).

    Returns:
        An :class:`ExportReport`.

    Raises:
        ValueError: the directory of ``path`` is missing, ``example_input`` is not images, the
            opset is not the one asked for.
        ExportError: (a ValueError) the model cannot be exported; names the failing op.
    """
    import onnx  # noqa: F401  (first, so a missing onnx fails before any work)

    t0 = time.perf_counter()
    out, secret, opset = _check_arguments(guarded_or_hardened, path, example_input, opset, parity_inputs, key, key_env)
    example = example_input.detach().float().cpu()
    if example.shape[0] < 2:  # a batch of 1 would let torch.export specialise the batch dimension to 1
        example = example.expand(2, *example.shape[1:]).contiguous()

    head, notes = build_export_head(
        guarded_or_hardened, example, leave_out=leave_out, strict=strict, fp16_backbone=fp16_backbone
    )
    names = list(head.output_names)
    prog = _export_program(guarded_or_hardened, head, example, names, opset)
    external, data_files, proto, written = _write_checked(prog, head, out, opset, names)
    report = _sealed_report(out, secret, proto, written, notes, fp16_backbone, external, data_files)
    if parity_inputs is not None:
        from guard.export.parity import check_parity
        from guard.export.session import load_session

        session = load_session(out, "cpu", key=secret, expected_sha256=report.sha256)
        report.parity = check_parity(head, session, parity_inputs).to_dict()
    report.seconds = round(time.perf_counter() - t0, 3)
    return report


def _check_arguments(
    guarded_or_hardened: Any,
    path: Any,
    example_input: Any,
    opset: int | None,
    parity_inputs: torch.Tensor | None,
    key: bytes | None,
    key_env: str | None,
) -> tuple[Path, bytes | None, int | None]:
    """``to_onnx``'s arguments checked, in order: the target path, the secret and the checked opset."""
    if not isinstance(guarded_or_hardened, nn.Module):
        raise TypeError(
            f"guarded_or_hardened must be an nn.Module (a model or a GuardedModel); got {type(guarded_or_hardened).__name__}."
        )
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}.")
    out = Path(path)
    if out.suffix != ".onnx":
        raise ValueError(f"path must end in .onnx; got {str(out)!r}.")
    if not out.parent.is_dir():
        raise ValueError(f"path {str(out)!r}: directory {str(out.parent)!r} does not exist; create it first.")
    check_images(example_input, "example_input")
    secret = resolve_key(key, key_env)
    inner = guarded_or_hardened.model if hasattr(guarded_or_hardened, "detectors") else guarded_or_hardened
    with torch.no_grad(), eval_mode(inner):  # a wrong image size fails here, with its name, not deep in the tracer
        call_model(
            inner, example_input[:1].detach().float().to(model_device(inner, example_input.device)), "example_input"
        )
    if parity_inputs is not None:
        check_images(parity_inputs, "parity_inputs")
        if tuple(parity_inputs.shape[1:]) != tuple(example_input.shape[1:]):
            raise ValueError(
                f"parity_inputs must have the shape of example_input's images (N, {', '.join(map(str, example_input.shape[1:]))}); "
                f"got {tuple(parity_inputs.shape)}."
            )
    if opset is not None:
        opset = check_int(opset, "opset", "to_onnx", low=7)
    return out, secret, opset


def _export_program(
    guarded_or_hardened: nn.Module, head: nn.Module, example: torch.Tensor, names: list[str], opset: int | None
) -> Any:
    """The head traced and exported by ``torch.onnx.export(dynamo=True)``; any failure is an ExportError."""
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), warnings.catch_warnings():  # the exporter prints progress lines
            warnings.simplefilter("ignore")
            graph = trace(head, example)
            batch = torch.export.Dim("batch", min=1)
            prog = torch.onnx.export(
                graph,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=names,
                opset_version=opset,
                dynamic_shapes=({0: batch},),
                verbose=False,
            )
    except Exception as err:  # the tracer and the exporter raise many types; all mean "cannot export"
        raise ExportError(
            f"{type(guarded_or_hardened).__name__} cannot be exported to ONNX: {_failing_op(err)}."
        ) from err
    log.debug("exporter output: %s", sink.getvalue())
    return prog


def _write_checked(
    prog: Any, head: nn.Module, out: Path, opset: int | None, names: list[str]
) -> tuple[bool, list[str], Any, tuple[int, list[Any], list[str]]]:
    """Save, check and commit the graph atomically.

    Returns whether weights went to external data, the external data files, the loaded proto
    (without its data) and :func:`_check_written`'s (opset, input dims, output names).
    """
    import onnx

    size = sum(int(t.numel()) * t.element_size() for t in {id(t): t for t in head.state_dict().values()}.values())
    external = size > _TWO_GB - 64 * 1024**2
    staged_dir = staging_dir(out)
    try:  # write and check in a temporary folder beside the target; rename into place only once it passed
        staged = staged_dir / out.name
        prog.save(str(staged), external_data=external)
        data_files = bind_external_data(staged)
        onnx.checker.check_model(str(staged), full_check=True)
        proto = onnx.load(str(staged), load_external_data=False)
        written = _check_written(proto, out, opset, names)
        commit(staged, out, data_files)
    finally:
        shutil.rmtree(staged_dir, ignore_errors=True)
    return external, data_files, proto, written


def _sealed_report(
    out: Path,
    secret: bytes | None,
    proto: Any,
    written: tuple[int, list[Any], list[str]],
    notes: dict[str, Any],
    fp16_backbone: bool,
    external: bool,
    data_files: list[str],
) -> ExportReport:
    """Seal the committed graph (digest, optional signature) and describe it in an ExportReport."""
    import onnx

    got_opset, dims, got_names = written
    digest, digest_path, sig_path = seal_graph(out, secret)
    import onnxruntime

    return ExportReport(
        path=str(out),
        opset=int(got_opset),
        input_name=proto.graph.input[0].name,
        input_shape=["batch", *dims[1:]],
        output_names=got_names,
        heads=notes,
        fp16_backbone=fp16_backbone,
        external_data=external,
        file_bytes=out.stat().st_size + sum((out.parent / f).stat().st_size for f in data_files),
        seconds=0.0,
        versions={"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        sha256=digest,
        signed=secret is not None,
        digest_path=str(digest_path),
        signature_path=None if sig_path is None else str(sig_path),
        external_files=data_files,
    )
