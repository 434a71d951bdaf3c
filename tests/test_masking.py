"""PatchCleanser's masking (detectors/masking.py): mask-set geometry, closed-form certificates,
the double-masking rule against an independent transcription of the paper's Algorithm 1, the
detector in guard.wrap, and certificates that no patch breaks."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import guard
from guard.attacks import MaskingPatch
from guard.core.validation import NotFittedError
from guard.detectors import DETECTORS, Detector
from guard.detectors.masking import (
    MaskingDetector,
    apply_masks,
    certify,
    double_masking,
    mask_score,
    mask_set,
    one_mask_logits,
    one_mask_predictions,
    other_margin,
    two_mask_predictions,
)


class OnePixel(nn.Module):
    """Class 1 when pixel (row, col) of channel 0 is above 0.75, else class 0 (two logits)."""

    def __init__(self, row: int, col: int) -> None:
        super().__init__()
        self.row, self.col = row, col

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, 0, self.row, self.col]
        return torch.stack([0.75 - v, v - 0.75], 1)


class Constant(nn.Module):
    """Ignores its input: always class 2 of 4."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([0.0, 0.0, 1.0, 0.0]).expand(x.shape[0], 4)


# ---------------------------------------------------------------- the mask set


def test_mask_set_has_patchcleanser_geometry():
    m = mask_set(32, 5, 6)  # the CIFAR-10 setting: 36 masks of 9x9
    assert len(m) == 36 and m.mask_size == (9, 9) and m.stride == (5, 5)
    assert m.rows == (0, 5, 10, 15, 20, 23) and m.cols == m.rows
    big = mask_set(224, 32, 6)  # ImageNet at 2% area: stride ceil(193 / 6) = 33, mask 64
    assert big.stride == (33, 33) and big.mask_size == (64, 64) and big.rows == (0, 33, 66, 99, 132, 160)
    assert mask_set(32, 0.024, 6).patch_size == (5, 5)  # an area share: round(sqrt(0.024 * 1024)) = 5
    keep = m.keep()
    assert keep.shape == (36, 1, 32, 32) and keep.dtype == torch.bool
    assert int((~keep).flatten(1).sum(1).min()) == int((~keep).flatten(1).sum(1).max()) == 81


@pytest.mark.parametrize("h,w", [(7, 7), (8, 11), (12, 9)])
def test_masks_cover_every_patch_position_exhaustively(h, w):
    for ph, pw, k in itertools.product(range(1, 5), range(1, 5), range(1, 5)):
        if ph > h or pw > w:
            continue
        m = mask_set((h, w), (ph, pw), k)
        masked = ~m.keep()[:, 0]  # (K, H, W): True inside the mask
        for r in range(h - ph + 1):
            for c in range(w - pw + 1):
                inside = masked[:, r : r + ph, c : c + pw].flatten(1).all(1)
                assert bool(inside.any()), f"{h}x{w}, patch {(ph, pw)} at {(r, c)}, k={k}: no mask contains it"
        assert len(m) <= k * k
        assert m.uncovered((ph, pw)) == []


def test_uncovered_patch_positions_are_found_and_refused():
    with pytest.raises(ValueError, match="do not cover every position"):
        mask_set(32, 5, 6, mask_size=8)  # one pixel short of p + s - 1 = 9
    m = mask_set(16, 3, 4)
    assert m.uncovered(m.mask_size[0] + 1) != []  # a patch larger than the masks fits in none
    with pytest.raises(ValueError, match="do not cover"):
        m.check_covers(m.mask_size[0] + 1)


@pytest.mark.parametrize(
    "call,err,match",
    [
        (lambda: mask_set(8, 9, 2), ValueError, "larger than the 8x8 image"),
        (lambda: mask_set((8, 12), (3, 13), 2), ValueError, "larger than"),
        (lambda: mask_set(8, 3, 0), ValueError, "k"),
        (lambda: mask_set(8, 1.5, 2), ValueError, "area share"),
        (lambda: mask_set(8, "3", 2), TypeError, "patch_size"),
        (lambda: mask_set(8, 0, 2), ValueError, "patch_size must be >= 1"),
        (lambda: mask_set(8, 3, 2, mask_size=9), ValueError, "larger than"),
    ],
)
def test_bad_mask_set_arguments(call, err, match):
    with pytest.raises(err, match=match):
        call()


