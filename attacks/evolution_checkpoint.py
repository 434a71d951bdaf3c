"""Checkpoints of a :class:`~guard.attacks.FoolingEvolution` run, so that an interrupted run loses
nothing done and a resumed one continues exactly as if it had never stopped.

One file, ``<dir>/evolution_state.safetensors``, rewritten atomically
(:func:`guard.core.cache.save_tensors`) every ``checkpoint_every`` generations and after the
last. Tensors: the archive's elites in pyribs' insertion order (images, objectives, cells,
genome ids), the reservoir of extra samples and the torch generator's state. JSON: the
run's fingerprint, the CPPN genomes the archive holds, the counters, the history, the seconds
spent, and the states of the NumPy generators (the run's own and the archive's, which draws the
parents). A checkpoint of another run (other settings, model, classes or image shape) is
refused; only ``generations`` may differ, so a finished run can be continued with more.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from guard.attacks.cppn import Genome
from guard.core.cache import load_tensors, save_tensors

__all__ = ["STATE_NAME", "EvolutionCheckpointMismatch", "save_evolution_state", "load_evolution_state"]

STATE_NAME = "evolution_state.safetensors"
FORMAT = "guard.fooling_evolution.v1"


class EvolutionCheckpointMismatch(ValueError):
    """The checkpoint in ``checkpoint_dir`` belongs to another run (settings, model, classes or shape differ)."""


def save_evolution_state(
    directory: str | os.PathLike[str],
    *,
    fingerprint: dict[str, Any],
    archive: dict[str, torch.Tensor],
    archive_rng: dict[str, Any],
    rng: np.random.Generator,
    gen: torch.Generator,
    genomes: dict[int, Genome],
    pool: tuple[list[torch.Tensor], list[int], list[float]],
    counters: dict[str, Any],
    history: list[dict[str, float]],
    shape: tuple[int, ...],
) -> Path:
    """Write the state after a generation (atomically) and return the file's path."""
    pool_x, pool_l, pool_c = pool
    tensors = {f"archive.{k}": v for k, v in archive.items()}
    tensors["pool.x"] = torch.stack(pool_x) if pool_x else torch.empty((0, *shape))
    tensors["pool.label"] = torch.tensor(pool_l, dtype=torch.long)
    tensors["pool.confidence"] = torch.tensor(pool_c, dtype=torch.float64)
    tensors["torch_generator"] = gen.get_state()
    meta = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "counters": counters,
        "history": history,
        "rng": rng.bit_generator.state,
        "archive_rng": archive_rng,
        "genomes": [[int(i), g.to_dict()] for i, g in genomes.items()],
    }
    path = Path(directory) / STATE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, tensors, meta)
    return path


def load_evolution_state(directory: str | os.PathLike[str], fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state, or None when ``directory`` holds none.

    Raises:
        EvolutionCheckpointMismatch: the checkpoint is another run's (the differing keys named).
        ValueError: the file is damaged or not an evolution checkpoint.
    """
    path = Path(directory) / STATE_NAME
    if not path.is_file():
        return None
    tensors, meta = load_tensors(path)
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"checkpoint_dir: {path} is not a FoolingEvolution checkpoint (format {meta.get('format')!r}, expected {FORMAT!r})."
        )
    saved = meta["fingerprint"]
    differ = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if differ:
        raise EvolutionCheckpointMismatch(
            f"checkpoint_dir: {path} holds another run's state (differs in {differ}); use another folder or delete it."
        )
    gen = torch.Generator()
    gen.set_state(tensors["torch_generator"])
    rng = np.random.default_rng()
    rng.bit_generator.state = meta["rng"]
    px = tensors["pool.x"]
    return {
        "archive": {k[len("archive.") :]: v for k, v in tensors.items() if k.startswith("archive.")},
        "archive_rng": meta["archive_rng"],
        "rng": rng,
        "gen": gen,
        "genomes": {int(i): Genome.from_dict(d) for i, d in meta["genomes"]},
        "pool": (
            [px[i] for i in range(px.shape[0])],
            [int(v) for v in tensors["pool.label"]],
            [float(v) for v in tensors["pool.confidence"]],
        ),
        "counters": meta["counters"],
        "history": meta["history"],
    }
