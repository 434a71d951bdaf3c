"""guard.harden under torchrun with 2 processes (gloo, CPU) vs 1 process: same accuracy within noise.

Both run the one CLI entry point, ``torchrun -m guard harden``, on a user's model given as
``module:callable`` from the working directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from guard.core.cache import save_tensors

MODULE = """
from guard.core.cache import load_tensors
from guard.core.models import DemoNet


def build():
    model = DemoNet(width=8, hidden=32)
    model.load_state_dict(load_tensors("tiny.safetensors")[0])
    return model
"""


def _torchrun(n: int, cwd: Path, out: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::RuntimeWarning"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        f"--nproc_per_node={n}",
        "-m",
        "guard",
        "harden",
        "--model",
        "tiny_module:build",
        "--data",
        "mnist",
        "--train-size",
        "1024",
        "--test-size",
        "512",
        "--rounds",
        "1",
        "--epochs-per-round",
        "2",
        "--budget",
        "quick",
        "--out",
        out,
        "-q",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((cwd / out / "harden.json").read_text())


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_two_processes_match_one(tmp_path, tiny_model):
    save_tensors(tmp_path / "tiny.safetensors", tiny_model.state_dict())
    (tmp_path / "tiny_module.py").write_text(MODULE)
    one = _torchrun(1, tmp_path, "one")
    two = _torchrun(2, tmp_path, "two")
    assert one["world_size"] == 1 and two["world_size"] == 2
    a1, a2 = one["harden"]["rounds"][-1]["clean_accuracy"], two["harden"]["rounds"][-1]["clean_accuracy"]
    # Same global batch and the same attack set (generated on rank 0, broadcast); only the
    # shard order and dropout masks differ, so the accuracy agrees within noise on 512 images.
    assert abs(a1 - a2) <= 0.03, (a1, a2)
    # only rank 0 wrote a checkpoint, and it is complete
    assert [p.name for p in (tmp_path / "two" / "checkpoints").iterdir()] == ["harden_state.safetensors"]