def test_bad_images_and_labels_are_refused():
    model, m = Constant(), mask_set(8, 3, 2)
    with pytest.raises(ValueError, match="8x8"):
        certify(model, torch.rand(2, 1, 9, 8), torch.tensor([2, 2]), masks=m)
    with pytest.raises(ValueError, match="larger than the 8x8 image"):
        certify(model, torch.rand(2, 1, 8, 8), torch.tensor([2, 2]), 9)
    with pytest.raises(ValueError, match="do not cover"):
        certify(model, torch.rand(2, 1, 8, 8), torch.tensor([2, 2]), m.mask_size[0] + 1, masks=m)
    with pytest.raises(ValueError, match="patch_size"):
        certify(model, torch.rand(2, 1, 8, 8), torch.tensor([2, 2]))
    with pytest.raises(ValueError):
        certify(model, torch.rand(2, 1, 8, 8) + 2, torch.tensor([2, 2]), 3)  # not in [0, 1]
    with pytest.raises(ValueError, match="y"):
        certify(model, torch.rand(2, 1, 8, 8), torch.tensor([2, 2, 2]), 3)
    with pytest.raises(TypeError, match="MaskSet"):
        one_mask_predictions(model, torch.rand(2, 1, 8, 8), "masks")


# ---------------------------------------------------------------- closed forms


def test_one_pixel_model_flags_exactly_the_masks_over_its_pixel():
    m = mask_set(10, 3, 3)
    boxes = m.boxes
    x = torch.ones(1, 1, 10, 10)  # the pixel is 1: class 1; a mask over it (0.5) gives class 0
    for row, col in itertools.product(range(10), range(10)):
        model = OnePixel(row, col)
        over = torch.tensor([r <= row < r + mh and c <= col < c + mw for r, c, mh, mw in boxes])
        one = one_mask_predictions(model, x, m)[0]
        assert torch.equal(one, (~over).long())
        det = MaskingDetector(3, k=3, statistic="disagreement").fit(model, x)
        assert float(det.score(model, x)) == pytest.approx(float(over.float().mean()))
        # other_margin: logits (-0.25, 0.25) unmasked, (0.25, -0.25) with the pixel masked to 0.5
        det = MaskingDetector(3, k=3).fit(model, x)
        assert float(det.score(model, x)) == pytest.approx(0.5 if over.any() else -0.5)
        # recovery: with fewer masks over the pixel than not, the first such mask's pairs all say 0
        # (every pair contains the pixel): Case II gives 0, the masked label, never the majority 1
        want = 0 if over.any() else 1
        assert int(double_masking(model, x, m)[0]) == want


def test_one_pixel_model_is_certified_where_masking_cannot_move_its_pixel():
    m = mask_set(10, 3, 3)
    dark = torch.zeros(1, 1, 10, 10)  # pixel 0 -> class 0; masked 0.5 -> class 0: every prediction 0
    bright = torch.ones(1, 1, 10, 10)  # pixel 1 -> class 1; some mask covers it -> class 0
    for row, col in [(0, 0), (4, 5), (9, 9)]:
        c = certify(OnePixel(row, col), torch.cat([dark, bright]), torch.tensor([0, 1]), masks=m)
        assert c.recovery_certified.tolist() == [True, False] and c.detection_certified.tolist() == [True, False]
        assert c.flagged.tolist() == [False, True]
        # the certificate of the dark image holds: a patch anywhere, bright or dark, never changes the
        # recovered label, and is flagged whenever the bare model is fooled
        for r, cc, v in itertools.product(range(8), range(8), (0.0, 1.0)):
            xp = dark.clone()
            xp[..., r : r + 3, cc : cc + 3] = v
            assert int(double_masking(OnePixel(row, col), xp, m)[0]) == 0
            det = MaskingDetector(3, k=3).fit(OnePixel(row, col), xp)
            fooled = int(OnePixel(row, col)(xp).argmax(1)) != 0
            assert not fooled or float(det.score(OnePixel(row, col), xp)) > 0


