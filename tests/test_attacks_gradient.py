"""FGSM / PGD: budgets, ranges, dtype and device, model untouched, determinism, errors."""

from __future__ import annotations

import pytest
import torch

from guard.attacks.gradient import FGSM, L2PGD, PGD, LinfPGD


@pytest.fixture(scope="module")
def batch(small_split):
    _, test = small_split
    return test.x[:64], test.y[:64]


@pytest.mark.parametrize(
    "attack",
    [
        FGSM(eps=0.1),
        LinfPGD(eps=0.1, steps=5),
        LinfPGD(eps=0.1, steps=5, early_stop=False),
        LinfPGD(eps=0.1, steps=5, random_start=False),
    ],
)
def test_linf_budget_range_dtype(tiny_model, batch, attack):
    x, _ = batch
    r = attack(tiny_model, x)
    assert r.x_adv.dtype == torch.float32 and r.x_adv.device == x.device and r.x_adv.shape == x.shape
    assert float((r.x_adv - x).abs().max()) <= 0.1 + 1e-6
    assert float(r.x_adv.min()) >= 0.0 and float(r.x_adv.max()) <= 1.0
    # success is recomputed from the model on x_adv, not made up
    with torch.no_grad():
        pred = tiny_model(r.x_adv).argmax(1)
    assert torch.equal(r.success, pred != r.y)


def test_l2_budget(tiny_model, batch):
    x, _ = batch
    r = L2PGD(eps=1.5, steps=5)(tiny_model, x)
    norms = (r.x_adv - x).flatten(1).norm(dim=1)
    assert float(norms.max()) <= 1.5 + 1e-4
    assert float(r.x_adv.min()) >= 0.0 and float(r.x_adv.max()) <= 1.0
    assert r.success_rate > 0.0


def test_pgd_beats_fgsm_and_big_eps_succeeds(tiny_model, batch):
    x, _ = batch
    small_fgsm = FGSM(eps=0.05)(tiny_model, x).success_rate
    small_pgd = LinfPGD(eps=0.05, steps=10)(tiny_model, x).success_rate
    assert small_pgd >= small_fgsm
    assert LinfPGD(eps=0.3, steps=20)(tiny_model, x).success_rate >= 0.95


def test_zero_eps_changes_nothing(tiny_model, batch):
    x, _ = batch
    r = LinfPGD(eps=0.0, steps=3)(tiny_model, x)
    assert torch.equal(r.x_adv, x)
    assert not r.success.any()


def test_targeted(tiny_model, batch):
    x, _ = batch
    target = torch.full((x.shape[0],), 3, dtype=torch.long)
    r = LinfPGD(eps=0.3, steps=20)(tiny_model, x, target=target)
    with torch.no_grad():
        pred = tiny_model(r.x_adv).argmax(1)
    assert torch.equal(r.success, pred == 3)
    assert r.success_rate >= 0.8
    assert torch.equal(r.target, target)


def test_early_stop_freezes_successful_images(tiny_model, batch):
    x, _ = batch
    x = x[:32]
    r = LinfPGD(eps=0.3, steps=10, early_stop=True)(tiny_model, x)
    steps = r.extras["steps_taken"]
    assert int(steps.max()) <= 10
    assert int(steps.min()) < 10  # some images stopped early
    full = LinfPGD(eps=0.3, steps=10, early_stop=False)(tiny_model, x)
    assert int(full.extras["steps_taken"].min()) == 10


def test_model_untouched(tiny_model, batch):
    from conftest import ModelSnapshot

    x, _ = batch
    tiny_model.train()
    snap = ModelSnapshot(tiny_model)
    try:
        LinfPGD(eps=0.1, steps=3)(tiny_model, x)
        FGSM(eps=0.1)(tiny_model, x)
        assert tiny_model.training
        snap.assert_unchanged(tiny_model)
    finally:
        tiny_model.eval()


def test_deterministic_with_seed(tiny_model, batch):
    x, _ = batch
    a = LinfPGD(eps=0.1, steps=3, seed=7)(tiny_model, x).x_adv
    b = LinfPGD(eps=0.1, steps=3, seed=7)(tiny_model, x).x_adv
    c = LinfPGD(eps=0.1, steps=3, seed=8)(tiny_model, x).x_adv
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_alias():
    assert PGD is LinfPGD


@pytest.mark.parametrize(
    "kwargs",
    [
        {"eps": -0.1},
        {"eps": float("nan")},
        {"eps": 0.1, "steps": 0},
        {"eps": 0.1, "step_size": 0.0},
        {"eps": 0.1, "seed": -1},
    ],
)
def test_bad_params(kwargs):
    with pytest.raises(ValueError, match="LinfPGD"):
        LinfPGD(**kwargs)


