"""The audit steps attacks_gradient and attacks_patches in quick mode: report keys, shared results, artifacts."""

from __future__ import annotations

import json

import torch

from guard.audit import AuditOptions, run_audit

STEPS = [("attacks_gradient", "guard.audit_gradient:run"), ("attacks_patches", "guard.audit_patches:run")]


def test_quick_audit_steps(tiny_model, small_split, tmp_path):
    train, test = small_split
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    report = run_audit(tiny_model, train, test, tmp_path, options=AuditOptions(quick=True, progress=False, repetitions=2),
                       steps=STEPS)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["attacks"].keys() == report["attacks"].keys()
    attacks = report["attacks"]
    for name in ("fgsm", "pgd", "patch_gan", "universal_patch", "random_patch"):
        entry = attacks[name]
        assert 0.0 <= entry["success_rate"] <= 1.0 and entry["n"] > 0 and entry["seconds"] >= 0 and isinstance(entry["params"], dict)
        art = tmp_path / "artifacts" / f"attack_{name}.safetensors"
        assert art.is_file()
    assert attacks["pgd"]["linf_max"] <= 0.3 + 1e-6
    assert attacks["pgd"]["success_rate"] >= attacks["fgsm"]["success_rate"]
    for name in ("patch_gan", "universal_patch", "random_patch"):
        curve = attacks[name]["curve"]
        assert len(curve) >= 2 and [p["area"] for p in curve] == sorted(p["area"] for p in curve)
        assert all(len(p["rates"]) == 2 and p["std"] >= 0 for p in curve)
    pg = attacks["patch_gan"]
    assert {"class_comparison", "diversity", "latent_interpolation"} <= pg.keys()
    assert -1.0 <= pg["diversity"]["ssim_median"] <= 1.0
    assert "patch_gan_above_both_at_every_area" in attacks["patch_summary"]
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())


def test_shared_results_and_index(tiny_model, small_split, tmp_path):
    from guard.audit import AuditContext
    import guard.audit_patches as ap

    train, test = small_split
    ctx = AuditContext(model=tiny_model, model_name="tiny", train=train, test=test, data_source="test", out=tmp_path,
                       options=AuditOptions(quick=True, progress=False, extra={"patch_areas": [0.1, 0.2]}))
    ap.run(ctx)
    res = ctx.shared["attack_results"]["patch_gan"]
    idx = res.extras["test_index"]
    assert res.x_adv.shape == test.x[idx].shape
    changed = (res.x_adv != test.x[idx]).flatten(1).sum(1)
    side = ctx.report["attacks"]["patch_gan"]["side"]
    assert int(changed.max()) <= side * side
    loaded = ctx.load_artifact("attack_patch_gan")
    assert loaded is not None and torch.equal(loaded[0]["test_index"], idx)