def test_constant_model_is_certified_everywhere_and_flags_nothing():
    x = torch.rand(6, 3, 12, 12)
    y = torch.full((6,), 2)
    c = certify(Constant(), x, y, 4, k=3)
    assert bool(c.recovery_certified.all()) and bool(c.detection_certified.all())
    assert not bool(c.flagged.any()) and torch.equal(c.recovered, y)
    s = c.summary()
    assert (
        s["certified_recovery"] == s["certified_detection"] == s["clean_accuracy"] == 1.0 and s["clean_flagged"] == 0.0
    )
    det = MaskingDetector(4, k=3).fit(Constant(), x)
    assert not bool(det.predict(Constant(), x).any())


def test_other_margin_is_the_largest_margin_of_another_class_over_the_label():
    z = torch.tensor(
        [
            [[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]],  # label 0: mask 0 gives 1 - 2 = -1, mask 1 gives 3 - 0 = 3
            [[5.0, 1.0, 4.0], [6.0, 0.0, 2.0]],  # label 0: 4 - 5 = -1 and 2 - 6 = -4
        ]
    )
    label = torch.tensor([0, 0])
    assert other_margin(z, label).tolist() == [3.0, -1.0]
    # the label's column against the others: label 1 gives max(2 - 1, 1 - 3); label 2 gives max(5 - 4, 6 - 2)
    assert other_margin(z, torch.tensor([1, 2])).tolist() == [1.0, 4.0]
    assert mask_score(z, label, "disagreement").tolist() == [0.5, 0.0]
    with pytest.raises(ValueError, match="statistic must be one of"):
        mask_score(z, label, "margin")
    # > 0 exactly where a one-mask label differs (the certified flag), for both statistics
    for stat in ("other_margin", "disagreement"):
        assert (mask_score(z, label, stat) > 0).tolist() == (z.argmax(2) != label[:, None]).any(1).tolist()


def test_masking_scores_rise_with_the_patch_and_match_the_one_mask_labels(tiny_model, small_split):
    _, test = small_split
    x = test.x[:24]
    masks = mask_set(28, 4, 3)
    z = one_mask_logits(tiny_model, x, masks)
    assert z.shape == (24, len(masks), 10) and torch.equal(z.argmax(2), one_mask_predictions(tiny_model, x, masks))
    det = MaskingDetector(4, k=3).fit(tiny_model, x)
    with torch.no_grad():
        label = tiny_model(x).argmax(1)
    score = det.score(tiny_model, x)
    assert torch.equal(score > 0, (z.argmax(2) != label[:, None]).any(1))  # the certified flag
    assert torch.allclose(score, other_margin(z, label))


def test_masking_statistic_is_checked_and_old_files_read_as_disagreement(tiny_model, small_split):
    _, test = small_split
    with pytest.raises(ValueError, match="'statistic' parameter of MaskingDetector"):
        MaskingDetector(4, statistic="margin").fit(tiny_model, test.x[:4])
    old = MaskingDetector(4, k=3)
    old.load_state({}, {"image_size_": [28, 28], "patch_pixels_": [4, 4], "threshold_": 0.2})  # no statistic_
    assert old.statistic == old.statistic_ == "disagreement"
    want = MaskingDetector(4, k=3, statistic="disagreement").fit(tiny_model, test.x[:8]).score(tiny_model, test.x[:8])
    torch.testing.assert_close(old.score(tiny_model, test.x[:8]), want)


def test_recovery_is_the_clean_label_when_one_mask_predictions_agree(tiny_model, small_split):
    _, test = small_split
    x = test.x[:24]
    m = mask_set(28, 3, 4)
    one = one_mask_predictions(tiny_model, x, m)
    agree = (one == one[:, :1]).all(1)
    assert bool(agree.any())
    rec = double_masking(tiny_model, x, m)
    torch.testing.assert_close(rec[agree], one[agree, 0])
    with torch.no_grad():
        clean = tiny_model(x).argmax(1)
    both = agree & (one[:, 0] == clean)
    assert bool(both.any()) and torch.equal(rec[both], clean[both])


