"""The adaptive patch attacker against PatchCleanser's masking (guard.attacks.MaskingPatch): its view
of the defence matches the defence, it steps the right way, and bad arguments are refused.
(Its run on certified images, which must never break a certificate, is in tests/test_masking.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from guard.attacks import MaskingPatch
from guard.attacks.masking_patch import _masked, covering_masks, defended_outcome
from guard.attacks.patching import apply_patches
from guard.detectors import MaskingDetector
from guard.detectors.masking import double_masking, mask_set, one_mask_predictions


def test_covering_masks_match_the_mask_set_geometry():
    m = mask_set(28, 3, 4)
    pos, covers = covering_masks(m.keep(), 3)
    assert pos.shape == (26 * 26, 2) and covers.shape == (26 * 26, len(m))
    for p in range(0, pos.shape[0], 7):
        r, c = pos[p].tolist()
        want = [mr <= r and r + 3 <= mr + mh and mc <= c and c + 3 <= mc + mw for mr, mc, mh, mw in m.boxes]
        assert covers[p].tolist() == want
    assert bool(covers.any(1).all())  # the mask set covers every position of its patch


def test_defended_outcome_is_the_defence(tiny_model, small_split):
    _, test = small_split
    m = mask_set(28, 3, 4)
    x = test.x[:10].clone()
    x[:, :, 10:16, 10:16] = 1.0  # a blob that moves some masked labels
    o = defended_outcome(tiny_model, x, m.keep(), 0.5)
    one = one_mask_predictions(tiny_model, x, m)
    assert torch.equal(o["one_mask"], one)
    assert torch.equal(o["recovered"], double_masking(tiny_model, x, m))
    with torch.no_grad():
        bare = tiny_model(x).argmax(1)
    assert torch.equal(o["flagged"], (one != bare[:, None]).any(1))


@pytest.mark.parametrize("statistic", ["other_margin", "disagreement"])
def test_defended_outcome_scores_are_the_detectors(tiny_model, small_split, statistic):
    _, test = small_split
    x = test.x[:10].clone()
    x[:, :, 10:16, 10:16] = 1.0
    det = MaskingDetector(3, k=4, statistic=statistic).fit(tiny_model, x)
    o = defended_outcome(tiny_model, x, det.masks_.keep(), 0.5)
    torch.testing.assert_close(o[statistic], det.score(tiny_model, x))


def test_the_attack_aims_at_a_calibrated_detector_and_reports_what_it_sees(tiny_model, small_split):
    """At a calibrated threshold the attack's own verdict is the detector's: an image it says evades
    is fooled and not flagged, one it says is caught is flagged or not fooled."""
    train, test = small_split
    det = MaskingDetector(8, k=3).fit(tiny_model, train.x[:8])
    det.calibrate(test.x[:128], fpr=0.2, model=tiny_model)
    assert det.threshold_ > 0
    x, y = test.x[128:140], test.y[128:140]
    kwargs = dict(keep=det.masks_.keep(), size=8, steps=20, positions=2, seed=0)
    at = MaskingPatch(**kwargs, threshold=det.threshold_)(tiny_model, x, y)
    torch.testing.assert_close(at.extras["score"], det.score(tiny_model, at.x_adv))
    flagged = det.predict(tiny_model, at.x_adv)
    assert torch.equal(at.extras["evades_flag"], at.success & ~flagged)
    certified = MaskingPatch(**kwargs)(tiny_model, x, y)  # threshold 0: the certified flag
    assert torch.equal(certified.extras["evades_flag"], certified.success & (certified.extras["score"] <= 0))
    # the calibrated threshold (above 0) is easier to evade than the certified one: 9 of 12 against 1 of 12
    assert int(at.extras["evades_flag"].sum()) > int(certified.extras["evades_flag"].sum())


def _loss(model, x, patch, pos, keep, t):
    xp = apply_patches(x, patch, pos)
    batch = torch.cat([xp, _masked(xp, keep, 0.5)])
    with torch.no_grad():
        return float(F.cross_entropy(model(batch), torch.full((batch.shape[0],), t), reduction="sum"))


def test_training_lowers_the_targeted_loss_through_the_uncovered_masks(tiny_model, small_split):
    _, test = small_split
    m = mask_set(28, 6, 3)
    keep = m.keep()
    pos_all, covers = covering_masks(keep, 6)
    p = pos_all.shape[0] // 2  # the middle of the image
    pos, uncovered = pos_all[p : p + 1], ~covers[p]
    x, t = test.x[:1], (int(test.y[0]) + 1) % 10
    attack = MaskingPatch(keep=keep, size=6, steps=0, mask_samples=0)
    start = attack._train(tiny_model, x, pos, uncovered, t, torch.Generator().manual_seed(3))
    attack.steps = 25
    trained = attack._train(tiny_model, x, pos, uncovered, t, torch.Generator().manual_seed(3))
    before = _loss(tiny_model, x, start, pos, keep[uncovered], t)
    after = _loss(tiny_model, x, trained, pos, keep[uncovered], t)
    assert after < 0.8 * before, (before, after)  # a step up the loss (the wrong sign) raises it instead


def test_result_reports_the_defence_outcome_of_what_it_returns(tiny_model, small_split):
    _, test = small_split
    m = mask_set(28, 3, 4)
    x, y = test.x[:4], test.y[:4]
    r = MaskingPatch(keep=m.keep(), size=3, steps=3, positions=1, seed=1)(tiny_model, x, y)
    assert r.x_adv.shape == x.shape and int((r.x_adv != x).flatten(1).sum(1).max()) <= 9
    o = defended_outcome(tiny_model, r.x_adv, m.keep(), 0.5)
    assert torch.equal(r.extras["recovered"], o["recovered"])
    assert torch.equal(r.extras["evades_flag"], (o["bare"] != y) & ~o["flagged"])
    assert torch.equal(r.success, o["bare"] != y)


def test_bad_arguments_are_refused():
    keep = mask_set(28, 3, 4).keep()
    with pytest.raises(TypeError, match="keep"):
        MaskingPatch(keep=keep.float(), size=3)
    with pytest.raises(ValueError, match="size"):
        MaskingPatch(keep=keep, size=0)
    with pytest.raises(ValueError, match="positions"):
        MaskingPatch(keep=keep, size=3, positions=0)
    with pytest.raises(ValueError, match="'statistic' parameter"):
        MaskingPatch(keep=keep, size=3, statistic="margin")
    with pytest.raises(ValueError, match="'threshold' parameter"):
        MaskingPatch(keep=keep, size=3, threshold=float("nan"))
    with pytest.raises(ValueError, match="masks' size"):
        MaskingPatch(keep=keep, size=3)(torch.nn.Flatten(), torch.rand(2, 1, 20, 20), torch.tensor([0, 1]))
