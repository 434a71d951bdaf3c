"""SaliencyConcentration: window share on known maps; a planted bright patch on a linear model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from guard.core.validation import NotFittedError
from guard.detectors import SaliencyConcentration
from guard.detectors.saliency import topk_share, window_share


def test_window_share_exact() -> None:
    a = torch.zeros(2, 10, 10)
    a[0, 2:5, 3:6] = 1.0  # all mass in a 3x3 square
    a[1] = 1.0  # uniform: a 3x3 window holds 9/100
    torch.testing.assert_close(window_share(a, 3), torch.tensor([1.0, 0.09]))
    torch.testing.assert_close(topk_share(a, 0.09), torch.tensor([1.0, 0.09]))


class _Masked(nn.Module):
    """logit_1 = sum(w * x): the saliency of class 1 is |w| (closed form)."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x * self.w).flatten(1).sum(1)
        return torch.stack([-s, s], 1)


def test_concentrated_gradient_scores_higher_and_model_untouched() -> None:
    w_spread = torch.ones(1, 1, 12, 12)
    w_peak = torch.full((1, 1, 12, 12), 0.01)
    w_peak[..., 4:8, 4:8] = 1.0
    x = torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    det = SaliencyConcentration(window=4)
    m1, m2 = _Masked(w_spread), _Masked(w_peak)
    det.fit(m1)
    target = torch.ones(4, dtype=torch.long)
    s1 = det.score(m1, x, target=target)
    s2 = det.score(m2, x, target=target)
    torch.testing.assert_close(s1, torch.full((4,), 16 / 144))
    assert bool((s2 > 0.8).all())
    with torch.inference_mode():  # serving code often runs under inference mode
        torch.testing.assert_close(det.score(m1, x, target=target), s1)
    assert m1.w.requires_grad and m1.w.grad is None and m1.training


def test_window_share_separable_equals_one_square_pool() -> None:
    """The separable box filter gives the w x w pool's sums (the brute-force reference)."""
    import torch.nn.functional as F

    a = torch.rand(3, 37, 41, generator=torch.Generator().manual_seed(1))
    for w in (1, 4, 9, 37):
        ref = (F.avg_pool2d(a.unsqueeze(1), w, stride=1) * w * w).flatten(1).max(1).values / a.flatten(1).sum(1)
        torch.testing.assert_close(window_share(a, w), ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["saliency", "input_x_gradient"])
def test_gradient_maps_equal_captum(tiny_model, small_split, method) -> None:
    """|grad| is Captum's Saliency(abs=True); |x * grad| is Captum's InputXGradient, abs, channels summed."""
    from captum.attr import InputXGradient, Saliency

    from guard.detectors.saliency import torch_attributions

    _, test = small_split
    x = test.x[:16]
    target = tiny_model(x).argmax(1)
    det = SaliencyConcentration(method, window=6).fit(tiny_model)
    mine = det.attributions(tiny_model, x.clone().requires_grad_(True), target)
    xr = x.clone().requires_grad_(True)
    ref = (
        (
            Saliency(tiny_model).attribute(xr, target=target, abs=True)
            if method == "saliency"
            else InputXGradient(tiny_model).attribute(xr, target=target).abs()
        )
        .detach()
        .sum(1)
    )
    assert float(ref.abs().max()) > 0
    torch.testing.assert_close(mine, ref)
    torch.testing.assert_close(torch_attributions(tiny_model, x, target, method).detach(), ref)  # the exported graph's


def test_input_x_gradient_is_zero_where_the_input_is() -> None:
    """Unlike |grad|, |x * grad| vanishes on black pixels: a known map on the linear model."""
    w = torch.ones(1, 1, 12, 12)
    x = torch.zeros(2, 1, 12, 12)
    x[:, :, 2:6, 2:6] = 1.0  # only a 4x4 square is lit
    target = torch.ones(2, dtype=torch.long)
    m = _Masked(w)
    torch.testing.assert_close(
        SaliencyConcentration("input_x_gradient", window=4).fit(m).score(m, x, target=target), torch.ones(2)
    )
    torch.testing.assert_close(
        SaliencyConcentration("saliency", window=4).fit(m).score(m, x, target=target), torch.full((2,), 16 / 144)
    )


@pytest.mark.parametrize(
    "method,layer",
    [("saliency", None), ("input_x_gradient", None), ("gradcam", "conv1"), ("integrated_gradients", None)],
)
def test_methods_run_on_demo_layout(tiny_model, small_split, method, layer) -> None:
    _, test = small_split
    det = SaliencyConcentration(method, window=6, layer=layer, n_steps=4).fit(tiny_model)
    s = det.score(tiny_model, test.x[:16])
    assert s.shape == (16,) and bool(((s >= 0) & (s <= 1 + 1e-5)).all())


def test_bad_inputs(tiny_model) -> None:
    x = torch.rand(2, 1, 28, 28)
    with pytest.raises(NotFittedError):
        SaliencyConcentration().score(tiny_model, x)
    with pytest.raises(ValueError, match="method"):
        SaliencyConcentration("lime").fit(tiny_model)
    with pytest.raises(ValueError, match="needs layer"):
        SaliencyConcentration("gradcam").fit(tiny_model)
    with pytest.raises(ValueError, match="Unknown layer"):
        SaliencyConcentration("gradcam", layer="nope").fit(tiny_model)
    with pytest.raises(ValueError, match="window"):
        SaliencyConcentration(window=0).fit(tiny_model)


def test_bit_depth_squeeze_undoes_small_linf_noise(tiny_model, small_split) -> None:
    from guard.detectors import BitDepthSqueeze
    from guard.detectors.squeeze import squeeze_bits

    _, test = small_split
    x = (test.x[:32] > 0.5).float()  # already 1-bit: the squeeze is the identity
    det = BitDepthSqueeze(bits=1).fit(tiny_model)
    torch.testing.assert_close(det.score(tiny_model, x), torch.zeros(32), atol=1e-6, rtol=0)
    noisy = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).sign()).clamp(0, 1)
    torch.testing.assert_close(squeeze_bits(noisy, 1), x)  # |noise| < half a step: removed
    assert float(det.score(tiny_model, noisy).mean()) > 0.0
    with pytest.raises(ValueError, match="'bits' parameter"):
        BitDepthSqueeze(bits=0).fit(tiny_model)


def test_gradcam_map_equals_captums_layer_gradcam(tiny_model, small_split) -> None:
    """The eager Grad-CAM (guard's own, thread-safe) is Captum's LayerGradCam, upsampled and summed."""
    from captum.attr import LayerAttribution, LayerGradCam

    _, test = small_split
    x = test.x[:32]
    target = tiny_model(x).argmax(1)
    det = SaliencyConcentration("gradcam", layer="conv2").fit(tiny_model, x)
    mine = det.attributions(tiny_model, x.clone().requires_grad_(True), target)
    cam = LayerGradCam(tiny_model, tiny_model.conv2).attribute(
        x.clone().requires_grad_(True), target=target, relu_attributions=True
    )
    ref = LayerAttribution.interpolate(cam, (28, 28), interpolate_mode="bilinear").clamp_min(0).detach().sum(1)
    assert float(ref.abs().max()) > 0
    torch.testing.assert_close(mine, ref, atol=1e-6, rtol=1e-5)