def test_bad_inputs(tiny_model, batch):
    x, _ = batch
    with pytest.raises(ValueError, match="eps"):
        FGSM(eps=-1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        FGSM(eps=0.1)(tiny_model, x * 2 + 0.5)
    with pytest.raises(TypeError, match="floating"):
        FGSM(eps=0.1)(tiny_model, (x * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="target"):
        LinfPGD(eps=0.1)(tiny_model, x, target=torch.zeros(3, dtype=torch.long))


# -- the attack's direction and strength: mutants that step against the loss fail here --------------------------


def _ce(model, x, y):
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(x), y, reduction="none")


@pytest.mark.parametrize(
    "attack",
    [
        FGSM(eps=0.05),
        LinfPGD(eps=0.05, steps=5, random_start=False, early_stop=False),
        L2PGD(eps=0.5, steps=5, random_start=False, early_stop=False),
    ],
)
def test_attack_raises_the_loss_on_every_image(tiny_model, batch, attack):
    """One signed (or normalised) step up the gradient raises the cross-entropy of every image of a
    small ReLU net at a small budget; an attack that steps against the loss lowers it instead."""
    x, _ = batch
    r = attack(tiny_model, x)
    before, after = _ce(tiny_model, x, r.y), _ce(tiny_model, r.x_adv, r.y)
    assert bool((after > before).all()), f"loss fell on {int((after <= before).sum())} of {len(x)} images"


def test_targeted_pgd_lowers_the_target_loss(tiny_model, batch):
    x, _ = batch
    target = torch.full((x.shape[0],), 3, dtype=torch.long)
    r = LinfPGD(eps=0.05, steps=5, random_start=False, early_stop=False)(tiny_model, x, target=target)
    assert bool((_ce(tiny_model, r.x_adv, target) < _ce(tiny_model, x, target)).all())


def test_confident_pgd_reaches_higher_wrong_class_confidence_than_early_stop(tiny_model, batch):
    """CCAT's objective (loss="confidence") against the minimal, early-stopped run on the same images."""
    from guard.attacks.gradient import wrong_confidence

    x, _ = batch
    minimal = LinfPGD(eps=0.3, steps=20, early_stop=True)(tiny_model, x)
    full = LinfPGD(eps=0.3, steps=20, early_stop=False)(tiny_model, x)
    confident = LinfPGD(eps=0.3, steps=20, loss="confidence")
    conf = confident(tiny_model, x)
    assert confident.params()["early_stop"] is False and minimal.success.any()
    with torch.no_grad():
        c_min = wrong_confidence(tiny_model(minimal.x_adv), minimal.y)
        c_full = wrong_confidence(tiny_model(full.x_adv), full.y)
        c_conf = wrong_confidence(tiny_model(conf.x_adv), conf.y)
    ok = minimal.success & conf.success
    assert float(c_conf[ok].mean()) > float(c_min[ok].mean()) + 0.2
    assert float(c_conf.mean()) >= float(c_full.mean()) - 1e-6 and conf.success_rate >= minimal.success_rate
    assert float(c_conf.median()) > 0.9
    assert float((conf.x_adv - x).abs().max()) <= 0.3 + 1e-6


def test_confident_pgd_keeps_the_best_iterate(tiny_model, batch):
    """The returned image's wrong-class confidence is at least that of the last iterate (best kept, as in CCAT)."""
    from guard.attacks.gradient import wrong_confidence

    x, _ = batch
    x = x[:16]
    atk = LinfPGD(eps=0.1, steps=4, loss="confidence", seed=3)
    res = atk(tiny_model, x)
    c_best = wrong_confidence(tiny_model(res.x_adv), res.y)
    for steps in (1, 2, 3):  # a shorter run from the same start and step walks the first iterates
        short = LinfPGD(eps=0.1, steps=steps, loss="confidence", seed=3, step_size=atk.step_size)(tiny_model, x)
        assert bool((c_best >= wrong_confidence(tiny_model(short.x_adv), res.y) - 1e-6).all())


def test_loss_and_early_stop_checked():
    with pytest.raises(ValueError, match="'loss' parameter of LinfPGD"):
        LinfPGD(eps=0.1, loss="margin")
    with pytest.raises(ValueError, match="early_stop"):
        LinfPGD(eps=0.1, loss="confidence", early_stop=True)
    with pytest.raises(ValueError, match="'loss' parameter of FGSM"):
        FGSM(eps=0.1, loss="nope")
    assert LinfPGD(eps=0.1).early_stop is True and LinfPGD(eps=0.1, loss="confidence").early_stop is False