def _reference_double_masking(pair_map: torch.Tensor) -> int:
    """The paper's Algorithm 1 from a full two-mask map (K, K), written out independently."""
    one = pair_map.diagonal()
    labels, counts = torch.unique(one, return_counts=True)
    if len(labels) == 1:
        return int(labels[0])
    majority = int(labels[counts == counts.max()].min())
    for i in range(len(one)):
        if int(one[i]) != majority and bool((pair_map[i] == one[i]).all()):
            return int(one[i])
    return majority


def test_double_masking_and_certify_match_the_full_two_mask_map(tiny_model, small_split):
    _, test = small_split
    x, y = test.x[:12], test.y[:12]
    m = mask_set(28, 4, 3)
    pairs = two_mask_predictions(tiny_model, x, m, batch_size=7)  # odd chunks: the chunking must not matter
    assert torch.equal(pairs, pairs.transpose(1, 2))
    assert torch.equal(pairs.diagonal(dim1=1, dim2=2), one_mask_predictions(tiny_model, x, m, batch_size=5))
    rec = double_masking(tiny_model, x, m, batch_size=10)
    assert rec.tolist() == [_reference_double_masking(p) for p in pairs]
    c = certify(tiny_model, x, y, masks=m, batch_size=13)
    assert c.recovery_certified.tolist() == (pairs == y[:, None, None]).flatten(1).all(1).tolist()
    assert c.detection_certified.tolist() == (pairs.diagonal(dim1=1, dim2=2) == y[:, None]).all(1).tolist()
    assert torch.equal(c.recovered, rec)


