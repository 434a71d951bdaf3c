"""SalientOcclusion: a closed-form model whose label a bright square decides; agreement of its three scoring paths."""

from __future__ import annotations

import pytest
import torch
from conftest import ModelSnapshot
from torch import nn

import guard
from guard.core.validation import NotFittedError
from guard.detectors import DETECTORS, Batch, Detector, SalientOcclusion
from guard.detectors.occlusion import cover_window, salient_window

SIDE = 16


class _BrightSquare(nn.Module):
    """Class 1 when some 3x3 square is bright, else class 0 (closed form).

    ``e = max over positions of relu(sum of the 3x3 square - 8)``: 0 unless a square averages
    above 8/9, 1 for a square of ones on a background <= 0.5. Logits: ``[0.5 + 0.1 mean(x), 4 e]``.
    The predicted class's gradient is then 4 on exactly the bright square's pixels (the max
    picks one position, the conv spreads it over its 3x3 field) and 0.1 / (H W) everywhere on a
    clean image.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.conv.bias.fill_(-8.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = torch.relu(self.conv(x)).amax(dim=(1, 2, 3))
        return torch.stack([0.5 + 0.1 * x.mean(dim=(1, 2, 3)), 4.0 * e], 1)


def _clean(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(seed)) * 0.5


def _patched(corners: list[tuple[int, int]]) -> torch.Tensor:
    x = _clean(len(corners), seed=1)
    for i, (r, c) in enumerate(corners):
        x[i, :, r : r + 3, c : c + 3] = 1.0
    return x


CORNERS = [(0, 0), (5, 9), (13, 13), (7, 2)]


@pytest.fixture
def model() -> _BrightSquare:
    return _BrightSquare().eval()


def test_the_planted_model_is_what_its_docstring_says(model):
    with torch.no_grad():
        assert model(_clean(8)).argmax(1).eq(0).all()
        assert model(_patched(CORNERS)).argmax(1).eq(1).all()


def test_the_located_window_is_the_patch_and_covering_it_flips_the_label(model):
    x = _patched(CORNERS)
    det = SalientOcclusion(window=3).fit(model, _clean(4))
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xg)[:, 1].sum(), xg)
    assert salient_window(g.abs().sum(1), 3).tolist() == [list(c) for c in CORNERS]
    # a larger window holds the patch too (the first of the windows that hold all of it)
    for (r0, c0), (r, c) in zip(salient_window(g.abs().sum(1), 5).tolist(), CORNERS):
        assert r0 <= r and c0 <= c and r + 3 <= r0 + 5 and c + 3 <= c0 + 5
    patched, clean = det.score(model, x), det.score(model, _clean(16))
    # covered, the patch is grey: e = 0, so the score is logit_0 - 0 on the covered image, in (0.5, 0.6]
    covered = cover_window(x, torch.tensor(CORNERS), 3, 0.5)
    torch.testing.assert_close(patched, 0.5 + 0.1 * covered.mean(dim=(1, 2, 3)))
    assert bool((patched > 0).all()) and bool((clean < 0).all())
    # clean: no square bright after covering (fill 0.5), so the score is 0 - logit_0 on the covered image
    assert bool((clean <= -0.5).all()) and bool((clean >= -0.56).all())


def test_patched_images_score_above_clean_ones_so_a_flipped_score_fails(model):
    det = SalientOcclusion(window=3).fit(model, _clean(4))
    patched, clean = det.score(model, _patched(CORNERS)), det.score(model, _clean(16))
    assert float(patched.min()) > float(clean.max())  # higher = more suspicious
    assert not float((-patched).min()) > float((-clean).max())  # the same check fails on the negated score


def test_cover_window_sets_exactly_the_square():
    x = torch.rand(3, 2, 9, 11, generator=torch.Generator().manual_seed(2))
    corners = torch.tensor([[0, 0], [4, 7], [6, 8]])
    out = cover_window(x, corners, 3, 0.25)
    for i, (r, c) in enumerate(corners.tolist()):
        want = x[i].clone()
        want[:, r : r + 3, c : c + 3] = 0.25
        assert torch.equal(out[i], want)


def test_ties_go_to_the_first_position():
    a = torch.zeros(2, 6, 6)
    a[1, 1:3, 2:4] = 1.0
    a[1, 4:6, 4:6] = 1.0  # the same mass in a later window
    assert salient_window(a, 2).tolist() == [[0, 0], [1, 2]]


def test_score_score_batch_and_the_head_agree(tiny_model, small_split):
    train, test = small_split
    x = test.x[:96]
    g = guard.wrap(tiny_model, ["knn", "occlusion"]).fit(train.x[:128])
    det = g.detectors["occlusion"]
    assert det.window_ == 4  # "auto": 2.5% of a 28 x 28 image
    ref = det.score(tiny_model, x)
    fused = g._forward(x, input_grad=True)
    assert fused.input_grad is not None
    torch.testing.assert_close(det.score_batch(fused), ref, atol=1e-5, rtol=1e-4)
    plain = g._forward(x)  # no gradient in the batch: the detector takes its own
    torch.testing.assert_close(det.score_batch(plain), ref, atol=1e-5, rtol=1e-4)
    head = det.export_head().eval()
    torch.testing.assert_close(head(Batch(x, plain.logits, {}, tiny_model)).detach(), ref, atol=1e-5, rtol=1e-4)
    _, scores, errors = g.score(x)
    assert not errors
    torch.testing.assert_close(scores["occlusion"], ref, atol=1e-5, rtol=1e-4)


def test_score_works_under_no_grad_and_inference_mode_and_leaves_the_model_alone(tiny_model, small_split):
    _, test = small_split
    x = test.x[:32]
    det = SalientOcclusion().fit(tiny_model, x)
    snap = ModelSnapshot(tiny_model)
    ref = det.score(tiny_model, x)
    with torch.no_grad():
        torch.testing.assert_close(det.score(tiny_model, x), ref)
    with torch.inference_mode():
        torch.testing.assert_close(det.score(tiny_model, x), ref)
    torch.testing.assert_close(SalientOcclusion(batch_size=5).fit(tiny_model, x).score(tiny_model, x), ref)
    snap.assert_unchanged(tiny_model)
    assert ref.shape == (32,) and ref.dtype == torch.float32


def test_registered_but_not_a_default():
    assert DETECTORS["occlusion"] is SalientOcclusion
    assert "occlusion" not in guard.DEFAULT_DETECTORS


def test_unfitted_and_bad_input_are_refused(model):
    x = _clean(4)
    with pytest.raises(NotFittedError, match="not fitted"):
        SalientOcclusion().score(model, x)
    with pytest.raises(NotFittedError, match="not fitted"):
        SalientOcclusion().export_head()
    det = SalientOcclusion(window=3).fit(model, x)
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x must be finite"):
        det.score(model, nan)
    with pytest.raises(ValueError, match=r"x must be a 4-D tensor"):
        det.score(model, x[0])
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\]"):
        det.score(model, x + 1.0)
    with pytest.raises(ValueError, match="x must hold at least one image"):
        det.score(model, x[:0])
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        det.score(model, x.numpy())
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        det.score(lambda t: t, x)
    with pytest.raises(ValueError, match="the model cannot take x"):
        det.score(model, torch.rand(2, 3, SIDE, SIDE))
    with pytest.raises(ValueError, match="reads the image size at fit"):
        SalientOcclusion().fit(model)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"window": 0}, "The 'window' parameter of SalientOcclusion must be an int >= 1. Got 0."),
        ({"window": "big"}, "The 'window' parameter of SalientOcclusion must be an int >= 1 or 'auto'. Got 'big'."),
        ({"window": 2.5}, "The 'window' parameter of SalientOcclusion must be an int >= 1"),
        ({"window_area": 0.0}, "The 'window_area' parameter of SalientOcclusion"),
        ({"window_area": 1.5}, "The 'window_area' parameter of SalientOcclusion"),
        ({"fill": -0.1}, "The 'fill' parameter of SalientOcclusion"),
        ({"fill": float("nan")}, "The 'fill' parameter of SalientOcclusion"),
        ({"batch_size": 0}, "The 'batch_size' parameter of SalientOcclusion must be an int >= 1. Got 0."),
    ],
)
def test_bad_parameters_are_refused_at_fit_not_at_init(model, kw, match):
    det = SalientOcclusion(**kw)  # __init__ only stores
    with pytest.raises((ValueError, TypeError), match=match.replace(".", r"\.").replace("(", r"\(")):
        det.fit(model, _clean(2))


def test_save_load_round_trip(model, tmp_path):
    x = _patched(CORNERS)
    det = SalientOcclusion(window=3, fill=0.25, batch_size=7).fit(model, _clean(4))
    det.calibrate(_clean(20, seed=3), 0.1, model=model)
    det.save(tmp_path / "o.safetensors")
    back = Detector.load(tmp_path / "o.safetensors")
    assert type(back) is SalientOcclusion and back.get_params() == det.get_params()
    assert back.window_ == 3 and back.threshold_ == det.threshold_
    assert torch.equal(back.score(model, x), det.score(model, x))
    assert bool(back.predict(model, x).all())
