import pytest
import torch

import guard
import guard.training.classifier as tc
from guard import demo as demo_mod
from guard.core.models import DemoNet


@pytest.fixture
def fake_training(monkeypatch, tmp_path):
    """Cache in a temp dir; training replaced by a counted one-step fit so the test is fast."""
    monkeypatch.setenv("GUARD_CACHE_DIR", str(tmp_path))
    calls = []
    real = tc.train_classifier

    def quick(model, x, y, **kw):
        calls.append(kw["seed"])
        kw.update(epochs=1)
        return real(model, x[:256], y[:256], **kw)

    monkeypatch.setattr(demo_mod, "train_classifier", quick)
    return calls


def test_cache_miss_then_hit_gives_same_weights(fake_training, tmp_path):
    m1 = guard.demo_model(progress=False)
    assert fake_training == [0] and m1.guard_meta["cache_hit"] is False
    files = list((tmp_path / "demo").glob("demonet-*.safetensors"))
    assert len(files) == 1 and demo_mod.demo_model_key() in files[0].name
    m2 = guard.demo_model(progress=False)
    assert fake_training == [0] and m2.guard_meta["cache_hit"] is True
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    assert not m2.training


def test_seed_changes_the_key_and_retrains(fake_training):
    guard.demo_model(progress=False)
    guard.demo_model(seed=1, progress=False)
    assert fake_training == [0, 1]
    assert demo_mod.demo_model_key(0) != demo_mod.demo_model_key(1)


def test_corrupt_cache_is_retrained_with_warning(fake_training, tmp_path):
    guard.demo_model(progress=False)
    path = next((tmp_path / "demo").glob("*.safetensors"))
    path.write_bytes(b"not a safetensors file")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        m = guard.demo_model(progress=False)
    assert fake_training == [0, 0] and m.guard_meta["cache_hit"] is False


def test_no_training_when_disallowed(monkeypatch, tmp_path):
    monkeypatch.setenv("GUARD_CACHE_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="train_if_missing=False"):
        guard.demo_model(train_if_missing=False)


def test_cache_file_has_no_pickle(fake_training, tmp_path):
    guard.demo_model(progress=False)
    raw = next((tmp_path / "demo").glob("*.safetensors")).read_bytes()
    assert not raw.startswith(b"\x80") and b"PK\x03\x04" not in raw[:4]  # neither pickle nor a torch zip


@pytest.mark.slow
def test_demo_model_reaches_98_percent(demo_net, demo_split):
    _, test = demo_split
    assert tc.accuracy(demo_net, test.x, test.y) >= 0.98


def test_demo_net_architecture_named_layers():
    m = DemoNet()
    out = m(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert [n for n, _ in m.named_children()] == ["normalize", "conv1", "conv2", "flatten", "fc1", "dropout", "fc2"]
