import sys

import pytest
import torch

import guard
from guard.core.features import find_head
from guard.core.models import Normalize, Normalized, load_model


def test_normalize_wrapper_matches_manual():
    base = torch.nn.Conv2d(3, 2, 1)
    m = Normalized(base, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.5])
    x = torch.rand(2, 3, 4, 4)
    ref = base((x - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1))
    assert torch.allclose(m(x), ref, atol=1e-6)
    assert "model" in dict(m.named_children())
    with pytest.raises(ValueError, match="std must be > 0"):
        Normalize([0.0], [0.0])
    with pytest.raises(ValueError, match="same length"):
        Normalize([0.0, 0.1], [1.0])


def test_find_head(tiny_model):
    name, head = find_head(tiny_model)
    assert name == "fc2" and head.out_features == 10
    with pytest.raises(ValueError, match="must be an nn.Linear"):
        find_head(tiny_model, "conv1")
    with pytest.raises(ValueError, match="no nn.Linear"):
        find_head(torch.nn.Conv2d(1, 1, 1))


def test_load_torchscript_and_exported_program(tiny_model, tmp_path):
    x = torch.rand(2, 1, 28, 28)
    ts = tmp_path / "m.pt"
    torch.jit.save(torch.jit.trace(tiny_model, x), str(ts))
    assert torch.allclose(load_model(ts)(x), tiny_model(x), atol=1e-6)
    ep = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(tiny_model, (x,)), str(ep))
    assert torch.allclose(load_model(ep)(x), tiny_model(x), atol=1e-6)


def test_load_module_callable(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import guard\ndef build():\n    return guard.DemoNet(num_classes=3)\nnot_a_model = 5\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    m = load_model("my_models:build")
    assert isinstance(m, guard.DemoNet) and m.fc2.out_features == 3
    with pytest.raises(TypeError, match="must give an nn.Module"):
        load_model("my_models:not_a_model")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        load_model("my_models:nope")
    with pytest.raises(ValueError, match="cannot import module"):
        load_model("no_such_module_xyz:build")
    sys.modules.pop("my_models", None)


def test_load_model_bad_files(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a TorchScript archive"):
        load_model(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="module:callable"):
        load_model("justaname")
