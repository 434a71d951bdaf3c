"""The audit's typed settings (guard.audit.settings) and its one vocabulary (guard.core.registry), issue 35.

Mutants these catch: a misspelt ``options.extra`` key silently ignored; a value of the wrong type
accepted (a float step count, a bool image count); a renamed key (an old user's key rejected);
quick mode or the model-cost scaling not applied, or applied again inside a step; settings that
do not survive report.json (a re-run from them giving other figures); an attack or detector name
in a report, the page or the hardening table that the registry does not know.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import pytest

import guard
from guard.audit import AuditOptions, Step, run_audit, step
from guard.audit.settings import AuditSettings, Cost, FeatureSettings, resolve_settings, valid_keys
from guard.audit.step import AttackStep
from guard.audit.steps import STEPS
from guard.core import registry

ROOT = Path(__file__).resolve().parents[1]

#: every key the steps' docstrings documented before issue 35 (none may be renamed)
OLD_KEYS = [
    "eps",
    "heldout_n",
    "patch_areas",
    "patch_train_images",
    "patch_gan_seconds",
    "patch_gan_steps",
    "universal_seconds",
    "universal_steps",
    "patch_loss",
    "patch_gan_kwargs",
    "patch_gan_lr",
    "feature_layer",
    "feature_delta",
    "feature_n",
    "feature_max_iter",
    "feature_curve_layers",
    "feature_curve_deltas",
    "feature_curve_n",
    "feature_curve_max_iter",
    "feature_full",
    "fooling_threshold",
    "fooling_grad_steps",
    "fooling_classes",
    "fooling_grad_samples",
    "fooling_population",
    "fooling_generations",
    "fooling_cppn_hidden",
    "fooling_cppn_add_node",
    "fooling_refine_every",
    "fooling_refine_steps",
    "fooling_polish_steps",
    "fooling_polish_starts",
    "fooling_selection",
    "fooling_transfer",
    "transfer_epochs",
    "combine",
    "flag_with",
    "adaptive",
    "adaptive_n",
    "adaptive_steps",
    "adaptive_eps",
    "adaptive_restarts",
    "adaptive_weights",
    "adaptive_members",
    "robust",
    "robust_eps",
    "robust_n",
    "robust_budget",
    "robust_restarts",
    "robust_sweep",
    "certified",
    "certified_n",
    "certified_patch_area",
    "certified_k",
    "harden_rounds",
    "harden_epochs_per_round",
    "harden_reject_share",
    "harden_attacks",
]


def _resolve(extra=None, quick=False, **cost):
    return resolve_settings(extra or {}, quick=quick, seed=0, cost=Cost(**{"n_test": 2000, **cost}))


def test_every_documented_key_is_still_valid_and_every_key_has_a_doc():
    keys = valid_keys()
    assert sorted(set(OLD_KEYS) - set(keys)) == []
    from guard.audit.settings import _STEPS

    for cls in _STEPS.values():
        if hasattr(cls, "docs"):
            assert all(isinstance(d, str) and d and "\n" not in d for d in cls.docs().values()), cls


@pytest.mark.parametrize(
    "key,close",
    [
        ("fooling_treshold", "fooling_threshold"),
        ("patch_area", "patch_areas"),
        ("adaptve_n", "adaptive_n"),
        ("harden_round", "harden_rounds"),
    ],
)
def test_an_unknown_key_raises_with_the_closest_valid_one(key, close):
    with pytest.raises(ValueError) as err:
        _resolve({key: 1})
    msg = str(err.value)
    assert (
        repr(key) in msg and f"Did you mean {close!r}" in msg and "fooling_threshold" in msg
    )  # the valid keys are listed


def test_run_audit_refuses_an_unknown_key_before_any_step(tiny_model, small_split, tmp_path):
    train, test = small_split
    ran = []

    class Spy(Step):
        name = "model"

        def run(self, ctx):
            ran.append(1)

    with pytest.raises(ValueError, match="feature_nn"):
        run_audit(tiny_model, train, test, tmp_path, steps=[Spy()], options=AuditOptions(extra={"feature_nn": 8}))
    assert ran == [] and not (tmp_path / "report.json").exists()


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("fooling_threshold", "high", "float"),
        ("feature_n", 3.0, "int"),
        ("adaptive_n", True, "int"),
        ("patch_areas", 0.05, "list of float"),
        ("fooling_transfer", 1, "bool"),
        ("harden_rounds", "3", "int"),
        ("patch_gan_kwargs", [1], "dict"),
        ("adaptive_members", "pgd", "list of str"),
    ],
)
def test_a_wrong_type_raises_naming_key_expected_and_got(key, value, expected):
    with pytest.raises(TypeError) as err:
        _resolve({key: value})
    msg = str(err.value)
    assert repr(key) in msg and expected in msg and type(value).__name__ in msg


def test_a_bad_value_of_the_right_type_raises():
    with pytest.raises(ValueError, match="flag_with"):
        _resolve({"flag_with": "mine"})


def test_quick_and_full_resolution_and_overrides_win_in_both():
    full, quick = _resolve(), _resolve(quick=True)
    assert (full.fooling.generations, quick.fooling.generations) == (1500, 5)
    assert (full.patches.gan_steps, quick.patches.gan_steps) == (200, 8)
    assert (full.patches.areas, quick.patches.areas) == ((0.01, 0.02, 0.05, 0.1), (0.05, 0.2))
    assert (full.detectors.train_images, quick.detectors.train_images) == (None, 1000)
    assert (full.heldout.n, quick.heldout.n) == (500, 64) and (full.robust.budget, quick.robust.budget) == (
        "audit",
        "quick",
    )
    assert (full.harden.config.rounds, quick.harden.config.rounds) == (3, 1)
    for q in (False, True):
        s = _resolve({"fooling_generations": 7, "patch_gan_steps": 11, "harden_rounds": 2, "eps": 0.1}, quick=q)
        assert s.fooling.generations == 7 and s.patches.gan_steps == 11 and s.harden.config.rounds == 2
        assert (
            s.gradient.eps == s.heldout.eps == s.robust.eps == 0.1
        )  # the shared budget reaches every step that reads it
    assert _resolve({"eps": 0.1, "robust_eps": 0.2}).robust.eps == 0.2


def test_derived_fields_follow_the_fields_they_derive_from():
    assert _resolve(quick=True).patches.gan_lr == pytest.approx(1e-3 * 200 / 8)  # the learning-rate rule at 8 steps
    assert _resolve({"patch_gan_steps": 400}).patches.gan_lr == 1e-3
    s = _resolve({"feature_full": True, "feature_n": 30, "feature_max_iter": 9})
    assert (s.features.curve_n, s.features.curve_max_iter) == (30, 9)
    assert _resolve({"feature_delta": 0.2}, quick=True).features.curve_deltas == (0.2,)


def test_scaling_by_model_cost():
    lenet, resnet = _resolve(work_scale=1.0), _resolve(work_scale=0.095)
    assert (lenet.patches.gan_steps, resnet.patches.gan_steps) == (200, 40)  # 19 rounds up to the minimum
    assert (lenet.fooling.polish_steps, resnet.fooling.polish_steps) == (300, 300)  # min(300, 3200 x 0.095 = 304)
    assert _resolve(work_scale=0.05).fooling.polish_steps == 160
    assert (lenet.adaptive.steps, _resolve(work_scale=0.6).adaptive.steps) == (50, 30)
    assert (lenet.fooling.grad_batch_size, resnet.fooling.grad_batch_size) == (None, 32)
    assert _resolve(work_scale=0.5, n_test=2000).patches.test_images == 1000
    assert _resolve(quick=True, work_scale=0.25).gradient.images == 128
    # a caller's own value is never scaled
    assert _resolve({"adaptive_steps": 50}, work_scale=0.1).adaptive.steps == 50


def test_no_step_scales_or_reads_options_by_itself():
    """Quick mode, the model-cost scaling and the keys live in the settings module only."""
    allowed = {"settings.py", "settings_base.py", "step.py", "runner.py"}
    for path in sorted((ROOT / "guard" / "audit").glob("*.py")):
        if path.name in allowed:
            continue
        text = path.read_text()
        for pattern in (
            r"ctx\.options\.extra",
            r"\.scaled\(",
            r"work_scale",
            r"options\.quick\s+(if|else|and|or)|if .*options\.quick",
        ):
            assert not re.search(pattern, text), f"{path.name} matches {pattern!r}"


def test_settings_round_trip_through_json():
    for q in (False, True):
        s = _resolve(
            {"patch_gan_kwargs": {"alpha": 2.0, "lr": 0.01}, "adaptive_eps": [0.1, 0.2], "harden_attacks": ["pgd"]},
            quick=q,
        )
        back = AuditSettings.from_dict(json.loads(json.dumps(s.to_dict())))
        assert back == s
    full = _resolve().to_dict()
    with pytest.raises(ValueError, match="unknown attacks_fooling setting"):
        AuditSettings.from_dict({**full, "fooling": {"treshold": 0.5}})
    with pytest.raises(TypeError, match="fooling_threshold"):
        AuditSettings.from_dict({**full, "fooling": {**full["fooling"], "threshold": "x"}})
    with pytest.raises(ValueError, match="missing \\['robust'\\]"):
        AuditSettings.from_dict({k: v for k, v in full.items() if k != "robust"})


TINY = {
    "feature_n": 6,
    "feature_max_iter": 2,
    "feature_curve_n": 4,
    "feature_curve_max_iter": 2,
    "fooling_grad_steps": 3,
    "fooling_generations": 2,
    "fooling_population": 10,
    "fooling_transfer": False,
    "fooling_classes": 3,
}
TINY_STEPS = ("model", "attacks_gradient", "attacks_features", "attacks_fooling", "detectors")


def _load_compare():
    spec = importlib.util.spec_from_file_location("compare_reports", ROOT / "tools" / "compare_reports.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_a_rerun_from_report_settings_gives_the_same_figures(tiny_model, small_split, tmp_path, one_thread):
    train, test = small_split
    train, test = guard.Split(train.x[:300], train.y[:300]), guard.Split(test.x[:80], test.y[:80])
    steps = [step(n) for n in TINY_STEPS]
    first = run_audit(
        tiny_model,
        train,
        test,
        tmp_path / "a",
        steps=steps,
        options=AuditOptions(quick=True, export=False, progress=False, seed=3, extra=dict(TINY)),
    )
    rec = json.loads((tmp_path / "a" / "report.json").read_text())["settings"]
    assert (
        rec["seed"] == 3
        and rec["quick"] is True
        and rec["steps"]["features"]["n"] == 6
        and rec["steps"]["fooling"]["classes"] == 3
    )
    again = run_audit(
        tiny_model,
        train,
        test,
        tmp_path / "b",
        steps=steps,
        options=AuditOptions(
            quick=rec["quick"],
            export=rec["export"],
            progress=False,
            seed=rec["seed"],
            settings=AuditSettings.from_dict(rec["steps"]),
        ),
    )
    assert again["settings"] == first["settings"]
    cmp = _load_compare()
    report_diffs, _, n = cmp.compare_reports(first, again)
    tensor_diffs, m = cmp.compare_tensors(tmp_path / "a", tmp_path / "b")
    assert n > 500 and m > 20 and report_diffs == [] and tensor_diffs == []
    # and the comparison itself is not blind: another seed changes figures
    other = run_audit(
        tiny_model,
        train,
        test,
        tmp_path / "c",
        steps=steps[:2],
        options=AuditOptions(
            quick=True, export=False, progress=False, seed=4, settings=AuditSettings.from_dict(rec["steps"])
        ),
    )
    assert cmp.compare_reports(first, other)[0]
    registry.check_report_names(first)  # every attack and detector name of the report is registered


def test_settings_and_extra_together_are_refused(tiny_model, small_split, tmp_path):
    train, test = small_split
    with pytest.raises(ValueError, match="both"):
        run_audit(
            tiny_model,
            train,
            test,
            tmp_path,
            steps=[step("model")],
            options=AuditOptions(extra={"feature_n": 3}, settings=AuditSettings()),
        )


def test_cli_settings_file_gives_run_audit_those_settings(tmp_path, monkeypatch):
    import guard.audit
    from guard.cli import main

    s = _resolve({"fooling_generations": 9}, quick=True)
    rec = {
        "seed": 5,
        "quick": True,
        "harden": False,
        "export": False,
        "repetitions": 3,
        "threads": 1,
        "steps": s.to_dict(),
    }
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"version": 1, "settings": rec}))
    seen = {}

    def fake(model, train, test, out, **kw):
        seen.update(kw)
        return {}

    monkeypatch.setattr(guard.audit, "run_audit", fake)
    assert main(["audit", "--demo", "--settings", str(path), "--out", str(tmp_path / "o"), "-q"]) == 0
    opts = seen["options"]
    assert (opts.seed, opts.quick, opts.export, opts.repetitions, opts.extra) == (5, True, False, 3, {})
    assert opts.settings == s and opts.settings.fooling.generations == 9
    assert main(["audit", "--demo", "--settings", str(path), "--seed", "6", "--out", str(tmp_path / "o"), "-q"]) == 2
    path.write_text(json.dumps({"version": 1, "model": {}}))
    assert main(["audit", "--demo", "--config", str(path), "--out", str(tmp_path / "o"), "-q"]) == 2


# ---------------------------------------------------------------- the registry


def test_every_audit_step_writes_registered_names_only():
    for s in STEPS:
        if isinstance(s, AttackStep):
            assert s.attack_names == registry.attack_names(step=s.name), s.name
    assert {a.step for a in registry.ATTACK_INFO} <= {s.name for s in STEPS}
    from guard.audit.detectors import ANCHORS
    from guard.guarded import DEFAULT_DETECTORS

    assert set(DEFAULT_DETECTORS) == set(registry.detector_names(role="own"))
    assert set(DEFAULT_DETECTORS) | set(ANCHORS) | {registry.COMBINED} == set(registry.detector_names(in_audit=True))


def test_the_library_the_page_and_hardening_read_the_registry():
    from guard.attacks import ATTACKS
    from guard.detectors import DETECTORS
    from guard.report.text import ATTACK_SHORT, ATTACK_TITLES
    from guard.training.round_attacks import DEFAULT_ATTACKS, ROUND_ATTACKS, AttackBudget, round_attack_table

    names = set(registry.attack_names())
    assert set(ATTACK_TITLES) == set(ATTACK_SHORT) == names
    assert set(ROUND_ATTACKS) == set(registry.attack_names(round_attack=True)) and set(DEFAULT_ATTACKS) <= set(
        ROUND_ATTACKS
    )
    assert set(round_attack_table(AttackBudget.quick(), num_classes=10, seed=0)) == set(ROUND_ATTACKS)
    assert set(DETECTORS) == set(registry.detector_names()) - {registry.COMBINED}
    classes = set(ATTACKS.values())
    for info in registry.ATTACK_INFO:
        module, cls = info.implementation.rsplit(".", 1)
        if module == "guard.attacks":
            assert getattr(guard.attacks, cls) in classes, info.name


def test_an_unregistered_name_fails():
    with pytest.raises(ValueError, match="Did you mean 'pgd'"):
        registry.check_report_names({"attacks": {"pgdd": {}}})
    with pytest.raises(ValueError, match="unknown detector name 'knm'"):
        registry.check_report_names({"detectors": {"knm": {"pgd": {}}}})
    with pytest.raises(ValueError, match="unknown attack name 'mine'"):
        registry.check_report_names({"detectors": {"knn": {"mine": {}}}})
    registry.check_report_names(
        {
            "attacks": {n: {} for n in registry.attack_names()},
            "detectors": {d: {"fgsm": {}} for d in registry.detector_names()},
        }
    )


def test_a_step_writing_an_unregistered_name_is_recorded_as_failed(tiny_model, small_split, tmp_path):
    train, test = small_split

    class Rogue(Step):
        name = "rogue"

        def run(self, ctx):
            ctx.report.setdefault("attacks", {})["my_attack"] = {"success_rate": 1.0}

    rep = run_audit(tiny_model, train, test, tmp_path, steps=[Rogue()])
    assert "rogue" in rep["errors"] and "my_attack" in rep["errors"]["rogue"] and "rogue" not in rep["_completed_steps"]


def test_feature_settings_defaults_are_the_library_variants():
    from guard.attacks.feature_adversary import VARIANTS

    assert FeatureSettings().curve_variants == tuple(VARIANTS)
    assert all(dataclasses.is_dataclass(getattr(AuditSettings(), f.name)) for f in dataclasses.fields(AuditSettings))
