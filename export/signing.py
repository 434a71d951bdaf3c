"""Integrity of an exported graph: written atomically, its external data bound, pinned or signed.

The thresholds and reference scores inside the .onnx file decide what gets through in
deployment, so :func:`guard.export.to_onnx` and :func:`guard.export.load_session` treat the graph
like every other guard artefact (:mod:`guard.core.integrity`):

* **Atomic.** The exporter writes into a temporary folder beside the target; the graph is
  checked there, then its external data files and finally the .onnx are renamed into place,
  so a killed export leaves the previous graph (or none), never half of one.
* **External data bound.** Weights stored beside the graph (models over 2 GB) are hashed and
  their SHA-256 recorded inside the .onnx (``metadata_props["guard.external_data.sha256"]``),
  so the .onnx file's own digest covers them too.
* **Digest.** ``MODEL.onnx.sha256`` holds the SHA-256 of the .onnx bytes (``sha256sum``
  format); ``load_session(expected_sha256=...)`` pins it; without a pin the file beside the
  graph, when present, still catches accidental damage.
* **Signature.** With a key, ``MODEL.onnx.sig`` holds an HMAC-SHA256 over that digest; a
  signed graph loads only with the key, and with a key an unsigned graph is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from guard.core.cache import TMP_SUFFIX, atomic_write_text, fsync_path
from guard.core.integrity import (
    IntegrityError,
    canonical_json,
    check_expected_sha256,
    check_seal,
    content_seal,
    file_sha256,
    read_digest_file,
    write_digest_file,
)

__all__ = ["staging_dir", "bind_external_data", "commit", "seal_graph", "verify_graph", "SIG_FORMAT", "EXTERNAL_KEY"]

SIG_FORMAT = "guard.onnx-signature/1"
EXTERNAL_KEY = "guard.external_data.sha256"


def staging_dir(out: Path) -> Path:
    """A fresh temporary folder beside ``out`` (same file system, so renames are atomic)."""
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=TMP_SUFFIX))


def _external_locations(proto: Any) -> list[str]:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    locs = []
    for t in _get_all_tensors(proto):
        if uses_external_data(t):
            loc = next((e.value for e in t.external_data if e.key == "location"), "")
            if loc not in locs:
                locs.append(loc)
    return locs


def _check_location(loc: str, graph: Path) -> Path:
    if not loc or Path(loc).name != loc or loc in (".", ".."):
        raise IntegrityError(
            f"graph {str(graph)!r} refers to external data {loc!r} outside its folder; expected a file name beside it."
        )
    return graph.parent / loc


def bind_external_data(staged: Path) -> list[str]:
    """Record the SHA-256 of every external data file inside the staged .onnx; returns their names."""
    import onnx

    proto = onnx.load(str(staged), load_external_data=False)
    locs = _external_locations(proto)
    if not locs:
        return []
    digests = {loc: file_sha256(_check_location(loc, staged)) for loc in locs}
    for p in list(proto.metadata_props):
        if p.key == EXTERNAL_KEY:
            proto.metadata_props.remove(p)
    proto.metadata_props.add(key=EXTERNAL_KEY, value=canonical_json(digests).decode())
    onnx.save_model(proto, str(staged))  # the tensors keep their external references; the data is not rewritten
    return locs


def commit(staged: Path, out: Path, external: list[str]) -> None:
    """Rename the staged external data files, then the staged graph, into place (each atomic)."""
    for loc in external:
        fsync_path(staged.parent / loc)
        os.replace(staged.parent / loc, out.parent / loc)
    fsync_path(staged)
    os.replace(staged, out)
    fsync_path(out.parent)
    shutil.rmtree(staged.parent, ignore_errors=True)


def _sig_path(graph: Path) -> Path:
    return graph.with_name(graph.name + ".sig")


def seal_graph(out: Path, key: bytes | None) -> tuple[str, Path, Path | None]:
    """Write ``out.sha256`` and, with a key, ``out.sig`` (a stale signature is removed otherwise).

    Returns ``(sha256 of the .onnx bytes, digest file, signature file or None)``.
    """
    digest = file_sha256(out)
    side = write_digest_file(out, digest)
    sig = _sig_path(out)
    if key is None:
        sig.unlink(missing_ok=True)
        return digest, side, None
    body = {"format": SIG_FORMAT, "file": out.name, "sha256": digest}
    atomic_write_text(sig, json.dumps({**body, "integrity": content_seal(body, key=key)}, indent=2) + "\n")
    return digest, side, sig


def verify_graph(path: Path, key: bytes | None, expected_sha256: str | None) -> tuple[bytes, bool]:
    """Check an exported graph before it serves; returns ``(its verified bytes, has external data)``.

    In order: the pinned digest (``expected_sha256``), the signature (required with a key,
    refused without one), the digest file beside the graph (when nothing is pinned), and the
    external data files against the digests recorded inside the graph. Raises
    :class:`IntegrityError` (a ValueError) on any mismatch.
    """
    import onnx

    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    where = f"ONNX graph {str(path)!r}"
    check_expected_sha256(expected_sha256, digest, where)
    sig = _sig_path(path)
    if sig.is_file():
        try:
            record = json.loads(sig.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise IntegrityError(f"{where}: its signature file {str(sig)!r} is not valid JSON: {err}") from err
        if not isinstance(record, dict):
            raise IntegrityError(f"{where}: its signature file {str(sig)!r} is not a JSON object.")
        seal = record.pop("integrity", None)
        check_seal(seal, {**record, "sha256": digest, "format": SIG_FORMAT}, None, key, where)
        if record.get("format") != SIG_FORMAT:
            raise IntegrityError(f"{where}: {str(sig)!r} has format {record.get('format')!r}; expected {SIG_FORMAT!r}.")
    elif key is not None:
        raise IntegrityError(
            f"{where} is not signed (no {sig.name} beside it), but a key was given: refusing an unsigned graph "
            "(it may have been replaced by someone without the key); export it again with the key."
        )
    if expected_sha256 is None:
        recorded = read_digest_file(path)
        if recorded is not None and recorded != digest:
            raise IntegrityError(
                f"{where} was altered or only partly written: its SHA-256 is {digest}, {path.name}.sha256 "
                f"beside it records {recorded or 'nothing'}."
            )
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as err:  # protobuf raises its own DecodeError
        raise ValueError(f"{where} is not a valid ONNX model: {err}") from err
    locs = _external_locations(proto)
    bound = next((p.value for p in proto.metadata_props if p.key == EXTERNAL_KEY), None)
    try:
        bound_map = json.loads(bound) if bound is not None else {}
    except json.JSONDecodeError as err:
        raise IntegrityError(f"{where}: its {EXTERNAL_KEY} record is not valid JSON: {err}") from err
    strict = key is not None or expected_sha256 is not None or bound is not None
    for loc in locs:
        file = _check_location(loc, path)
        if loc not in bound_map:
            if strict:
                raise IntegrityError(
                    f"{where} refers to external data {loc!r} whose SHA-256 it does not record; it cannot be verified."
                )
            continue
        if not file.is_file():
            raise IntegrityError(f"{where}: its external data file {str(file)!r} is missing.")
        got = file_sha256(file)
        if got != bound_map[loc]:
            raise IntegrityError(
                f"{where}: its external data file {str(file)!r} was altered (SHA-256 {got}, the graph records "
                f"{bound_map[loc]})."
            )
    return data, bool(locs)
