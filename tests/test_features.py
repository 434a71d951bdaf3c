import pytest
import torch

from guard.core.features import FeatureExtractor, extract_features, get_layer, layer_names

from guard.core.models import eval_mode


def test_layer_names_and_lookup(tiny_model):
    names = layer_names(tiny_model)
    assert {"conv1", "conv2", "fc1", "fc2", "conv2.0"} <= set(names)
    assert isinstance(get_layer(tiny_model, "fc2"), torch.nn.Linear)
    with pytest.raises(ValueError, match=r"Unknown layer name 'fc9'.*expected one of: .*conv1"):
        get_layer(tiny_model, "fc9")
    with pytest.raises(TypeError, match="layer name must be a str"):
        get_layer(tiny_model, 3)


def test_features_equal_manual_forward(tiny_model, small_split):
    x = small_split[1].x[:16]
    m = tiny_model
    with torch.no_grad():
        h1 = m.conv1(m.normalize(x))
        h2 = m.conv2(h1)
        f1 = m.fc1(m.flatten(h2))
        logits_ref = m.fc2(f1)
        logits, feats = FeatureExtractor(m, ["conv2", "fc1"])(x)
    assert torch.allclose(feats["conv2"], h2) and torch.allclose(feats["fc1"], f1)
    assert torch.allclose(logits, logits_ref)
    assert list(feats) == ["conv2", "fc1"]


def test_gradients_flow_through_features(tiny_model, small_split):
    x = small_split[1].x[:4].clone().requires_grad_(True)
    _, feats = FeatureExtractor(tiny_model, "conv2")(x)
    feats["conv2"].sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    # hooks are removed after the call: the model's module has no forward hooks left
    assert len(tiny_model.conv2._forward_hooks) == 0


def test_extract_features_batched_flattened_and_mode_restored(tiny_model, small_split):
    x = small_split[1].x[:50]
    tiny_model.train()
    try:
        logits, feats = extract_features(tiny_model, x, ["conv1", "fc1"], batch_size=16)
        assert tiny_model.training  # mode restored
    finally:
        tiny_model.eval()
    assert logits.shape == (50, 10)
    assert feats["conv1"].shape == (50, 8 * 12 * 12) and feats["fc1"].shape == (50, 32)
    with torch.no_grad():
        assert torch.allclose(feats["fc1"], tiny_model.fc1(tiny_model.flatten(tiny_model.conv2(tiny_model.conv1(tiny_model.normalize(x))))), atol=1e-5)


def test_eval_mode_restores_mixed_modes(tiny_model):
    tiny_model.eval()
    tiny_model.dropout.train()
    with eval_mode(tiny_model):
        assert not tiny_model.dropout.training
    assert tiny_model.dropout.training and not tiny_model.fc1.training
    tiny_model.eval()


def test_empty_layer_list(tiny_model):
    with pytest.raises(ValueError, match="layers must name at least one layer"):
        FeatureExtractor(tiny_model, [])
