"""ConsistentRejection (CPR): the rejection decision on a model whose answer is known, the attack that knows it, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ModelSnapshot
from torch import nn

import guard
from guard.robust import default_attacks
from guard.training import ConsistentRejection, choose_radius
from guard.training.consistent import InnerPointView


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


CENTERS = torch.tensor([0.125, 0.375, 0.625, 0.875])  # decision boundaries at 0.25, 0.5, 0.75


class MeanPixel(nn.Module):
    """4 classes, closed form: the class is the nearest of CENTERS to the image's mean pixel.

    A uniform image of value m moves its mean by exactly r under a sign step of r on every
    pixel, so the consistency check of radius r changes the label exactly when the boundary on
    the side the cross-entropy pushes towards (away from the class's centre) is nearer than r.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1, keepdim=True)
        return -50.0 * (m - CENTERS.to(x)) ** 2


def uniform(values: list[float]) -> torch.Tensor:
    return torch.tensor(values).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()


def test_rejects_exactly_the_images_within_radius_of_a_boundary():
    # 0.22: class 0, 0.03 below the boundary it is pushed towards; 0.14: 0.11 away; 0.61: class 2,
    # pushed down towards 0.5 (0.11 away); 0.74: class 2, 0.01 from 0.75
    x = uniform([0.22, 0.14, 0.61, 0.74])
    cpr = ConsistentRejection(MeanPixel(), radius=0.05, steps=10)
    assert cpr.consistent(x).tolist() == [False, True, True, False]
    out = cpr(x)
    assert out.shape == (4, 5) and cpr.num_classes == 4 and cpr.reject_index == 4
    assert out.argmax(1).tolist() == [4, 0, 2, 4]  # rejected where the label is not stable
    assert torch.equal(out[:, :4], MeanPixel()(x))  # the real logits are the model's, at x
    # a larger radius reaches the farther boundaries too
    assert ConsistentRejection(MeanPixel(), radius=0.12, steps=10).consistent(x).tolist() == [
        False,
        False,
        False,
        False,
    ]


def test_the_real_logits_keep_their_gradient_and_the_model_is_left_as_it_was(tiny_model, small_split):
    snap = ModelSnapshot(tiny_model)
    tiny_model.train()
    x = small_split[0].x[:8].clone().requires_grad_(True)
    cpr = ConsistentRejection(tiny_model, radius=0.05)
    out = cpr(x)
    (g,) = torch.autograd.grad(out[:, :10].sum(), x)
    assert g.abs().sum() > 0 and out.shape == (8, 11)
    assert tiny_model.training  # the check ran in eval mode and gave the mode back
    tiny_model.eval()
    snap.assert_unchanged(tiny_model)
    assert torch.equal(cpr(x.detach()), cpr(x.detach()))  # deterministic (zero start)


def test_inner_point_view_decides_as_the_defence_does(tiny_model, small_split):
    x = small_split[0].x[:64]
    cpr = ConsistentRejection(tiny_model, radius=0.1, steps=5)
    view = InnerPointView(cpr)
    with torch.no_grad():
        defence, attacked = cpr(x).argmax(1), view(x).argmax(1)
    assert torch.equal(defence, attacked)
    assert 0 < int((defence == 10).sum()) < 64  # some rejected, some accepted: the comparison means something


def test_minimal_attacks_are_rejected_and_the_knowing_attack_is_not():
    pytest.importorskip("torchattacks")
    # clean images 0.005 off their centres: consistent at radius 0.05; at eps 0.2 every one can be
    # carried 0.08 past a boundary, far enough for its whole 0.05-ball to be labelled wrongly
    x = uniform([0.13, 0.38, 0.63, 0.87] * 3)
    y = torch.tensor([0, 1, 2, 3] * 3)
    cpr = ConsistentRejection(MeanPixel(), radius=0.05, steps=10)
    minimal = guard.evaluate_robust(cpr, (x, y), eps=0.2, budget="quick", attacks=["fab-t"])
    assert minimal["clean_accuracy"] == 1.0 and minimal["clean_rejected"] == 0.0
    # FAB stops just past the boundary: every point it found is rejected, nothing is broken
    assert minimal["per_attack"]["fab-t"]["rejected"] == 12 and minimal["per_attack"]["fab-t"]["broken"] == 0
    assert minimal["robust_accuracy_with_rejection"] == 1.0 and minimal["robust_accuracy"] == 0.0
    knowing = guard.evaluate_robust(cpr, (x, y), eps=0.2, budget="quick", attacks=["guard-apgd-consistent"])
    assert knowing["robust_accuracy_with_rejection"] == 0.0


def test_default_attacks_of_a_consistent_rejection(tiny_model, small_split):
    assert "guard-apgd-consistent" in default_attacks(True, 10, consistent=True)
    assert "guard-apgd-reject" not in default_attacks(True, 10, consistent=True)
    assert "guard-apgd-consistent" not in default_attacks(True, 10)
    x, y = small_split[0].x[:16], small_split[0].y[:16]
    with pytest.raises(ValueError, match="needs a guard.training.ConsistentRejection"):
        guard.evaluate_robust(tiny_model, (x, y), eps=0.1, budget="quick", attacks=["guard-apgd-consistent"])


def test_undefended_at_a_large_eps_is_zero_with_the_knowing_attack(tiny_model, small_split):
    x, y = small_split[1].x[:24], small_split[1].y[:24]
    cpr = ConsistentRejection(tiny_model, radius=0.05, steps=5)
    res = guard.evaluate_robust(
        cpr, (x, y), eps=0.5, budget="quick", attacks=["guard-apgd-ce", "guard-apgd-consistent"]
    )
    assert res["reject_model"] is True and res["real_classes"] == 10
    assert res["clean_accuracy"] > 0.5
    assert res["robust_accuracy_with_rejection"] == 0.0
    assert set(res["loss_curves"]) == {"guard-apgd-ce", "guard-apgd-consistent"}


def test_choose_radius_takes_the_largest_within_the_rate():
    near = [0.23, 0.48, 0.52, 0.77]  # 0.02 from the boundary each is pushed towards
    x = uniform(near + [0.13, 0.38, 0.63, 0.87] * 4)  # 4 of 20 near a boundary
    got = choose_radius(MeanPixel(), x, rate=0.05, radii=[0.1, 0.01, 0.03])
    assert got["rejected"] == {0.01: 0.0, 0.03: 0.2, 0.1: 0.2}
    assert got["radius"] == 0.01 and got["n"] == 20
    assert choose_radius(MeanPixel(), x, rate=0.25, radii=[0.01, 0.03, 0.1])["radius"] == 0.1
    assert choose_radius(MeanPixel(), uniform(near), rate=0.05, radii=[0.03])["radius"] is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"radius": 0.0}, "radius"),
        ({"radius": 1.5}, "radius"),
        ({"radius": math.nan}, "radius"),
        ({"radius": 0.1, "steps": 0}, "steps"),
        ({"radius": 0.1, "step_size": -0.1}, "step_size"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConsistentRejection(MeanPixel(), **kwargs)


def test_bad_input():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        ConsistentRejection("net", radius=0.1)
    with pytest.raises(TypeError, match="defence must be a ConsistentRejection"):
        InnerPointView(MeanPixel())
    cpr = ConsistentRejection(MeanPixel(), radius=0.1)
    with pytest.raises(RuntimeError, match="num_classes"):
        cpr.num_classes  # noqa: B018
    assert cpr.bind(uniform([0.3])).num_classes == 4
    bad = uniform([0.3, 0.4]).clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x"):
        cpr.consistent(bad)
    with pytest.raises(ValueError, match="radii"):
        choose_radius(MeanPixel(), uniform([0.3]), radii=[])
    with pytest.raises(ValueError, match="rate"):
        choose_radius(MeanPixel(), uniform([0.3]), rate=1.0, radii=[0.1])
