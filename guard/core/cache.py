"""The user cache (demo model weights and other trained artefacts), saved without pickle.

Files are safetensors (tensors) plus a JSON metadata string. Every write is crash-safe: the
bytes go to a temporary file in the same folder (``.NAME.XXXX.tmp``), are flushed to disk
(``fsync``) and renamed over the target (``os.replace``, atomic on POSIX and Windows), so a
process killed at any point leaves either the old file or the new one, never half of one.
A killed writer may leave its ``.tmp`` behind; :func:`remove_stale_temps` sweeps a folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

__all__ = [
    "cache_dir",
    "save_tensors",
    "load_tensors",
    "read_tensors",
    "atomic_write_text",
    "atomic_write_bytes",
    "fsync_path",
    "remove_stale_temps",
    "TMP_SUFFIX",
]

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"


def cache_dir() -> Path:
    """``$GUARD_CACHE_DIR``, else ``$XDG_CACHE_HOME/guard``, else ``~/.cache/guard``."""
    env = os.environ.get("GUARD_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "guard"


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file (or a folder's entries) to disk; a no-op where the OS cannot open folders."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace(tmp: str, target: Path) -> None:
    fsync_path(tmp)
    os.replace(tmp, target)
    fsync_path(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write bytes to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    target = Path(path)
    fd, tmp = _atomic_target(target)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        _replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 text to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_tensors(
    path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None
) -> None:
    """Save tensors (made contiguous, moved to CPU) and JSON metadata atomically."""
    target = Path(path)
    fd, tmp = _atomic_target(target)
    os.close(fd)
    try:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            tmp,
            metadata={"guard": json.dumps(meta or {})},
        )
        _replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_tensors(data: bytes, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and guard metadata from the bytes of a safetensors file (``name`` for messages).

    Parsing the bytes already read (rather than the path again) means that what was hashed is
    what is loaded.
    """
    try:
        if len(data) < 8:
            raise SafetensorError(f"{len(data)} byte(s), shorter than a safetensors header")
        (n,) = struct.unpack("<Q", data[:8])
        if n > len(data) - 8:
            raise SafetensorError(f"header length {n} exceeds the file ({len(data)} bytes)")
        header = json.loads(data[8 : 8 + n])
        if not isinstance(header, dict):
            raise SafetensorError("the header is not a JSON object")
        raw = (header.get("__metadata__") or {}).get("guard", "{}")
        meta = json.loads(raw)
        if not isinstance(meta, dict):
            raise SafetensorError(f"the guard metadata is a {type(meta).__name__}, not a JSON object")
        tensors = load_bytes(data)
    except (
        SafetensorError,
        json.JSONDecodeError,
        UnicodeDecodeError,
        OSError,
        RuntimeError,
        struct.error,
        AttributeError,
    ) as err:
        raise ValueError(f"state file {name!r} is corrupt or not a guard safetensors file: {err}") from err
    return tensors, meta


def load_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load what :func:`save_tensors` wrote; a clear ValueError for a missing or damaged file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"state file {str(p)!r} does not exist.")
    return read_tensors(p.read_bytes(), str(p))


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the ``.NAME.XXXX.tmp`` files and folders a killed writer left under ``folder``.

    Call it only on a folder this process owns (an audit's output folder): a temporary file of
    a writer still running would be deleted under it.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    gone = []
    for p in sorted(root.rglob(f".*{TMP_SUFFIX}"), key=lambda q: len(q.parts), reverse=True):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        gone.append(p)
    if gone:
        log.info("removed %d temporary file(s) an interrupted run left in %s", len(gone), root)
    return gone
