"""Where a figure came from: the commit, the machine and the command, written beside every result.

Every results file under ``benchmarks/results`` (and every reference audit) carries the record
:func:`provenance` returns, so that a figure in README.md or BENCHMARKS.md can be traced to the run
that produced it and re-run. :func:`write_results` writes a results JSON atomically with that
record under the key ``"provenance"`` (plus ``"command"`` and ``"commit"`` at the top level, the
keys the issues' result schemas name).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from guard.core.cache import atomic_write_text

__all__ = ["provenance", "git_commit", "write_results", "read_results"]


def git_commit(cwd: str | os.PathLike[str] | None = None) -> str:
    """The checked-out commit (with ``+dirty`` when tracked files differ from it), or ``"unknown"``."""
    where = str(cwd) if cwd is not None else str(Path(__file__).resolve().parents[2])
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def _machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cores": os.cpu_count(),
        "load_1min_at_end": round(load[0], 2),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _argv_command() -> str:
    """This process's command line; a module run with ``python -m`` is written that way (its argv[0] is a path)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None)
    if name:
        name = name.removesuffix(".__main__")
        return shlex.join([Path(sys.executable).name, "-m", name, *sys.argv[1:]])
    return shlex.join([Path(sys.executable).name, *sys.argv])


def provenance(command: str | None = None) -> dict[str, Any]:
    """The run record: ``{"commit", "command", "machine", "finished"}``; ``command`` defaults to this process's argv."""
    cmd = command if command is not None else _argv_command()
    return {
        "commit": git_commit(),
        "command": cmd,
        "machine": _machine(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_results(
    path: str | os.PathLike[str], figures: dict[str, Any], *, command: str | None = None
) -> dict[str, Any]:
    """Write ``figures`` plus their provenance to ``path`` (JSON, atomic); returns what was written."""
    if not isinstance(figures, dict):
        raise TypeError(f"figures must be a dict; got {type(figures).__name__}.")
    rec = provenance(command)
    out = {**figures, "command": rec["command"], "commit": rec["commit"], "provenance": rec}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(out, indent=2, sort_keys=False) + "\n")
    return out


def read_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A results file written by :func:`write_results`; raises ValueError naming the file when it has no provenance."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"results file {str(p)!r} could not be read as JSON: {e}") from e
    if not isinstance(data, dict) or "provenance" not in data:
        raise ValueError(
            f"results file {str(p)!r} has no 'provenance' record (commit, machine, command); "
            "write it with guard.core.provenance.write_results."
        )
    return data