class ViewNet(nn.Module):
    """A conv net that flattens with ``.view``, which raises on channels-last activations."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 12 * 12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.fc(h.view(h.shape[0], -1))


def test_masked_labels_are_the_default_layouts_and_a_view_model_still_runs(tiny_model, small_split):
    from guard.detectors.masking import _NO_CHANNELS_LAST

    _, test = small_split
    x = test.x[:6]
    m = mask_set(28, 4, 3)
    masked = apply_masks(x, m.keep(), 0.5)
    with torch.no_grad():
        expected = tiny_model(masked.contiguous()).argmax(1).view(6, len(m))
    assert torch.equal(one_mask_predictions(tiny_model, x, m, batch_size=11), expected)
    assert tiny_model not in _NO_CHANNELS_LAST
    net = ViewNet().eval()
    colour = torch.rand(5, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    m3 = mask_set(12, 3, 2)
    masked3 = apply_masks(colour, m3.keep(), 0.5)
    with pytest.raises(RuntimeError):
        net(masked3[:2].contiguous(memory_format=torch.channels_last))  # the layout this model refuses
    with torch.no_grad():
        want = net(masked3).argmax(1).view(5, len(m3))
    assert torch.equal(one_mask_predictions(net, colour, m3, batch_size=16), want)
    assert net in _NO_CHANNELS_LAST
    torch.manual_seed(1)
    flat = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12 * 12, 3)).eval()
    with torch.no_grad():
        want = flat(masked3).argmax(1).view(5, len(m3))
    assert torch.equal(one_mask_predictions(flat, colour, m3, batch_size=16), want)
    assert flat not in _NO_CHANNELS_LAST  # this one ran channels-last


def test_apply_masks_fills_only_inside_the_mask():
    m = mask_set(6, 2, 2)
    x = torch.rand(3, 2, 6, 6)
    out = apply_masks(x, m.keep(), 0.25).view(3, len(m), 2, 6, 6)
    keep = m.keep()[None].expand(3, -1, 2, -1, -1)
    assert torch.equal(out[keep], x[:, None].expand_as(out)[keep])
    assert bool((out[~keep] == 0.25).all())


# ---------------------------------------------------------------- the detector


def test_masking_detector_in_guard_wrap(tiny_model, small_split, tmp_path):
    train, test = small_split
    assert DETECTORS["masking"] is MaskingDetector
    with pytest.raises(NotFittedError):
        MaskingDetector().score(tiny_model, test.x[:4])
    g = guard.wrap(tiny_model, ["masking"]).fit(train.x[:64], train.y[:64])
    det = g.detectors["masking"]
    assert det.threshold_ == 0.0 and det.patch_pixels_ == [6, 6]  # guard's patch attacks' default: 5% of 28x28
    assert det.statistic_ == "other_margin"
    g.calibrate(test.x[:128], fpr=0.1)
    out = g(test.x[128:160])
    assert out.scores["masking"].shape == (32,)
    one = one_mask_predictions(tiny_model, test.x[128:160], det.masks_)
    assert torch.equal(out.scores["masking"] > 0, (one != out.logits.argmax(1)[:, None]).any(1))
    digest = g.save(tmp_path / "g")
    back = guard.GuardedModel.load(tmp_path / "g", tiny_model, expected_sha256=digest)
    torch.testing.assert_close(back(test.x[128:160]).scores["masking"], out.scores["masking"])
    with pytest.raises(ValueError, match="28x28"):
        det.score(tiny_model, torch.rand(2, 1, 20, 20))
    with pytest.raises(ValueError, match="larger than"):
        MaskingDetector(40).fit(tiny_model, test.x[:4])
    assert isinstance(Detector.load(tmp_path / "g" / "masking.safetensors"), MaskingDetector)


@pytest.mark.parametrize("statistic", ["other_margin", "disagreement"])
def test_masking_head_matches_the_eager_score_and_serves_the_majority(tiny_model, small_split, statistic):
    _, test = small_split
    x = test.x[:16]
    det = MaskingDetector(4, k=3, statistic=statistic).fit(tiny_model, x)
    with torch.no_grad():
        logits = tiny_model(x)
    out = det.export_head()(guard.detectors.Batch(x, logits, {}, tiny_model))
    torch.testing.assert_close(out["score"], det.score(tiny_model, x))
    one = one_mask_predictions(tiny_model, x, det.masks_)
    assert out["majority"].tolist() == [int(torch.bincount(r, minlength=10).argmax()) for r in one]


# ---------------------------------------------------------------- certificates that no patch breaks


@pytest.fixture(scope="module")
def mask_trained(demo_split):
    """A narrow DemoNet trained from scratch with PatchCleanser's masks (3x3 patch, 4x4 masks)."""
    from guard.core.models import DemoNet
    from guard.training.mask_training import MaskTrainConfig, mask_train

    train, _ = demo_split
    torch.manual_seed(0)
    model = DemoNet(width=8, hidden=32)
    mask_train(
        model, train.x[:2000], train.y[:2000], MaskTrainConfig(patch_size=3, k=4, epochs=2, lr=0.05, batch_size=64)
    )
    return model.eval()


def _patched(x: torch.Tensor, side: int, content: torch.Tensor) -> torch.Tensor:
    """``x`` (1, C, H, W) with ``content`` (P, C, side, side) pasted at every position: (positions * P, C, H, W)."""
    h, w = x.shape[-2:]
    out = []
    for r in range(h - side + 1):
        for c in range(w - side + 1):
            xp = x.expand(content.shape[0], -1, -1, -1).clone()
            xp[..., r : r + side, c : c + side] = content
            out.append(xp)
    return torch.cat(out)


