"""APGD (Croce & Hein 2020): the schedule, the bounds, agreement with torchattacks, the losses, the reject margin."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ModelSnapshot
from torch import nn

import guard.attacks.apgd as apgd_module
from guard.attacks import APGD
from guard.attacks.apgd import APGD_LOSSES, apgd_checkpoints, apgd_loss

EPS = 0.1


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def batch(demo_split):
    _, test = demo_split
    return test.x[:96], test.y[:96]


class LeverToy(nn.Module):
    """Closed-form 3-class + reject model on images whose pixels are all 0.5 when clean.

    The mean ``m`` of the image is the lever: raising it raises the reject logit fast
    (z_reject = 40 (m - 0.5)); lowering it raises the wrong class 1 slowly
    (z_1 = 0.9 + 3 (0.5 - m)); the true class 0 and class 2 are constant. Within eps = 0.1 both
    a rejection (m > 0.525) and a wrong real class (m < 0.467) are reachable; cross-entropy's
    gradient points up (to reject) everywhere above m = 0.46.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1)
        one = torch.ones_like(m)
        return torch.stack([1.0 * one, 0.9 + 3 * (0.5 - m), -5.0 * one, 40 * (m - 0.5)], 1)


class RejectOnlyToy(nn.Module):
    """3 classes + reject: the real logits never change, the reject logit rises with the mean."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1)
        one = torch.ones_like(m)
        return torch.stack([one, 0.0 * one, -1.0 * one, 40 * (m - 0.5)], 1)


def test_checkpoints_are_the_papers():
    # Croce & Hein 2020, section 3.2: p = 0, 0.22, 0.41, 0.58, 0.70, 0.80, 0.87, 0.93, 0.99
    assert apgd_checkpoints(100) == [22, 41, 58, 70, 80, 87, 93, 99]
    assert all(0 < w < 10 for w in apgd_checkpoints(10))


@pytest.mark.parametrize("loss", ["ce", "dlr", "dlr-targeted"])
def test_bounds_dtype_device_and_success(loss, tiny_model, batch):
    x, y = batch
    snap = ModelSnapshot(tiny_model)
    res = APGD(eps=EPS, steps=10, loss=loss, n_target_classes=3)(tiny_model, x, y)
    assert res.x_adv.shape == x.shape and res.x_adv.dtype == torch.float32 and res.x_adv.device == x.device
    assert float((res.x_adv - x).abs().amax()) <= EPS + 1e-6
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    with torch.no_grad():
        pred = tiny_model(res.x_adv).argmax(1)
    assert torch.equal(res.success, pred != y)
    assert torch.equal(res.extras["pred"], pred)
    snap.assert_unchanged(tiny_model)


def _ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def _attack_works(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> bool:
    """APGD-CE must raise the loss of every correctly classified image and lower the accuracy by a margin."""
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    res = APGD(eps=EPS, steps=20, loss="ce", early_stop=False)(model, x[ok], y[ok])
    clean_acc = 1.0
    adv_acc = float((~res.success).float().mean())
    raised = bool((_ce(model, res.x_adv, y[ok]) > _ce(model, x[ok], y[ok])).all())
    return raised and adv_acc < clean_acc - 0.2


def test_apgd_raises_the_loss_and_lowers_accuracy(tiny_model, batch):
    assert _attack_works(tiny_model, *batch)


def test_a_sign_flipped_apgd_is_caught(tiny_model, batch, monkeypatch):
    # the property above is not vacuous: APGD descending its loss fails it
    real = apgd_module.apgd_loss
    monkeypatch.setattr(apgd_module, "apgd_loss", lambda *a, **k: -real(*a, **k))
    assert not _attack_works(tiny_model, *batch)


def test_best_iterate_is_kept(tiny_model, batch):
    # early_stop off: the returned image of an unbroken image is the best-loss iterate, so its CE is
    # the largest in its loss curve (which includes the random start)
    x, y = batch
    res = APGD(eps=0.03, steps=15, loss="ce", early_stop=False, curves=len(x))(tiny_model, x, y)
    curves = res.extras["loss_curves"]
    with torch.no_grad():
        clean_ok = tiny_model(x).argmax(1) == y
    keep = clean_ok & ~res.success
    assert keep.any()
    best = torch.nan_to_num(curves, nan=-1e9).amax(1)
    torch.testing.assert_close(_ce(tiny_model, res.x_adv, y)[keep], best[keep], atol=1e-4, rtol=1e-4)


def test_agrees_with_torchattacks(tiny_model, demo_split):
    torchattacks = pytest.importorskip("torchattacks")
    _, test = demo_split
    x, y = test.x[:200], test.y[:200]
    ours = APGD(eps=EPS, steps=30, loss="ce", seed=0)(tiny_model, x, y)
    theirs = torchattacks.APGD(tiny_model, norm="Linf", eps=EPS, steps=30, n_restarts=1, seed=0, loss="ce")(x, y)
    with torch.no_grad():
        acc_ours = float((tiny_model(ours.x_adv).argmax(1) == y).float().mean())
        acc_theirs = float((tiny_model(theirs).argmax(1) == y).float().mean())
        clean = float((tiny_model(x).argmax(1) == y).float().mean())
    assert acc_ours < clean - 0.2  # both do something
    assert abs(acc_ours - acc_theirs) <= 0.04, (acc_ours, acc_theirs)


def test_seeded_and_restarts_never_hurt(tiny_model, batch):
    x, y = batch
    a = APGD(eps=0.05, steps=10, seed=3)(tiny_model, x, y)
    b = APGD(eps=0.05, steps=10, seed=3)(tiny_model, x, y)
    c = APGD(eps=0.05, steps=10, seed=4)(tiny_model, x, y)
    assert torch.equal(a.x_adv, b.x_adv)
    assert not torch.equal(a.x_adv, c.x_adv)
    more = APGD(eps=0.05, steps=10, seed=3, restarts=3)(tiny_model, x, y)
    # restart 0 of both runs is the same run; the later restarts only add broken images
    assert bool((more.success | ~a.success).all()) and int(more.success.sum()) >= int(a.success.sum())


def test_targeted_tries_the_most_likely_wrong_classes(tiny_model, batch):
    x, y = batch
    one = APGD(eps=0.05, steps=10, loss="dlr-targeted", n_target_classes=1)(tiny_model, x, y)
    three = APGD(eps=0.05, steps=10, loss="dlr-targeted", n_target_classes=3)(tiny_model, x, y)
    assert one.extras["runs"] == 1 and three.extras["runs"] == 3
    assert bool((three.success | ~one.success).all())


def test_reject_loss_closed_form():
    logits = torch.tensor(
        [
            [3.0, 1.0, 2.0, 0.5],  # y=0 wins: margin = 2 - 3
            [1.0, 2.5, 0.0, 4.0],  # reject wins: margin = 2.5 - 4
            [1.0, 3.0, 0.0, -1.0],
        ]
    )  # wrong real class wins: margin = 3 - 1
    y = torch.tensor([0, 0, 0])
    torch.testing.assert_close(apgd_loss("reject", logits, y, real_classes=3), torch.tensor([-1.0, -1.5, 2.0]))
    # DLR: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3), over the real classes only
    torch.testing.assert_close(apgd_loss("dlr", logits, y, real_classes=3)[0], torch.tensor(-(3.0 - 2.0) / (3.0 - 1.0)))
    assert set(APGD_LOSSES) == {"ce", "dlr", "dlr-targeted", "reject"}


def test_reject_loss_finds_the_wrong_real_class_ce_does_not():
    x = torch.full((32, 1, 4, 4), 0.5)
    y = torch.zeros(32, dtype=torch.long)
    model = LeverToy()
    ce = APGD(eps=EPS, steps=20, loss="ce", real_classes=3)(model, x, y)
    rej = APGD(eps=EPS, steps=20, loss="reject", real_classes=3)(model, x, y)
    # the reject margin pushes the mean down, to class 1
    assert bool(rej.success.all()) and bool((rej.extras["pred"] == 1).all())
    # CE over all outputs climbs the steeper reject logit: rejected images are not success
    assert bool((ce.extras["pred"] == 3).all()) and not bool(ce.success.any())


def test_reaching_the_reject_class_is_not_success():
    x = torch.full((8, 1, 4, 4), 0.5)
    y = torch.zeros(8, dtype=torch.long)
    res = APGD(eps=EPS, steps=10, loss="ce", real_classes=3)(RejectOnlyToy(), x, y)
    assert bool((res.extras["pred"] == 3).all()) and not bool(res.success.any())


def test_bad_parameters():
    with pytest.raises(ValueError, match="eps"):
        APGD(eps=1.5)
    with pytest.raises(ValueError, match="loss"):
        APGD(loss="hinge")
    with pytest.raises(ValueError, match="real_classes"):
        APGD(loss="reject")
    with pytest.raises(ValueError, match="steps"):
        APGD(steps=0)
    with pytest.raises(ValueError, match="4 outputs|outputs"):
        APGD(loss="reject", real_classes=5)(LeverToy(), torch.full((2, 1, 4, 4), 0.5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        APGD()(LeverToy(), torch.full((2, 1, 4, 4), 1.5), torch.zeros(2, dtype=torch.long))
