"""tools/train_cifar10_resnet20.py: cosine then SWA phases, per-epoch checkpoints, an exact resume."""

from __future__ import annotations

import importlib.util
import io
import json
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
    return [
        "--data",
        str(data),
        "--weights",
        str(weights),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--lr",
        "0.05",
        "--swa-epochs",
        str(swa_epochs),
        "--swa-lr",
        "0.01",
        "--batch-size",
        "16",
        "--threads",
        "1",
    ]


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


def test_distillation_term_is_zero_for_the_teacher_itself_and_grows_with_disagreement():
    import torch

    tool = _tool()
    torch.manual_seed(0)
    teacher = CifarResNet(8).eval()
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        t = teacher(x)
    same = tool._distillation(t.clone(), [teacher], x, 4.0)
    assert abs(float(same)) < 1e-5  # KL(p || p) = 0
    near = tool._distillation(t + 0.1 * torch.randn_like(t), [teacher], x, 4.0)
    far = tool._distillation(t + 3.0 * torch.randn_like(t), [teacher], x, 4.0)
    assert 0 < float(near) < float(far)
    # T^2 scaling: the gradient magnitude w.r.t. the logits does not vanish as T grows (Hinton et al.)
    s = (t + torch.randn_like(t)).requires_grad_(True)
    g1 = torch.autograd.grad(tool._distillation(s, [teacher], x, 1.0), s)[0].norm()
    g8 = torch.autograd.grad(tool._distillation(s, [teacher], x, 8.0), s)[0].norm()
    assert float(g8) > 0.2 * float(g1)


def test_an_ensemble_teacher_is_the_mean_of_its_tempered_softmaxes():
    import torch
    import torch.nn.functional as F

    tool = _tool()
    torch.manual_seed(1)
    a, b = CifarResNet(8).eval(), CifarResNet(8).eval()
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        mean_p = (F.softmax(a(x) / 3.0, 1) + F.softmax(b(x) / 3.0, 1)) / 2
    # a student whose tempered softmax is exactly the mean has zero loss; one that copies a does not
    student = torch.log(mean_p) * 3.0
    assert abs(float(tool._distillation(student, [a, b], x, 3.0))) < 1e-5
    with torch.no_grad():
        assert float(tool._distillation(a(x), [a, b], x, 3.0)) > 1e-4
    # the same network twice is the network once
    with torch.no_grad():
        s = a(x) + torch.randn(5, 10)
        assert torch.allclose(tool._distillation(s, [a, a], x, 3.0), tool._distillation(s, [a], x, 3.0), atol=1e-6)


def test_distilling_from_a_teacher_is_recorded_and_changes_the_result(material, tmp_path):
    data, weights = material
    tool = _tool()
    teacher = tmp_path / "teacher.safetensors"
    save_tensors(teacher, CifarResNet(8).state_dict())
    assert tool.main(_args(data, weights, tmp_path / "plain", swa_epochs=0)) == 0
    kd = _args(data, weights, tmp_path / "kd", swa_epochs=0) + [
        "--teacher",
        str(teacher),
        str(weights),
        "--teacher-depth",
        "8",
        "20",
    ]
    assert tool.main(kd) == 0
    plain = json.loads((tmp_path / "plain" / "resnet20.json").read_text())
    record = json.loads((tmp_path / "kd" / "resnet20.json").read_text())
    assert plain["teacher"] is None
    nets = record["teacher"]["networks"]
    assert [n["depth"] for n in nets] == [8, 20] and record["teacher"]["kd_weight"] == 0.9
    assert nets[1]["sha256"] == record["start_file"]["sha256"] and nets[0]["sha256"] != nets[1]["sha256"]
    assert record["sha256"] != plain["sha256"]  # the soft targets changed the training
    with pytest.raises(SystemExit):  # two teachers, three depths
        tool.main(
            _args(data, weights, tmp_path / "bad2", swa_epochs=0)
            + ["--teacher", str(teacher), str(weights), "--teacher-depth", "8", "20", "56"]
        )
    # a teacher file of another depth is refused, naming the file
    with pytest.raises(ValueError, match="teacher.safetensors"):
        tool.main(
            _args(data, weights, tmp_path / "bad", swa_epochs=0) + ["--teacher", str(teacher), "--teacher-depth", "20"]
        )


def test_depth_56_writes_resnet56_files(material, tmp_path):
    data, _ = material
    tool = _tool()
    start = tmp_path / "start56.safetensors"
    save_tensors(start, CifarResNet(56).state_dict())
    args = [
        "--data",
        str(data),
        "--weights",
        str(start),
        "--out",
        str(tmp_path / "o"),
        "--epochs",
        "1",
        "--batch-size",
        "40",
        "--threads",
        "1",
        "--depth",
        "56",
    ]
    assert tool.main(args) == 0
    record = json.loads((tmp_path / "o" / "resnet56.json").read_text())
    assert record["architecture"] == "guard.core.models.CifarResNet(depth=56)"
    assert "resnet56-4bfd9763.th" in record["start"]
    # ResNet-20 weights for a ResNet-56 run are refused
    with pytest.raises(ValueError, match="CifarResNet\\(depth=56\\)"):
        tool.main(
            [
                "--data",
                str(data),
                "--weights",
                str(material[1]),
                "--out",
                str(tmp_path / "p"),
                "--epochs",
                "1",
                "--threads",
                "1",
                "--depth",
                "56",
            ]
        )
