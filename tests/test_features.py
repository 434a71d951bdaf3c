import pytest
import torch
import torch.nn.functional as F
from torch import nn

from guard.core.features import (
    MAX_FEATURES,
    FeatureExtractor,
    default_feature_layers,
    extract_features,
    get_layer,
    layer_names,
    pool_features,
)
from guard.core.models import eval_mode


def test_layer_names_and_lookup(tiny_model):
    names = layer_names(tiny_model)
    assert {"conv1", "conv2", "fc1", "fc2", "conv2.0"} <= set(names)
    assert isinstance(get_layer(tiny_model, "fc2"), torch.nn.Linear)
    with pytest.raises(ValueError, match=r"Unknown layer name 'fc9'.*expected a module path .*conv1"):
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
        assert torch.allclose(
            feats["fc1"],
            tiny_model.fc1(tiny_model.flatten(tiny_model.conv2(tiny_model.conv1(tiny_model.normalize(x))))),
            atol=1e-5,
        )


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


def test_module_input_is_what_the_next_layer_sees(tiny_model, small_split):
    x = small_split[1].x[:8]
    with torch.no_grad():
        _, feats = FeatureExtractor(tiny_model, ["fc1", "fc2:input"])(x)
    torch.testing.assert_close(feats["fc2:input"], feats["fc1"])  # dropout is the identity in eval
    assert get_layer(tiny_model, "fc2:input") is tiny_model.fc2


def test_pool_features_keeps_small_maps_and_averages_large_ones():
    t = torch.arange(2 * 16 * 4 * 4, dtype=torch.float32).view(2, 16, 4, 4)
    assert torch.equal(pool_features(t, "auto"), t.flatten(1))  # 256 values: kept whole
    big = torch.rand(2, 8, 12, 12)  # 1,152 values > MAX_FEATURES: averaged over a 4x4 grid
    torch.testing.assert_close(pool_features(big, "auto"), nn.functional.adaptive_avg_pool2d(big, 4).flatten(1))
    wide = torch.rand(2, 2048, 7, 7)  # even 2x2 is too wide: the global average
    torch.testing.assert_close(pool_features(wide, "auto"), wide.mean(dim=(2, 3)))
    assert pool_features(wide, "auto").shape[1] <= 2048 and pool_features(big, "auto").shape[1] <= MAX_FEATURES
    torch.testing.assert_close(pool_features(big, "avg"), big.mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="pool must be one of"):
        pool_features(big, "max")


class _InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(2 * 26 * 26, 3)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).flatten(1))


def test_a_later_inplace_op_does_not_change_the_captured_output():
    m = _InPlace().eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        ref = m.conv(x)
        _, feats = FeatureExtractor(m, ["conv"])(x)
    torch.testing.assert_close(feats["conv"], ref)  # the pre-ReLU values, as the conv returned them
    assert bool((ref < 0).any())


@pytest.mark.parametrize(
    "arch,expected",
    [
        ("resnet18", ["layer3", "layer4", "fc:input"]),
        ("mobilenet_v3_small", ["features.8", "features", "classifier.3:input"]),
    ],
)
def test_default_layers_of_torchvision_models(arch, expected):
    import torchvision

    model = getattr(torchvision.models, arch)(num_classes=10).eval()
    assert default_feature_layers(model, torch.rand(2, 3, 64, 64)) == expected


class _SharedActNet(nn.Module):
    """EfficientNet's shape: a stem, a ModuleList of blocks, a head conv, and one activation module reused by both."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.act = nn.ReLU6()
        self.blocks = nn.ModuleList([nn.Conv2d(8, 8, 3, s, 1) for s in (2, 1, 2, 2, 1)])  # 16, 16, 8, 4, 4
        self.head_conv = nn.Conv2d(8, 16, 1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.act(self.stem(x))  # 32 px
        for b in self.blocks:
            x = b(x)
        x = self.act(self.bn(self.head_conv(x)))  # the same module again, at 4 px
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_default_layers_skip_reused_modules_and_stem_to_head_jumps():
    # top-level children show 32 px (stem) and 4 px (head) only: 8x apart, so the blocks are used;
    # "act" is called twice and is never picked (the extractor would see its first call, the stem)
    layers = default_feature_layers(_SharedActNet().eval(), torch.rand(2, 3, 64, 64))
    assert layers == ["blocks.2", "bn", "fc:input"]
    _, feats = FeatureExtractor(_SharedActNet().eval(), layers)(torch.rand(2, 3, 64, 64))
    assert feats["blocks.2"].shape[-1] == 8 and feats["bn"].shape[-1] == 4