@pytest.mark.slow
def test_no_patch_breaks_a_certificate(mask_trained, demo_split):
    _, test = demo_split
    model, side = mask_trained, 3
    m = mask_set(28, side, 4)
    x, y = test.x[:40], test.y[:40]
    c = certify(model, x, y, masks=m)
    rec_idx = torch.nonzero(c.recovery_certified).flatten()[:1].tolist()
    det_idx = torch.nonzero(c.detection_certified & ~c.recovery_certified).flatten()[:1].tolist()
    assert rec_idx, "the mask-trained model certifies none of 40 images: the fixture is too weak to test anything"
    gen = torch.Generator().manual_seed(0)
    contents = torch.cat(
        [torch.zeros(1, 1, side, side), torch.ones(1, 1, side, side), torch.rand(1, 1, side, side, generator=gen)]
    )
    det = MaskingDetector(side, k=4).fit(model, x[:1])
    for j in rec_idx + det_idx:
        xp = _patched(x[j : j + 1], side, contents)
        xp = torch.cat([xp, _adversarial(model, x[j : j + 1], y[j], side)])
        flagged = det.predict(model, xp)
        with torch.no_grad():
            bare = model(xp).argmax(1)
        assert bool((flagged | (bare == y[j])).all()), f"image {j}: a patch escaped the certified flag"
        if j in rec_idx:
            rec = double_masking(model, xp, m)
            assert bool((rec == y[j]).all()), f"image {j}: a patch changed the certified recovered label"
    # the attacker who knows the masks (placed where they are weakest, trained through them)
    cert = rec_idx + det_idx
    adaptive = MaskingPatch(keep=m.keep(), size=side, positions=3, steps=15, restarts=2, seed=0)(
        model, x[cert], y[cert]
    )
    assert not bool(adaptive.extras["evades_flag"].any()), "the adaptive patch escaped a certified flag"
    rec = double_masking(model, adaptive.x_adv, m)
    assert torch.equal(rec, adaptive.extras["recovered"])
    for i, j in enumerate(cert):
        if j in rec_idx:
            assert int(rec[i]) == int(y[j]), f"image {j}: the adaptive patch changed the certified recovered label"


def _adversarial(model: nn.Module, x: torch.Tensor, y: torch.Tensor, side: int) -> torch.Tensor:
    """At every position, a patch trained by 10 signed-gradient steps to fool the bare model
    (guard's patch attacks train one patch for all images; here one per position, which is stronger)."""
    h, w = x.shape[-2:]
    pos = [(r, c) for r in range(h - side + 1) for c in range(w - side + 1)]
    keep = torch.ones(len(pos), 1, h, w)
    for i, (r, c) in enumerate(pos):
        keep[i, :, r : r + side, c : c + side] = 0
    patch = torch.rand(len(pos), 1, h, w, generator=torch.Generator().manual_seed(1))
    for _ in range(10):
        patch.requires_grad_(True)
        xp = x * keep + patch * (1 - keep)
        loss = nn.functional.cross_entropy(model(xp), y.expand(len(pos)))
        (g,) = torch.autograd.grad(loss, patch)
        patch = (patch.detach() + 0.25 * g.sign()).clamp(0, 1)
    return (x * keep + patch * (1 - keep)).detach()


# ---------------------------------------------------------------- mask training


def test_mask_training_resumes_bit_identically(demo_split, tmp_path):
    from guard.core.models import DemoNet
    from guard.training.mask_training import MaskTrainConfig, mask_train

    train, _ = demo_split
    x, y = train.x[:256], train.y[:256]
    cfg = MaskTrainConfig(patch_size=3, k=4, epochs=3, lr=0.05, batch_size=64, seed=3)

    def fresh() -> nn.Module:
        torch.manual_seed(0)
        return DemoNet(width=4, hidden=16)

    whole = fresh()
    h_whole = mask_train(whole, x, y, cfg)
    parts = fresh()
    mask_train(parts, x, y, cfg, checkpoint_dir=tmp_path, stop_after=1)
    again = fresh()  # a new process: only the checkpoint carries the state
    h_parts = mask_train(again, x, y, cfg, checkpoint_dir=tmp_path)
    assert [e["train_loss"] for e in h_parts] == [e["train_loss"] for e in h_whole]
    for (k, a), b in zip(whole.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="other settings"):
        mask_train(
            fresh(),
            x,
            y,
            MaskTrainConfig(patch_size=3, k=4, epochs=3, lr=0.01, batch_size=64, seed=3),
            checkpoint_dir=tmp_path,
        )


def test_mask_training_raises_masked_accuracy(tiny_model, demo_split):
    import copy

    from guard.training.mask_training import MaskTrainConfig, mask_train, masked_accuracy

    train, test = demo_split
    m = mask_set(28, 6, 3)
    before = masked_accuracy(tiny_model, test.x[:200], test.y[:200], m)
    tuned = copy.deepcopy(tiny_model)
    mask_train(
        tuned, train.x[:1000], train.y[:1000], MaskTrainConfig(patch_size=6, k=3, epochs=2, lr=0.02, batch_size=64)
    )
    after = masked_accuracy(tuned, test.x[:200], test.y[:200], m)
    assert after > before + 0.02, (before, after)


