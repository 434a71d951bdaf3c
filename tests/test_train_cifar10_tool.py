"""tools/train_cifar10_resnet20.py: cosine then SWA phases, per-epoch checkpoints, an exact resume."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from guard.core.cache import save_tensors
from guard.core.models import CifarResNet

TOOL = Path(__file__).resolve().parents[1] / "tools" / "train_cifar10_resnet20.py"
NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _tool():
    spec = importlib.util.spec_from_file_location("train_cifar10_resnet20", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _archive(path: Path, split: str, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w:gz") as tf:
        for c in NAMES:
            for i in range(per_class):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
                info = tarfile.TarInfo(f"{split}/{c}/{i:04d}.png")
                info.size = len(buf.getvalue())
                tf.addfile(info, io.BytesIO(buf.getvalue()))


@pytest.fixture()
def material(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _archive(data / "cifar10-train.tar.gz", "train", 4, 0)
    _archive(data / "cifar10-test.tar.gz", "test", 2, 1)
    weights = tmp_path / "start.safetensors"
    save_tensors(weights, CifarResNet(20).state_dict())
    return data, weights


def _args(data, weights, out, swa_epochs=2):
    return ["--data", str(data), "--weights", str(weights), "--out", str(out), "--epochs", "1", "--lr", "0.05",
            "--swa-epochs", str(swa_epochs), "--swa-lr", "0.01", "--batch-size", "16", "--threads", "1"]


def test_resume_after_an_interruption_gives_the_same_weights(material, tmp_path, monkeypatch):
    data, weights = material
    tool = _tool()
    assert tool.main(_args(data, weights, tmp_path / "full")) == 0
    full = json.loads((tmp_path / "full" / "resnet20.json").read_text())
    assert [h["phase"] for h in full["history"]] == ["cosine", "swa", "swa"]
    assert full["swa_epochs"] == 2 and full["test_accuracy_last_iterate"] is not None
    assert full["start_file"]["name"] == "start.safetensors"

    # interrupt the second run after its second epoch's checkpoint, then run the same command again
    real_save = tool._save_state
    calls = []

    def save_then_stop(*a, **k):
        real_save(*a, **k)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(tool, "_save_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        tool.main(_args(data, weights, tmp_path / "resumed"))
    monkeypatch.setattr(tool, "_save_state", real_save)
    assert not (tmp_path / "resumed" / "resnet20.safetensors").exists()
    assert tool.main(_args(data, weights, tmp_path / "resumed")) == 0
    resumed = json.loads((tmp_path / "resumed" / "resnet20.json").read_text())
    assert resumed["sha256"] == full["sha256"]  # bit-identical weights: nothing done was lost or redone differently
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in full["history"]]


def test_a_checkpoint_from_other_settings_is_refused(material, tmp_path):
    data, weights = material
    tool = _tool()
    assert tool.main(_args(data, weights, tmp_path / "out", swa_epochs=1)) == 0
    with pytest.raises(ValueError, match="other settings"):
        tool.main(_args(data, weights, tmp_path / "out", swa_epochs=2))
