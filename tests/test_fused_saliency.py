"""Serving with a gradient saliency detector: one forward pass for every detector, the same maps as Captum."""

from __future__ import annotations

import pytest
import torch

import guard
from guard.detectors import SaliencyConcentration


class _Counting(torch.nn.Module):
    """The tiny model, counting its forward passes."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0
        inner.register_forward_hook(lambda *a: setattr(self, "calls", self.calls + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@pytest.mark.parametrize("method", ["saliency", "input_x_gradient"])
def test_the_fused_map_is_captums(tiny_model, small_split, method) -> None:
    train, test = small_split
    det = SaliencyConcentration(method=method).fit(tiny_model, train.x[:4])
    g = guard.GuardedModel(tiny_model, {"saliency": det, "knn": guard.detectors.KNNRank("fc1")})
    g.fit(train)
    x = test.x[:40]
    _, scores, errors = g.score(x)
    assert not errors and det.needs_input_grad
    pred = tiny_model(x).argmax(1)
    torch.testing.assert_close(scores["saliency"], det.score(tiny_model, x, target=pred), atol=1e-6, rtol=1e-5)


def test_one_forward_pass_per_batch_and_no_weight_gradients(tiny_model, small_split) -> None:
    train, test = small_split
    model = _Counting(tiny_model)
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    g = guard.GuardedModel(
        model,
        {"saliency": SaliencyConcentration().fit(model, train.x[:4]), "knn": guard.detectors.KNNRank("inner.fc1")},
        batch_size=32,
    )
    g.fit(train)
    model.calls = 0
    g.score(test.x[:64])
    assert model.calls == 2  # two batches of 32, one pass each (Captum's path: two or more per batch)
    assert all(p.grad is None for p in model.parameters())
    with torch.inference_mode():  # serving code often runs under inference_mode: the gradient is still taken
        _, scores, errors = g.score(test.x[:8])
    assert not errors and torch.isfinite(scores["saliency"]).all()


def test_integrated_gradients_still_go_through_captum(tiny_model, small_split) -> None:
    train, test = small_split
    det = SaliencyConcentration(method="integrated_gradients", n_steps=4).fit(tiny_model, train.x[:4])
    assert not det.needs_input_grad
    g = guard.GuardedModel(tiny_model, {"saliency": det})
    _, scores, errors = g.score(test.x[:16])
    assert not errors
    pred = tiny_model(test.x[:16]).argmax(1)
    torch.testing.assert_close(scores["saliency"], det.score(tiny_model, test.x[:16], target=pred))


def test_chunked_gradient_pass_gives_the_same_batch(tiny_model, small_split, monkeypatch) -> None:
    import guard.core.budget as budget
    import guard.guarded as gm

    train, test = small_split
    g = guard.GuardedModel(
        tiny_model,
        {"saliency": SaliencyConcentration().fit(tiny_model, train.x[:4]), "knn": guard.detectors.KNNRank("fc1")},
    )
    g.fit(train)
    whole = g._forward(test.x[:23], input_grad=True)
    monkeypatch.setattr(budget, "GRAD_CHUNK_VALUES", 5 * 28 * 28)  # chunks of 5 images
    assert gm.grad_chunk(test.x[:23]) == 5
    parts = g._forward(test.x[:23], input_grad=True)
    torch.testing.assert_close(parts.logits, whole.logits)
    torch.testing.assert_close(parts.input_grad, whole.input_grad)
    torch.testing.assert_close(parts.features["fc1"], whole.features["fc1"])
