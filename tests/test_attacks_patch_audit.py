"""The audit steps attacks_gradient and attacks_patches in quick mode: report keys, shared results, artifacts."""

from __future__ import annotations

import json

import torch

from guard.audit import AuditContext, AuditOptions, step


def test_quick_audit_steps(tiny_model, small_split, tmp_path):
    train, test = small_split
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    ctx = AuditContext(
        model=tiny_model,
        model_name="tiny",
        train=train,
        test=test,
        data_source="test",
        out=tmp_path,
        options=AuditOptions(quick=True, progress=False, repetitions=2),
    )
    given = step("attacks_gradient").run(ctx).merged(step("attacks_patches").run(ctx))
    ctx.save_report()
    attacks = json.loads((tmp_path / "report.json").read_text())["attacks"]
    for name in ("fgsm", "pgd", "patch_gan", "universal_patch", "random_patch"):
        entry = attacks[name]
        assert (
            0.0 <= entry["success_rate"] <= 1.0
            and entry["n"] > 0
            and entry["seconds"] >= 0
            and isinstance(entry["params"], dict)
        )
        res = given.results[name]
        idx = res.extras["test_index"]
        assert res.x_adv.shape == test.x[idx].shape and res.success.shape == idx.shape
        assert abs(entry["success_rate"] - float(res.success.float().mean())) < 1e-6
        loaded = ctx.load_artifact("attack_" + name)
        assert (
            loaded is not None
            and torch.equal(loaded[0]["test_index"], idx)
            and torch.equal(loaded[0]["x_adv"], res.x_adv.cpu())
        )
    assert attacks["pgd"]["linf_max"] <= 0.3 + 1e-6
    assert attacks["pgd"]["success_rate"] >= attacks["fgsm"]["success_rate"]
    for name in ("patch_gan", "universal_patch", "random_patch"):
        curve = attacks[name]["curve"]
        assert len(curve) >= 2 and [p["area"] for p in curve] == sorted(p["area"] for p in curve)
        assert all(len(p["rates"]) == 2 and p["std"] >= 0 for p in curve)
        res = given.results[name]
        idx = res.extras["test_index"]
        changed = (res.x_adv != test.x[idx]).flatten(1).sum(1)
        assert int(changed.max()) <= attacks[name]["side"] ** 2  # only the patch region changes
    pg = attacks["patch_gan"]
    assert {"class_comparison", "diversity", "latent_interpolation"} <= pg.keys()
    assert -1.0 <= pg["diversity"]["ssim_median"] <= 1.0
    assert "patch_gan_above_both_at_every_area" in pg["summary"]
    # the quick budget's 8 steps take the budget-scaled learning rate (the paper's 1e-3 x 200 / 8)
    assert abs(pg["params"]["lr"] - 0.025) < 1e-12
    assert pg["params"]["beta"] == 10.0  # and the diversity weight that keeps the patches apart at a raised rate
    assert all(isinstance(v, dict) and "success_rate" in v for v in attacks.values())
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())


def test_gan_learning_rate_scales_with_a_short_budget_only():
    from guard.audit.patches import gan_learning_rate

    assert (
        gan_learning_rate(200) == 1e-3 and gan_learning_rate(5000) == 1e-3
    )  # the paper's rate at and above the LeNet's budget
    assert abs(gan_learning_rate(40) - 5e-3) < 1e-12  # the CIFAR-10 ResNet-20's budget
    rates = [gan_learning_rate(s) for s in (1, 8, 40, 100, 200)]
    assert rates == sorted(rates, reverse=True)


def test_patch_gan_lr_option_overrides_the_rule(tiny_model, small_split, tmp_path):
    from guard.audit.patches import _settings

    train, test = small_split
    ctx = AuditContext(
        model=tiny_model,
        model_name="tiny",
        train=train,
        test=test,
        data_source="test",
        out=tmp_path,
        options=AuditOptions(quick=True, progress=False, extra={"patch_gan_lr": 0.002}),
    )
    assert _settings(ctx)["gan_lr"] == 0.002
    ctx.options.extra = {"patch_gan_kwargs": {"alpha": 1.0, "lr": 0.004}}
    s = _settings(ctx)
    assert s["gan_lr"] == 0.004 and "lr" not in s["gan"]  # given once, not twice to PatchGAN


def test_a_raised_rate_gets_the_stronger_diversity_weight_unless_the_caller_chose(tiny_model, small_split, tmp_path):
    from guard.audit.patches import GAN_AUDIT_KWARGS, _settings, gan_diversity_weight

    assert gan_diversity_weight(1e-3) == GAN_AUDIT_KWARGS["beta"] == 3.0  # the LeNet's 200 steps: unchanged
    assert gan_diversity_weight(5e-3) == 10.0 and gan_diversity_weight(5e-3, 30.0) == 30.0  # never weaker than asked
    train, test = small_split
    ctx = AuditContext(
        model=tiny_model,
        model_name="tiny",
        train=train,
        test=test,
        data_source="test",
        out=tmp_path,
        options=AuditOptions(quick=True, progress=False, extra={"patch_gan_lr": 1e-3}),
    )
    assert _settings(ctx)["gan"]["beta"] == 3.0
    ctx.options.extra = {
        "patch_gan_kwargs": {"alpha": 1.0, "beta": 2.0}
    }  # raised rate (8 steps), the caller's beta kept
    assert _settings(ctx)["gan"]["beta"] == 2.0
    assert GAN_AUDIT_KWARGS["beta"] == 3.0  # the module default is not mutated by a run
