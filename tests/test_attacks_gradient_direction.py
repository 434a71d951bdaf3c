"""FGSM and PGD step *up* the loss (down it when targeted): exact answers on a linear model, and the loss on a trained one.

A sign error in a gradient attack does not break its budget, range or dtype checks, and a test
that only asks "PGD succeeds at least as often as FGSM" still passes when FGSM lowers the loss
(issue 34, item 5). On ``logits = (b, w . x)`` the cross-entropy gradient of label 0 is
``sigmoid(w . x - b) * w``, so its sign is ``sign(w)`` and both attacks' answers are known exactly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from guard.attacks.gradient import FGSM, LinfPGD


def _linear() -> tuple[nn.Module, torch.Tensor]:
    """Two classes on 1x4x4 images: logit 0 = 10 (bias), logit 1 = w . x; w has mixed signs, no zeros."""
    w = torch.tensor([1.0, -2.0, 0.5, -0.25] * 4)
    lin = nn.Linear(16, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.stack([torch.zeros(16), w]))
        lin.bias.copy_(torch.tensor([10.0, 0.0]))
    return nn.Sequential(nn.Flatten(), lin).eval(), w.view(1, 1, 4, 4)


def test_fgsm_moves_every_pixel_up_the_loss_exactly() -> None:
    model, w = _linear()
    x = torch.full((3, 1, 4, 4), 0.5)
    y = torch.zeros(3, dtype=torch.long)
    r = FGSM(eps=0.1)(model, x, y)
    torch.testing.assert_close(r.x_adv, (x + 0.1 * w.sign()).expand_as(x), rtol=0, atol=1e-6)
    # label 1: the loss rises the other way
    r1 = FGSM(eps=0.1)(model, x, torch.ones(3, dtype=torch.long))
    torch.testing.assert_close(r1.x_adv, (x - 0.1 * w.sign()).expand_as(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("early_stop", [True, False])
def test_pgd_steps_up_the_loss_exactly(early_stop) -> None:
    model, w = _linear()
    x = torch.full((2, 1, 4, 4), 0.5)
    y = torch.zeros(2, dtype=torch.long)
    # one step of 0.04: exactly 0.04 * sign(w); three steps reach the 0.1 ball's corner and stay
    one = LinfPGD(eps=0.1, steps=1, step_size=0.04, random_start=False, early_stop=early_stop)(model, x, y)
    torch.testing.assert_close(one.x_adv, (x + 0.04 * w.sign()).expand_as(x), rtol=0, atol=1e-6)
    three = LinfPGD(eps=0.1, steps=3, step_size=0.04, random_start=False, early_stop=early_stop)(model, x, y)
    torch.testing.assert_close(three.x_adv, (x + 0.1 * w.sign()).expand_as(x), rtol=0, atol=1e-6)
    # targeted at class 1: lowering CE(1) is raising w . x, the same direction here
    tgt = LinfPGD(eps=0.1, steps=1, step_size=0.04, random_start=False, early_stop=early_stop)(
        model, x, y, target=torch.ones(2, dtype=torch.long)
    )
    torch.testing.assert_close(tgt.x_adv, (x + 0.04 * w.sign()).expand_as(x), rtol=0, atol=1e-6)


def _ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def test_attacks_raise_the_loss_of_a_trained_model(tiny_model, small_split) -> None:
    _, test = small_split
    x, y = test.x[:64], test.y[:64]
    clean = _ce(tiny_model, x, y)
    fgsm = _ce(tiny_model, FGSM(eps=0.1)(tiny_model, x, y).x_adv, y)
    pgd = _ce(tiny_model, LinfPGD(eps=0.1, steps=10, early_stop=False)(tiny_model, x, y).x_adv, y)
    assert float((fgsm > clean).float().mean()) >= 0.9, fgsm - clean
    assert float((pgd > clean).float().mean()) >= 0.95, pgd - clean
    assert float(pgd.mean()) > float(fgsm.mean()) > float(clean.mean())
    # targeted PGD lowers the target's loss
    target = (y + 1) % 10
    tgt = LinfPGD(eps=0.1, steps=10, early_stop=False)(tiny_model, x, y, target=target).x_adv
    assert float((_ce(tiny_model, tgt, target) < _ce(tiny_model, x, target)).float().mean()) >= 0.95
