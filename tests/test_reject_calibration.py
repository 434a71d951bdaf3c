"""RejectClassifier.calibrate_rejection: the reject class's operating point, set on clean images."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from guard.training import RejectClassifier
from guard.training.reject import REJECT, grow_head


def _reject_model(reject_bias: float) -> RejectClassifier:
    """A 3-class linear model on 2 x 4 x 4 images with a reject output whose bias is ``reject_bias``."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Flatten(), nn.Linear(32, 3))
    net, head = grow_head(base, num_classes=3)
    with torch.no_grad():
        net[1].weight[3].normal_(0, 1.0)  # the reject logit varies from image to image
        net[1].bias[3] = reject_bias
    return RejectClassifier(net, 3, head).eval()


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 2, 4, 4, generator=torch.Generator().manual_seed(seed))


def _rejected(model: RejectClassifier, x: torch.Tensor) -> float:
    return float((model.predict(x) == REJECT).float().mean())


@pytest.mark.parametrize("bias", [-20.0, 0.0, 20.0])
def test_calibration_rejects_the_chosen_share_whatever_the_model_did_before(bias):
    """Rejecting none, some or all of the images before, exactly floor(rate * N) after (a flipped
    offset would reject the other 95%)."""
    model = _reject_model(bias)
    x = _images(200, 1)
    model.calibrate_rejection(x, rate=0.05)
    assert _rejected(model, x) == pytest.approx(10 / 200)
    # the offset is in forward: the logits every attack and the export read
    margin = model(x)[:, 3] - model(x)[:, :3].max(1).values
    assert int((margin > 0).sum()) == 10
    # calibrating again on the same images gives the same offset (the old offset is not read)
    before = model.reject_offset
    assert model.calibrate_rejection(x, rate=0.05).reject_offset == before
    model.calibrate_rejection(x, rate=0.0)
    assert _rejected(model, x) == 0.0


def test_calibrated_share_holds_on_fresh_images_of_the_same_kind():
    model = _reject_model(0.0).calibrate_rejection(_images(2000, 2), rate=0.1)
    assert abs(_rejected(model, _images(2000, 3)) - 0.1) < 0.03


def test_no_offset_leaves_forward_bit_identical():
    model = _reject_model(0.0)
    x = _images(16, 4)
    assert model.reject_offset == 0.0
    assert torch.equal(model(x), model.model(x))
    model.reject_offset = 1.5
    out = model(x)
    assert torch.equal(out[:, :3], model.model(x)[:, :3])
    assert torch.allclose(out[:, 3], model.model(x)[:, 3] + 1.5)


def test_offset_survives_save_and_load(tmp_path):
    model = _reject_model(0.0).calibrate_rejection(_images(100, 5), rate=0.2)
    base = nn.Sequential(nn.Flatten(), nn.Linear(32, 3))
    sha = model.save(tmp_path / "m.safetensors")
    back = RejectClassifier.load(tmp_path / "m.safetensors", base, expected_sha256=sha)
    assert back.reject_offset == model.reject_offset != 0.0
    x = _images(50, 6)
    assert torch.equal(back.predict(x), model.predict(x))
    model.reject_offset = 0.0  # an uncalibrated file has no offset and loads with 0
    model.save(tmp_path / "plain.safetensors")
    assert RejectClassifier.load(tmp_path / "plain.safetensors", base).reject_offset == 0.0


def test_bad_input_is_refused():
    model = _reject_model(0.0)
    x = _images(10, 7)
    for rate in (1.0, -0.1, float("nan"), "5%"):
        with pytest.raises(ValueError, match="'rate'"):
            model.calibrate_rejection(x, rate=rate)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="x must hold at least one image"):
        model.calibrate_rejection(x[:0])
    with pytest.raises(ValueError, match="x"):
        model.calibrate_rejection(x * float("nan"))
    with pytest.raises(ValueError, match="x"):
        model.calibrate_rejection(x + 2.0)
    with pytest.raises(ValueError, match="'reject_offset'"):
        model.reject_offset = float("inf")
