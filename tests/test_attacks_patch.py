"""Patch placement, PatchGAN, UniversalPatch, RandomPatch and the patch analyses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guard.attacks.patch_analysis import (
    class_comparison,
    fooling_rate_repeated,
    latent_interpolation,
    pairwise_diversity,
    patch_sampler,
    psnr,
    ssim,
)
from guard.attacks.patch_fit import PatchTraining
from guard.attacks.patch_gan import PatchGAN, PatchGenerator, fooling_loss
from guard.attacks.patching import apply_patches, grid_positions, patch_mask, patch_side, random_positions
from guard.attacks.random_patch import RandomPatch
from guard.attacks.universal_patch import UniversalPatch
from guard.core.validation import NotFittedError


# ---------------------------------------------------------------- placement
def test_patch_side():
    assert patch_side(5, (28, 28)) == 5
    assert patch_side(0.01, (28, 28)) == 3  # round(sqrt(7.84))
    assert patch_side(0.1, (28, 28)) == 9
    assert patch_side(0.5, (28, 28)) == 20


@pytest.mark.parametrize(
    "bad, err",
    [
        (0, ValueError),
        (29, ValueError),
        (0.0, ValueError),
        (1.0, ValueError),
        (-0.1, ValueError),
        (1.5, ValueError),
        ("3", TypeError),
        (True, TypeError),
    ],
)
def test_patch_side_errors(bad, err):
    with pytest.raises(err, match="size"):
        patch_side(bad, (28, 28))


def test_apply_changes_only_the_patch_region():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 20, 24, generator=gen)
    patches = torch.rand(16, 3, 5, 5, generator=gen)
    pos = random_positions(16, 5, (20, 24), generator=gen)
    out = apply_patches(x, patches, pos)
    mask = patch_mask(pos, 5, (20, 24)).expand_as(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out[~mask], x[~mask])
    for i in range(16):
        r, c = pos[i].tolist()
        assert torch.equal(out[i, :, r : r + 5, c : c + 5], patches[i])
    assert int(mask[:, 0].flatten(1).sum(1).unique().item()) == 25
    assert not torch.equal(out, x) and torch.equal(x, x.clone())  # input not modified in place


def test_apply_one_patch_for_all_and_gradients():
    x = torch.rand(4, 1, 10, 10)
    patch = torch.rand(1, 1, 3, 3, requires_grad=True)
    out = apply_patches(x, patch, torch.tensor([[0, 0], [7, 7], [2, 5], [0, 7]]))
    out.sum().backward()
    assert torch.allclose(patch.grad, torch.full_like(patch, 4.0))


def test_positions_random_in_range_and_seeded():
    a = random_positions(1000, 9, (28, 28), generator=torch.Generator().manual_seed(1))
    b = random_positions(1000, 9, (28, 28), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.dtype == torch.long
    assert int(a.min()) == 0 and int(a.max()) == 19
    g = grid_positions(9, (28, 28), 9)
    assert g.tolist() == [[r, c] for r in (0, 9, 18) for c in (0, 9, 18)]


def test_apply_errors():
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="inside"):
        apply_patches(x, torch.rand(2, 1, 3, 3), torch.tensor([[6, 0], [0, 0]]))
    with pytest.raises(ValueError, match="larger"):
        apply_patches(x, torch.rand(2, 1, 9, 9), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="square"):
        apply_patches(x, torch.rand(2, 1, 3, 4), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="channel"):
        apply_patches(x, torch.rand(2, 3, 3, 3), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="positions"):
        apply_patches(x, torch.rand(2, 1, 3, 3), torch.zeros(2, 2))


# ---------------------------------------------------------------- losses, generator
def test_fooling_loss_values():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    y = torch.tensor([0, 0])
    p0 = torch.softmax(logits, 1)[:, 0]
    assert torch.allclose(fooling_loss(logits, y, "paper"), -torch.log(1 - p0).mean(), atol=1e-5)
    assert torch.allclose(fooling_loss(logits, y, "margin", kappa=10.0), torch.tensor((2.0 + -5.0) / 2))
    assert torch.allclose(fooling_loss(logits, y, "margin", kappa=1.0), torch.tensor((2.0 - 1.0) / 2))
    with pytest.raises(ValueError, match="loss"):
        fooling_loss(logits, y, "hinge")


@pytest.mark.parametrize("side", [1, 3, 4, 6, 9, 16, 20])
def test_generator_scales_with_side(side):
    g = PatchGenerator(side, channels=3).eval()
    with torch.no_grad():
        out = g(torch.rand(5, 100))
    assert out.shape == (5, 3, side, side)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


@pytest.fixture(scope="module")
def fitted_gan(tiny_model, small_split):
    train, _ = small_split
    return PatchGAN(
        size=0.1,
        loss="margin",
        alpha=1.0,
        beta=3.0,
        patch_distance="ssim",
        cap_p=0.8,
        training=PatchTraining(lr=1e-2, steps=40, eval_every=10, batch_size=32, seed=0),
    ).fit(tiny_model, train.x[:256])


def test_gan_fit_sample_apply(fitted_gan, tiny_model, small_split):
    _, test = small_split
    g = fitted_gan
    assert g.side_ == 9 and 0.0 <= g.val_fooling_rate_ <= 1.0 and g.history_
    p = g.sample(7, generator=torch.Generator().manual_seed(0))
    assert p.shape == (7, 1, 9, 9) and float(p.min()) >= 0 and float(p.max()) <= 1
    assert torch.equal(p, g.sample(7, generator=torch.Generator().manual_seed(0)))
    x = test.x[:7]
    pos = torch.tensor([[0, 0]] * 7)
    out = g.apply(x, p, pos)
    assert torch.equal(out[..., 9:, :], x[..., 9:, :]) and torch.equal(out[..., :9, :9], p)
    r = g(tiny_model, test.x[:64])
    assert r.x_adv.shape == (64, 1, 28, 28) and r.x_adv.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(r.success, tiny_model(r.x_adv).argmax(1) != tiny_model(test.x[:64]).argmax(1))
    changed = (r.x_adv != test.x[:64]).flatten(1).sum(1)
    assert int(changed.max()) <= 81


def test_gan_leaves_model_untouched(tiny_model, small_split):
    from conftest import ModelSnapshot

    train, _ = small_split
    tiny_model.train()
    snap = ModelSnapshot(tiny_model)
    try:
        short = PatchTraining(steps=3, eval_every=2, batch_size=8)
        PatchGAN(size=4, training=short).fit(tiny_model, train.x[:64])
        UniversalPatch(size=4, training=short).fit(tiny_model, train.x[:64])
        snap.assert_unchanged(tiny_model)
    finally:
        tiny_model.eval()


def test_gan_deterministic(tiny_model, small_split):
    train, _ = small_split
    short = PatchTraining(steps=4, eval_every=2, batch_size=8, seed=3)
    a = PatchGAN(size=4, training=short).fit(tiny_model, train.x[:64])
    b = PatchGAN(size=4, training=short).fit(tiny_model, train.x[:64])
    z = torch.Generator().manual_seed(0)
    pa = a.sample(5, generator=z)
    pb = b.sample(5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pa, pb)


def test_gan_learns_to_fool_better_than_noise(fitted_gan, tiny_model, small_split):
    _, test = small_split
    gan = fooling_rate_repeated(tiny_model, test.x, patch_sampler(fitted_gan), repetitions=2)["mean"]
    noise = fooling_rate_repeated(tiny_model, test.x, patch_sampler(RandomPatch(size=0.1)), repetitions=2)["mean"]
    assert gan > noise


def test_gan_save_load_roundtrip(fitted_gan, tmp_path):
    path = fitted_gan.save(tmp_path / "g.safetensors")
    loaded = PatchGAN.load(path)
    z = torch.rand(4, 100)
    assert torch.equal(loaded.sample(4, z=z), fitted_gan.sample(4, z=z))
    assert loaded.side_ == fitted_gan.side_ and loaded.size == fitted_gan.size
    assert loaded.training == fitted_gan.training and loaded.params() == fitted_gan.params()
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="corrupt"):
        PatchGAN.load(tmp_path / "bad.safetensors")


def test_universal_patch_save_load_roundtrip(tiny_model, small_split, tmp_path):
    train, test = small_split
    short = PatchTraining(steps=3, eval_every=1, batch_size=8, seed=1)
    up = UniversalPatch(size=0.05, training=short).fit(tiny_model, train.x[:32])
    path = up.save(tmp_path / "u.safetensors")
    loaded = UniversalPatch.load(path)
    assert torch.equal(loaded.patch_, up.patch_) and loaded.side_ == up.side_ and loaded.params() == up.params()
    assert torch.equal(loaded(tiny_model, test.x[:8], test.y[:8]).x_adv, up(tiny_model, test.x[:8], test.y[:8]).x_adv)
    with pytest.raises(NotFittedError):
        UniversalPatch().save(tmp_path / "v.safetensors")
    fitted_gan_path = tmp_path / "not_a_patch.safetensors"
    from guard.core.cache import save_tensors

    save_tensors(fitted_gan_path, {"patch": up.patch_}, {"format": "guard.PatchGAN"})
    with pytest.raises(ValueError, match="not a saved UniversalPatch"):
        UniversalPatch.load(fitted_gan_path)


def test_not_fitted_errors(tiny_model, small_split):
    _, test = small_split
    with pytest.raises(NotFittedError):
        PatchGAN().sample(3)
    with pytest.raises(NotFittedError):
        PatchGAN()(tiny_model, test.x[:2])
    with pytest.raises(NotFittedError):
        UniversalPatch().sample(3)


@pytest.mark.parametrize("cls", [PatchGAN, UniversalPatch, RandomPatch])
@pytest.mark.parametrize("size", [0.0, 1.0, -0.5, 2.5, 0, -3])
def test_bad_size(cls, size):
    with pytest.raises(ValueError, match="size"):
        cls(size=size)


def test_patch_larger_than_image(tiny_model, small_split):
    train, _ = small_split
    with pytest.raises(ValueError, match="larger than the image"):
        PatchGAN(size=40, training=PatchTraining(steps=1)).fit(tiny_model, train.x[:16])
    with pytest.raises(ValueError, match="larger than the image"):
        RandomPatch(size=29)(tiny_model, train.x[:2])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alpha": -1.0}, "The 'alpha' parameter of PatchGAN must be a finite float in [0.0, inf]. Got -1.0."),
        ({"beta": -0.1}, "The 'beta' parameter of PatchGAN must be a finite float in [0.0, inf]. Got -0.1."),
        ({"loss": "l2"}, "The 'loss' parameter of PatchGAN must be one of ('paper', 'margin'). Got 'l2'."),
        ({"patch_distance": "l1"}, "The 'patch_distance' parameter of PatchGAN must be 'l2' or 'ssim'. Got 'l1'."),
        ({"cap_p": 0.0}, "The 'cap_p' parameter of PatchGAN must be a finite float in (0.0, inf]. Got 0.0."),
        ({"cap_d": -1.0}, "The 'cap_d' parameter of PatchGAN must be a finite float in (0.0, inf]. Got -1.0."),
    ],
)
def test_gan_bad_params(kwargs, message):
    with pytest.raises(ValueError) as err:
        PatchGAN(**kwargs)
    assert str(err.value) == message


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"lr": 0.0}, ValueError, "The 'lr' parameter of PatchTraining must be a finite float in (0.0, inf]. Got 0.0."),
        ({"lr": "fast"}, ValueError, "The 'lr' parameter of PatchTraining must be a finite float in (0.0, inf]."),
        ({"steps": 0}, ValueError, "The 'steps' parameter of PatchTraining must be an int >= 1. Got 0."),
        ({"steps": 2.5}, ValueError, "The 'steps' parameter of PatchTraining must be an int >= 1. Got 2.5."),
        ({"batch_size": 0}, ValueError, "The 'batch_size' parameter of PatchTraining must be an int >= 1. Got 0."),
        ({"seed": -2}, ValueError, "The 'seed' parameter of PatchTraining must be an int >= 0. Got -2."),
        ({"eval_every": 0}, ValueError, "The 'eval_every' parameter of PatchTraining must be an int >= 1. Got 0."),
        ({"patience": True}, ValueError, "The 'patience' parameter of PatchTraining must be an int >= 1. Got True."),
        (
            {"val_fraction": 1.0},
            ValueError,
            "The 'val_fraction' parameter of PatchTraining must be a finite float in [0.0, 1.0). Got 1.0.",
        ),
        (
            {"max_seconds": 0},
            ValueError,
            "The 'max_seconds' parameter of PatchTraining must be a finite float in (0.0, inf]. Got 0.",
        ),
        ({"progress": "yes"}, TypeError, "The 'progress' parameter of PatchTraining must be a bool. Got str."),
    ],
)
def test_patch_training_bad_options(kwargs, error, message):
    with pytest.raises(error) as err:
        PatchTraining(**kwargs)
    assert str(err.value).startswith(message)


def test_patch_training_checked_and_defaulted_per_attack():
    # lr=None takes each attack's own default; the rest of the settings are shared as given
    short = PatchTraining(steps=7, batch_size=16, seed=2)
    gan, up = PatchGAN(training=short), UniversalPatch(training=short)
    assert gan.training.lr == 1e-3 and up.training.lr == 0.05
    assert gan.training.steps == up.training.steps == 7 and short.lr is None
    assert PatchGAN(training=PatchTraining(lr=0.01)).training.lr == 0.01
    assert PatchGAN().training == PatchTraining(lr=1e-3) and UniversalPatch().training == PatchTraining(lr=0.05)
    # normalised when checked: a NumPy int is stored as an int (params() stays JSON-friendly)
    assert type(PatchTraining(steps=np.int64(5)).steps) is int
    with pytest.raises(
        TypeError, match=r"The 'training' parameter of PatchGAN must be a PatchTraining or None\. Got dict\."
    ):
        PatchGAN(training={"steps": 3})
    with pytest.raises(TypeError, match=r"The 'training' parameter of UniversalPatch must be a PatchTraining"):
        UniversalPatch(training=5)
    with pytest.raises(ValueError, match=r"The 'batch_size' parameter of PatchGAN must be an int >= 2\. Got 1\."):
        PatchGAN(training=PatchTraining(batch_size=1))  # BatchNorm needs two samples
    assert UniversalPatch(training=PatchTraining(batch_size=1)).training.batch_size == 1
    with pytest.raises(TypeError, match="steps"):
        PatchGAN(steps=3)  # the training settings are no longer keyword arguments of the attack


@pytest.mark.parametrize("cls", [PatchGAN, UniversalPatch])
def test_params_flat_and_round_trip(cls):
    training = PatchTraining(lr=0.02, steps=9, batch_size=4, val_fraction=0.0, max_seconds=3.0, seed=5)
    attack = cls(size=3, loss="margin", training=training)
    p = attack.params()
    assert {k: p[k] for k in ("lr", "steps", "batch_size", "val_fraction", "max_seconds", "seed", "progress")} == {
        "lr": 0.02,
        "steps": 9,
        "batch_size": 4,
        "val_fraction": 0.0,
        "max_seconds": 3.0,
        "seed": 5,
        "progress": False,
    }
    assert "training" not in p and all(isinstance(v, (int, float, str, bool, type(None))) for v in p.values())
    back = cls.from_params(**p)
    assert back.params() == p and back.training == attack.training
    with pytest.raises(TypeError, match="bogus"):
        cls.from_params(**p, bogus=1)


def test_gan_bad_data(tiny_model):
    with pytest.raises(TypeError, match="data"):
        PatchGAN(training=PatchTraining(steps=1)).fit(tiny_model, [1, 2, 3])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        PatchGAN(training=PatchTraining(steps=1)).fit(tiny_model, torch.full((4, 1, 28, 28), 3.0))


# ---------------------------------------------------------------- baselines
def test_universal_patch_untargeted_and_targeted(tiny_model, small_split):
    train, test = small_split
    training = PatchTraining(lr=0.1, steps=20, eval_every=10, batch_size=32)
    up = UniversalPatch(size=0.1, training=training).fit(tiny_model, train.x[:256])
    assert up.patch_.shape == (1, 1, 9, 9) and float(up.patch_.min()) >= 0 and float(up.patch_.max()) <= 1
    r = up(tiny_model, test.x[:128])
    assert r.success_rate > RandomPatch(size=0.1)(tiny_model, test.x[:128]).success_rate
    tp = UniversalPatch(size=0.1, target=3, training=training).fit(tiny_model, train.x[:256])
    rt = tp(tiny_model, test.x[:128])
    with torch.no_grad():
        assert torch.equal(rt.success, tiny_model(rt.x_adv).argmax(1) == 3)
    with pytest.raises(ValueError, match="target"):
        UniversalPatch(target=10, training=PatchTraining(steps=1)).fit(tiny_model, train.x[:16])


def test_random_patch_seeded_and_local(tiny_model, small_split):
    _, test = small_split
    x = test.x[:32]
    a, b = RandomPatch(size=5, seed=1)(tiny_model, x), RandomPatch(size=5, seed=1)(tiny_model, x)
    assert torch.equal(a.x_adv, b.x_adv)
    mask = patch_mask(a.extras["positions"], 5, (28, 28))
    assert torch.equal(a.x_adv[~mask], x[~mask])


# ---------------------------------------------------------------- analysis
def test_ssim_psnr_known_values():
    a = torch.rand(3, 1, 9, 9, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim(a, a), torch.ones(3), atol=1e-5)
    assert bool(torch.isinf(psnr(a, a)).all())
    b = (a + 0.1).clamp(0, 1)
    assert bool((ssim(a, b) < 1).all())
    assert torch.allclose(psnr(torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 0.1)), torch.tensor([20.0]), atol=1e-4)
    noise = torch.rand(2, 1, 9, 9, generator=torch.Generator().manual_seed(1))
    assert float(ssim(noise[:1], noise[1:]).abs().max()) < 0.3  # independent noise is dissimilar
    d = pairwise_diversity(torch.rand(10, 1, 9, 9))
    assert d["n_pairs"] == 45 and d["ssim_median"] < 0.3
    same = pairwise_diversity(torch.ones(4, 1, 3, 3) * 0.5)
    assert same["identical_pairs"] == 6 and same["ssim_median"] > 0.999


def test_class_comparison_and_interpolation(fitted_gan, tiny_model, small_split):
    _, test = small_split
    x = test.x[:32]
    p = fitted_gan.sample(32, generator=torch.Generator().manual_seed(0))
    cc = class_comparison(tiny_model, x, p, stride=9)
    assert cc["positions"] == 9 and cc["pairs"] == 9 * 32
    assert 0.0 <= cc["patched_takes_canvas_class"] <= 1.0
    assert len(cc["fooling_rate_per_position"]) == 9
    li = latent_interpolation(tiny_model, fitted_gan, x, points=4)
    assert li["t"] == [0.0, 0.3333, 0.6667, 1.0] and len(li["fooling_rate"]) == 4


def test_fooling_rate_repeated_stats(tiny_model, small_split):
    _, test = small_split
    out = fooling_rate_repeated(
        tiny_model, test.x[:64], patch_sampler(RandomPatch(size=0.2)), repetitions=3, y=test.y[:64]
    )
    assert len(out["rates"]) == 3 and out["n"] == 64
    t = torch.tensor(out["rates"])
    assert abs(out["mean"] - float(t.mean())) < 1e-6 and out["std"] >= 0
    assert "mean_correct" in out
