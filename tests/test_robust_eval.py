"""guard.evaluate_robust / robust_sweep: the figures on models whose answer is known, the flags, bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import ModelSnapshot
from torch import nn

import guard
from guard.robust import ROBUST_ATTACKS, RealClassView, RobustBudget, clopper_pearson, default_attacks

FAST = ("apgd-ce", "guard-apgd-ce")


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def data(demo_split):
    _, test = demo_split
    return test.x[:48], test.y[:48]


class Constant(nn.Module):
    """Always class ``c``, whatever the image (the output does not depend on x: no gradient)."""

    def __init__(self, c: int, classes: int = 10) -> None:
        super().__init__()
        self.register_buffer("logits", torch.full((classes,), -1.0).index_fill_(0, torch.tensor([c]), 5.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1) + 0.0 * x.flatten(1).sum(1, keepdim=True)


class RejectPerturbed(nn.Module):
    """4 classes + reject, closed form, on images whose pixels are all equal when clean.

    Class: the nearest of 0.125, 0.375, 0.625, 0.875 to the image's mean (0.125 apart from the
    boundaries, so a perturbation of at most eps = 0.05 never changes it). Reject logit:
    2e4 * the pixels' variance - 0.5: any perturbation that is not a uniform shift, with a
    standard deviation above 0.005, is rejected. So every attack either does nothing or is
    rejected: robust accuracy with rejection equals clean accuracy, without rejection it falls.
    """

    centers = torch.tensor([0.125, 0.375, 0.625, 0.875])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        m = flat.mean(1, keepdim=True)
        real = -50.0 * (m - self.centers.to(x)) ** 2
        rej = 2e4 * flat.var(1, unbiased=False) - 0.5
        return torch.cat([real, rej[:, None]], 1)


def _toy_data() -> tuple[torch.Tensor, torch.Tensor]:
    values = RejectPerturbed.centers.repeat(6)
    x = values.view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()
    y = torch.arange(4).repeat(6)
    y[:6] = (y[:6] + 1) % 4  # six wrong labels: clean accuracy 0.75
    return x, y


def test_undefended_model_at_a_large_eps_is_zero(tiny_model, data):
    res = guard.evaluate_robust(tiny_model, data, eps=0.5, budget="quick", attacks=FAST)
    assert res["clean_accuracy"] > 0.8
    assert res["robust_accuracy"] == 0.0 and res["robust_accuracy_with_rejection"] == 0.0
    assert res["n"] == 48 and res["reject_model"] is False


def test_plain_model_figures(tiny_model, data):
    snap = ModelSnapshot(tiny_model)
    rng = torch.get_rng_state()
    res = guard.evaluate_robust(tiny_model, data, eps=0.1, budget="quick", seed=1)
    snap.assert_unchanged(tiny_model)
    assert torch.equal(torch.get_rng_state(), rng)  # torchattacks seeds the global RNG: forked
    assert res["attacks"] == list(default_attacks(False))
    # a plain model: the two robust figures coincide; each attack only lowers them
    assert res["robust_accuracy"] == res["robust_accuracy_with_rejection"]
    assert 0.0 < res["robust_accuracy"] < res["clean_accuracy"]
    cumulative = [e["robust_accuracy_with_rejection"] for e in res["per_attack"].values()]
    assert cumulative == sorted(cumulative, reverse=True) and cumulative[-1] == res["robust_accuracy_with_rejection"]
    assert (
        sum(e["broken"] for e in res["per_attack"].values()) == res["counts"]["clean_correct"] - res["counts"]["robust"]
    )
    lo, hi = res["intervals"]["robust_accuracy"]
    assert lo <= res["robust_accuracy"] <= hi
    assert res["checks"]["square_beat_white_box"] is False and res["warnings"] == []
    curves = res["loss_curves"]["guard-apgd-ce"]
    assert 1 <= len(curves["loss"]) <= RobustBudget.quick().curves
    assert all(len(row) == RobustBudget.quick().steps + 1 and None not in row for row in curves["loss"])
    assert all(max(row) >= row[0] for row in curves["loss"])  # APGD-CE raises its loss from the start


def test_constant_right_model_is_fully_robust():
    x = torch.rand(12, 1, 8, 8)
    y = torch.full((12,), 3)
    with pytest.warns(RuntimeWarning, match="zero input gradient"):
        res = guard.evaluate_robust(Constant(3), (x, y), eps=0.5, budget="quick")
    assert (
        res["clean_accuracy"] == 1.0 and res["robust_accuracy"] == 1.0 and res["robust_accuracy_with_rejection"] == 1.0
    )
    assert res["checks"]["zero_gradient_share"] == 1.0


def test_a_model_that_ignores_its_input_entirely():
    class Fixed(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tensor([0.0, 3.0, 0.0, 0.0]).expand(x.shape[0], -1)  # no graph to the input

    x, y = torch.rand(6, 1, 4, 4), torch.ones(6, dtype=torch.long)
    with pytest.warns(RuntimeWarning, match="zero input gradient"):
        res = guard.evaluate_robust(Fixed(), (x, y), eps=0.3, budget="quick", attacks=["guard-apgd-ce"])
    assert res["robust_accuracy"] == 1.0 and res["checks"]["zero_gradient_share"] == 1.0


def test_rejecting_every_perturbed_input_is_safe_but_not_accurate():
    x, y = _toy_data()
    res = guard.evaluate_robust(RejectPerturbed(), (x, y), eps=0.05, budget="quick", real_classes=4)
    assert res["reject_model"] is True and "guard-apgd-reject" in res["attacks"]
    assert res["clean_accuracy"] == 0.75 and res["clean_rejected"] == 0.0
    assert res["robust_accuracy_with_rejection"] == res["clean_accuracy"]
    assert res["robust_accuracy"] < res["clean_accuracy"]
    assert any(e["rejected"] > 0 for e in res["per_attack"].values())
    assert set(res["loss_curves"]) == {"guard-apgd-ce", "guard-apgd-reject"}


def test_reject_aware_attack_breaks_what_the_real_class_view_misses():
    # the lever toy of test_attacks_apgd: CE climbs into the reject class; the reject margin does not
    from test_attacks_apgd import LeverToy

    x = torch.full((16, 1, 4, 4), 0.5)
    y = torch.zeros(16, dtype=torch.long)
    only_ce = guard.evaluate_robust(
        LeverToy(), (x, y), eps=0.1, budget="quick", real_classes=3, attacks=["guard-apgd-ce"]
    )
    both = guard.evaluate_robust(
        LeverToy(), (x, y), eps=0.1, budget="quick", real_classes=3, attacks=["guard-apgd-ce", "guard-apgd-reject"]
    )
    assert only_ce["robust_accuracy_with_rejection"] == 1.0 and only_ce["robust_accuracy"] == 0.0
    assert both["robust_accuracy_with_rejection"] == 0.0
    assert both["per_attack"]["guard-apgd-reject"]["broken"] == 16


def test_sweep_is_monotone_and_reaches_zero(tiny_model, data):
    sweep = guard.robust_sweep(tiny_model, data, [0.3, 0.0, 0.05, 0.1], budget="quick", attacks=FAST)
    assert sweep["eps"] == [0.0, 0.05, 0.1, 0.3]
    rob = sweep["robust_accuracy_with_rejection"]
    assert rob[0] == sweep["clean_accuracy"]  # nothing moves at eps = 0
    assert all(a >= b for a, b in zip(rob, rob[1:])) and rob[0] > rob[-1]
    assert sweep["checks"] == {"monotone": True, "zero_at_largest": True, "largest_eps": 0.3}


def test_sweep_flags_a_model_that_does_not_reach_zero():
    x = torch.rand(8, 1, 8, 8)
    y = torch.full((8,), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sweep = guard.robust_sweep(Constant(2), (x, y), [0.1, 0.6], budget="quick", attacks=FAST)
    assert sweep["checks"]["zero_at_largest"] is False and sweep["checks"]["monotone"] is True
    assert any("not 0" in w for w in sweep["warnings"])


def test_square_flag_on_a_gradient_masking_model(tiny_model, data):
    class Quantized(nn.Module):
        """Rounds the image to 0/1 first: zero gradients everywhere, but a black-box attack still works."""

        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(torch.round(x))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = guard.evaluate_robust(
            Quantized(tiny_model),
            data,
            eps=0.5,
            budget=RobustBudget(steps=5, restarts=1, n_target_classes=2, fab_steps=5, n_queries=200),
            attacks=["apgd-ce", "square"],
        )
    assert res["checks"]["zero_gradient_share"] == 1.0
    assert res["per_attack"]["square"]["broken"] > 0 and res["checks"]["square_beat_white_box"] is True
    assert any("Square" in str(w.message) for w in caught)


def test_real_class_view():
    model = RejectPerturbed()
    view = RealClassView(model, 4)
    x = torch.full((2, 1, 4, 4), 0.4)
    assert view(x).shape == (2, 4) and torch.equal(view(x), model(x)[:, :4]) and not view.training


def test_clopper_pearson_closed_form():
    # k = 0: the upper end is 1 - (alpha / 2) ** (1 / n); k = n: the lower end is (alpha / 2) ** (1 / n)
    lo, hi = clopper_pearson(0, 10)
    assert lo == 0.0 and math.isclose(hi, 1 - 0.025**0.1, rel_tol=1e-9)
    lo, hi = clopper_pearson(10, 10)
    assert hi == 1.0 and math.isclose(lo, 0.025**0.1, rel_tol=1e-9)
    assert clopper_pearson(0, 0) is None


def test_budget_presets():
    assert RobustBudget().steps == 100 and RobustBudget().n_queries == 5000  # AutoAttack's standard version
    q = RobustBudget.quick()
    assert q.steps < 100 and q.n_queries < 5000
    with pytest.raises(ValueError, match="steps"):
        RobustBudget(steps=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"eps": 1.5}, "eps"),
        ({"eps": -0.01}, "eps"),
        ({"eps": 0.1, "attacks": ["pgd"]}, "unknown attack"),
        ({"eps": 0.1, "attacks": []}, "attacks"),
        ({"eps": 0.1, "attacks": ["guard-apgd-reject"]}, "reject output"),
        ({"eps": 0.1, "n": 1000}, "'n'"),
        ({"eps": 0.1, "budget": "fast"}, "budget"),
        ({"eps": 0.1, "real_classes": 11}, "real_classes"),
    ],
)
def test_bad_arguments(tiny_model, data, kwargs, match):
    with pytest.raises(ValueError, match=match):
        guard.evaluate_robust(tiny_model, data, **kwargs)


def test_bad_data(tiny_model, data):
    x, y = data
    with pytest.raises(ValueError, match="at least one image"):
        guard.evaluate_robust(tiny_model, (x[:0], y[:0]), eps=0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        guard.evaluate_robust(tiny_model, (x * 2 - 0.5, y), eps=0.1)
    with pytest.raises(TypeError, match="model"):
        guard.evaluate_robust(lambda t: t, data, eps=0.1)
    assert set(ROBUST_ATTACKS) >= {"apgd-ce", "apgd-t", "fab-t", "square", "guard-apgd-reject"}


def test_audit_step_writes_the_design_keys_and_a_page_section(tiny_model, small_split, tmp_path):
    from guard.audit import AuditOptions, run_audit, step
    from guard.audit.steps import STEPS

    names = [s.name for s in STEPS]
    assert names.index("robust") == names.index("adaptive") + 1
    train, test = small_split
    rep = run_audit(
        tiny_model,
        train,
        test,
        tmp_path,
        options=AuditOptions(quick=True, progress=False),
        steps=[step("model"), step("robust")],
        fail_fast=True,
    )
    sec = rep["robust"]
    assert {
        "eps",
        "n",
        "clean_accuracy",
        "clean_rejected",
        "robust_accuracy",
        "robust_accuracy_with_rejection",
        "attacks",
    } <= set(sec)
    assert sec["eps"] == pytest.approx(0.3) and sec["n"] == 16 and sec["robust_accuracy"] <= sec["clean_accuracy"]
    assert sec["sweep"]["checks"]["monotone"] is True and sec["sweep"]["checks"]["zero_at_largest"] is True
    html = (tmp_path / "report.html").read_text()
    assert 'id="robust"' in html and "Robust accuracy" in html and "APGD loss per iteration" in html


def test_page_section_of_a_reject_model(tmp_path):
    from guard.report.sections import robust as section
    from guard.report.source import AuditFolder

    node = {
        "eps": 8 / 255,
        "n": 100,
        "clean_accuracy": 0.8,
        "clean_rejected": 0.04,
        "robust_accuracy": 0.3,
        "robust_accuracy_with_rejection": 0.55,
        "attacks": ["guard-apgd-ce", "guard-apgd-reject"],
        "reject_model": True,
        "intervals": {"robust_accuracy_with_rejection": [0.45, 0.65]},
        "per_attack": {
            "guard-apgd-reject": {
                "attacked": 60,
                "broken": 5,
                "rejected": 20,
                "params": {"impl": "guard"},
                "robust_accuracy_with_rejection": 0.55,
                "robust_accuracy": 0.3,
                "seconds": 2.0,
            }
        },
        "warnings": ["Square (black-box) broke 2 image(s)"],
        "loss_curves": {"guard-apgd-reject": {"images": [0], "loss": [[-1.0, -0.5, None]], "loss_name": "reject"}},
    }
    report = {"version": 1, "robust": node}
    sec = section.build(AuditFolder.from_report(tmp_path, report))
    assert sec is not None and sec.id == "robust"
    assert "55.0% [45.0%, 65.0%]" in sec.body and "a rejected attacked image is safe" in sec.body
    assert "Square (black-box) broke 2" in sec.body and "APGD loss per iteration" in sec.body
    assert section.build(AuditFolder.from_report(tmp_path, {"version": 1})) is None


def test_apgd_t_needs_four_classes():
    from test_attacks_apgd import LeverToy

    x, y = torch.full((4, 1, 4, 4), 0.5), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="at least 4 classes"):
        guard.evaluate_robust(LeverToy(), (x, y), eps=0.1, real_classes=3, attacks=["apgd-t"])
    assert "apgd-t" not in default_attacks(True, 3) and "apgd-t" in default_attacks(True, 10)
