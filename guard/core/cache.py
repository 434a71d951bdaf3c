"""The user cache (demo model weights and other trained artefacts), saved without pickle.

Files are safetensors (tensors) plus a JSON metadata string; writes are atomic (temp file +
``os.replace``) so an interrupted run never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = ["cache_dir", "save_tensors", "load_tensors", "atomic_write_text"]


def cache_dir() -> Path:
    """``$GUARD_CACHE_DIR``, else ``$XDG_CACHE_HOME/guard``, else ``~/.cache/guard``."""
    env = os.environ.get("GUARD_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "guard"


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write text to ``path`` atomically."""
    target = Path(path)
    fd, tmp = _atomic_target(target)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> None:
    """Save tensors (made contiguous, moved to CPU) and JSON metadata atomically."""
    target = Path(path)
    fd, tmp = _atomic_target(target)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata={"guard": json.dumps(meta or {})})
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load what :func:`save_tensors` wrote; a clear ValueError for a missing or damaged file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"state file {str(p)!r} does not exist.")
    try:
        tensors = load_file(str(p))
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("guard", "{}")
        meta = json.loads(raw)
    except (SafetensorError, json.JSONDecodeError, OSError, RuntimeError) as err:
        raise ValueError(f"state file {str(p)!r} is corrupt or not a guard safetensors file: {err}") from err
    return tensors, meta
