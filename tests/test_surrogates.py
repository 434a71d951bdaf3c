"""Every detector's differentiable stand-in points the right way: a step along it lowers the REAL score.

An adaptive attack (guard.attacks.AdaptivePGD, OrthogonalPGD, AdaptiveEnsemble) descends each
detector's export-head ``surrogate`` (else the head's own score); a surrogate whose gradient is
zero (the saliency map of a ReLU network differentiated twice) or points the wrong way makes
the attack blind to that detector and the evasion figure flattering. Each test takes one signed
step down the surrogate's gradient from PGD images of a tiny model and scores the result with
the detector itself (FAISS, Captum, the real rounding).
"""

from __future__ import annotations

import pytest
import torch

import guard
from guard.attacks import LinfPGD
from guard.core.features import Batch, FeatureExtractor
from guard.detectors import DETECTORS

STEP = 0.03

#: many small ops: a second thread only spin-waits (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def guarded_all(tiny_model, small_split):
    train, test = small_split
    g = guard.wrap(tiny_model, list(DETECTORS)).fit(train).calibrate(test.x[:128], fpr=0.05)
    assert sorted(g.detectors) == sorted(DETECTORS), g.left_out_  # every shipped detector runs on the tiny model
    return g


@pytest.fixture(scope="module")
def pgd_batch(tiny_model, small_split):
    _, test = small_split
    x, y = test.x[128:192], test.y[128:192]
    return LinfPGD(eps=0.2, steps=20, early_stop=False, seed=0)(tiny_model, x, y).x_adv


def surrogate_step(guarded, name: str, x: torch.Tensor, head=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(real scores before, real scores after one signed step down the surrogate, the gradient)."""
    det = guarded.detectors[name]
    model = guarded.model
    head = det.export_head().eval() if head is None else head
    xa = x.clone().requires_grad_(True)
    with torch.enable_grad():
        layers = det.feature_layers
        logits, feats = (
            FeatureExtractor(model, layers)(xa, pool=guarded.pool, check=False) if layers else (model(xa), {})
        )
        fn = getattr(head, "surrogate", None)
        out = fn(Batch(xa, logits, feats, model)) if fn is not None else head(Batch(xa, logits, feats, model))
        out = out["score"] if isinstance(out, dict) else out
        (grad,) = torch.autograd.grad(out.sum(), xa)
    stepped = (x - STEP * grad.sign()).clamp(0, 1)
    return det.score(model, x), det.score(model, stepped), grad


#: every detector, the masking one included: its default score (other_margin, a max of logit differences over
#: the masked images) is differentiable as its head computes it (the share of disagreeing masks would not be)
DIFFERENTIABLE = sorted(DETECTORS)


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_one_step_down_the_surrogate_lowers_the_real_score(guarded_all, pgd_batch, name):
    before, after, grad = surrogate_step(guarded_all, name, pgd_batch)
    moved = grad.flatten(1).abs().sum(1) > 0
    assert float(moved.float().mean()) >= 0.9, (
        f"{name}: the surrogate gives no gradient on {float((~moved).float().mean()):.0%} of images"
    )
    lowered, raised = float((after < before).float().mean()), float((after > before).float().mean())
    assert float(after.mean()) < float(before.mean()), (name, float(before.mean()), float(after.mean()))
    assert lowered >= 0.5 and lowered > 2 * raised, (name, lowered, raised)


class _Negated(torch.nn.Module):
    """A surrogate pointing the wrong way: the real head's stand-in, negated."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, batch):
        return self.head(batch)

    def surrogate(self, batch):
        fn = getattr(self.head, "surrogate", None)
        out = fn(batch) if fn is not None else self.head(batch)
        return -(out["score"] if isinstance(out, dict) else out)


@pytest.mark.parametrize("name", ["knn", "ppca", "saliency", "masking", "occlusion"])
def test_a_surrogate_pointing_the_wrong_way_raises_the_real_score(guarded_all, pgd_batch, name):
    """The check above is not vacuous: the negated stand-in fails it (the real score rises)."""
    head = _Negated(guarded_all.detectors[name].export_head().eval())
    before, after, _ = surrogate_step(guarded_all, name, pgd_batch, head=head)
    assert float(after.mean()) > float(before.mean()), (name, float(before.mean()), float(after.mean()))


def test_the_saliency_surrogate_leaves_the_model_and_relu_as_they_were(guarded_all, pgd_batch):
    """The softplus substitution (SmoothReLU) lives only inside the surrogate's call."""
    from guard.detectors.saliency import SmoothReLU

    x = torch.linspace(-1, 1, 11)
    with SmoothReLU(10.0):
        smooth = torch.relu(x)
        smooth_nn = torch.nn.ReLU(inplace=True)(x.clone())
    torch.testing.assert_close(smooth, torch.nn.functional.softplus(x, beta=10.0))
    torch.testing.assert_close(smooth_nn, smooth)
    torch.testing.assert_close(torch.relu(x), x.clamp_min(0))
    model = guarded_all.model
    before = model(pgd_batch[:4])
    surrogate_step(guarded_all, "saliency", pgd_batch[:4])
    torch.testing.assert_close(model(pgd_batch[:4]), before)