@pytest.mark.slow
def test_one_mask_round_exports_to_onnx_with_parity(tiny_model, small_split, tmp_path):
    from guard.export import load_session, to_onnx

    train, test = small_split
    g = guard.wrap(tiny_model, [MaskingDetector(4, k=3)]).fit(train.x[:64], train.y[:64])
    g.calibrate(test.x[:64], fpr=0.1)
    rep = to_onnx(g, tmp_path / "m.onnx", test.x[:8], parity_inputs=test.x[64:128])
    assert rep.parity is not None and rep.parity["passed"], rep.parity
    assert {"masking_score", "masking_majority", "flag"} <= set(rep.output_names)
    out = load_session(tmp_path / "m.onnx", device="cpu").run(test.x[64:96])
    want = g(test.x[64:96])
    np_score = torch.as_tensor(out["masking_score"])
    torch.testing.assert_close(np_score, want.scores["masking"].float().cpu())
    assert torch.equal(torch.as_tensor(out["flag"]).bool(), want.flagged.cpu())
    one = one_mask_predictions(tiny_model, test.x[64:96], mask_set(28, 4, 3))
    assert torch.as_tensor(out["masking_majority"]).tolist() == [
        int(torch.bincount(r, minlength=10).argmax()) for r in one
    ]


def test_audit_step_fills_the_certified_section(tiny_model, small_split, tmp_path):
    from guard.audit.certified import CertifiedStep
    from guard.audit.detectors import split_heldout
    from guard.audit.step import AuditContext, AuditOptions
    from guard.audit.steps import step

    train, test = small_split
    assert isinstance(step("certified"), CertifiedStep)
    ctx = AuditContext(
        tiny_model, "tiny", train, test, "test data", tmp_path, AuditOptions(quick=True, extra={"certified_n": 12})
    )
    CertifiedStep().run(ctx)
    rep = ctx.report["certified"]
    for key in ("patch_area", "n", "clean_accuracy", "certified_recovery", "certified_detection", "clean_flagged"):
        assert isinstance(rep[key], (int, float)), key
    _, ev = split_heldout(len(test), 0)
    want = certify(tiny_model, test.x[ev[:12]], test.y[ev[:12]], 0.024, k=3).summary()
    assert (
        rep["n"] == 12 and rep["patch_area_requested"] == 0.024 and rep["patch_area"] == round(16 / 784, 4)
    )  # a 4x4 patch
    assert {k: rep[k] for k in want if k in rep} == {k: want[k] for k in want if k in rep}
    assert rep["certified_recovery"] <= rep["certified_detection"]  # two-mask correctness implies one-mask correctness
    off = AuditContext(tiny_model, "tiny", train, test, "test data", tmp_path, AuditOptions(extra={"certified": False}))
    assert CertifiedStep().skip_reason(off)


def test_demo_variant_arguments(tmp_path):
    from guard.demo import cifar10_model

    with pytest.raises(ValueError, match="variant"):
        guard.demo_model("cifar10", variant="nope")
    with pytest.raises(ValueError, match="for 'mnist'"):
        guard.demo_model("mnist", variant="masked")
    with pytest.raises(ValueError, match="resnet20_masked.safetensors"):
        cifar10_model(tmp_path, variant="masked")


@pytest.mark.slow
def test_shipped_masked_variant_keeps_masked_labels_better_than_the_standard_model():
    from guard.training.mask_training import masked_accuracy

    model = guard.demo_model("cifar10", variant="masked")
    record = json.loads(Path(model.guard_meta["cache_path"]).with_suffix(".json").read_text())
    assert model.guard_meta["sha256"] == record["sha256"]
    _, test = guard.demo_data("cifar10")
    x, y = test.x[:100], test.y[:100]
    m = mask_set(32, 5, 6)
    masked, standard = masked_accuracy(model, x, y, m), masked_accuracy(guard.demo_model("cifar10"), x, y, m)
    assert masked > standard + 0.02, (masked, standard)
