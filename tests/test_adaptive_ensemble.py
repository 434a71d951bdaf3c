"""The adaptive attacker worth the name: misclassify first, then evade; sweep, restart, keep the best.

OrthogonalPGD (Bryniarski et al. 2022), LogitMatching (Sabour et al. 2016; Tramer et al. 2020),
AdaptiveEnsemble and guard.adaptive_eval.evaluate_adaptive on tiny models with fixed seeds.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ModelSnapshot
from planted_detectors import TotalVariation

import guard
import guard.adaptive_eval as ae
from guard.adaptive_eval import clopper_pearson, evaluate_adaptive
from guard.attacks import AdaptiveEnsemble, AdaptivePGD, LinfPGD, LogitMatching, OrthogonalPGD
from guard.attacks.adaptive import BestIterate, resolve_eot, stochastic_parts
from guard.attacks.fooling_gradient import total_variation

#: many small ops: a second thread only spin-waits (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread_module")


class NoisyTotalVariation(TotalVariation):
    """The planted detector with randomness at serving time (as a randomised defence has)."""

    name = "noisy_tv"

    def score_batch(self, batch):
        return total_variation(batch.x) + 0.01 * torch.randn(batch.x.shape[0])


@pytest.fixture(scope="module")
def guarded_tv(tiny_model, small_split):
    train, test = small_split
    return guard.wrap(tiny_model, {"tv": TotalVariation()}).fit(train).calibrate(test.x[:128], fpr=0.05)


@pytest.fixture(scope="module")
def guarded_default(tiny_model, small_split):
    train, test = small_split
    return guard.wrap(tiny_model).fit(train).calibrate(test.x[:128], fpr=0.05)


def _verdict(guarded, x_adv, y):
    out = guarded(x_adv)
    mis = out.logits.argmax(1) != y
    return float(mis.float().mean()), float((mis & ~out.flagged).float().mean())


@pytest.mark.parametrize("variant", ["orthogonal", "selective"])
def test_orthogonal_pgd_misclassifies_first_then_evades_the_detector(guarded_tv, tiny_model, small_split, variant):
    _, test = small_split
    x, y = test.x[128:192], test.y[128:192]
    snap = ModelSnapshot(tiny_model)
    plain = LinfPGD(eps=0.3, steps=30, seed=0)(tiny_model, x, y)
    res = OrthogonalPGD(guarded=guarded_tv, eps=0.3, steps=30, variant=variant, seed=0)(tiny_model, x, y)
    snap.assert_unchanged(tiny_model)
    assert float((res.x_adv - x).abs().amax()) <= 0.3 + 1e-6 and float(res.x_adv.min()) >= 0.0
    mis_plain, ev_plain = _verdict(guarded_tv, plain.x_adv, y)
    mis, ev = _verdict(guarded_tv, res.x_adv, y)
    assert mis >= mis_plain - 0.05, (mis, mis_plain)  # it attacks first: misclassification as high as plain PGD's
    assert ev > ev_plain + 0.2, (ev, ev_plain)  # and then gets past the detector far more often
    out = guarded_tv(res.x_adv)  # success means exactly "misclassified and not flagged" by the real model
    torch.testing.assert_close(res.success, (out.logits.argmax(1) != y) & ~out.flagged)


def test_orthogonal_pgd_misclassifies_as_often_as_plain_pgd_against_the_default_detectors(
    guarded_default, tiny_model, small_split
):
    """The one-loss AdaptivePGD misclassified 9.5% of the demo digits at 0.3 (plain PGD 100%):
    the orthogonal attack must not trade misclassification away (eps 0.1: plain PGD is not at 100%)."""
    _, test = small_split
    x, y = test.x[128:192], test.y[128:192]
    plain = LinfPGD(eps=0.1, steps=20, seed=0)(tiny_model, x, y)
    res = OrthogonalPGD(guarded=guarded_default, eps=0.1, steps=20, seed=0)(tiny_model, x, y)
    mis_plain, ev_plain = _verdict(guarded_default, plain.x_adv, y)
    mis, ev = _verdict(guarded_default, res.x_adv, y)
    assert mis_plain > 0.2 and mis >= mis_plain - 0.05, (mis, mis_plain)
    assert ev >= ev_plain, (ev, ev_plain)


def test_the_ensemble_is_never_below_plain_pgd_on_the_same_images(guarded_default, tiny_model, small_split):
    _, test = small_split
    x, y = test.x[128:176], test.y[128:176]
    res = AdaptiveEnsemble(
        guarded=guarded_default,
        eps=0.1,
        steps=8,
        weights=[1.0],
        restarts=1,
        guides=test.x[192:256],
        guide_labels=test.y[192:256],
        seed=0,
    )(tiny_model, x, y)
    names = res.extras["members"]
    assert names[:2] == ["pgd", "pgd_full"] and {"orthogonal", "selective", "logit_matching", "weighted_1_r0"} <= set(
        names
    )
    mis, ev = _verdict(guarded_default, res.x_adv, y)
    for name, fig in res.extras["per_member"].items():
        # per image the best result wins, so neither rate can fall below any member's alone
        assert ev >= fig["evasion"] - 1e-9 and mis >= fig["misclassified"] - 1e-9, (name, fig, ev, mis)
    # per image: an evaded image stays evaded, and the chosen member's result is the one returned
    pgd = LinfPGD(eps=0.1, steps=8, seed=0)(tiny_model, x, y)
    out_pgd = guarded_default(pgd.x_adv)
    pgd_evaded = (out_pgd.logits.argmax(1) != y) & ~out_pgd.flagged
    assert bool((res.success | ~pgd_evaded).all())
    assert float((res.x_adv - x).abs().amax()) <= 0.1 + 1e-6


def test_best_iterate_prefers_evaded_then_misclassified_then_the_lowest_score():
    x = torch.zeros(4, 1, 2, 2)
    best = BestIterate(x)
    idx = torch.arange(4)
    best.update(
        idx,
        x + 0.1,
        mis=torch.tensor([True, True, False, True]),
        flagged=torch.tensor([True, False, True, True]),
        score=torch.tensor([5.0, 9.0, 1.0, 3.0]),
    )
    taken = best.update(
        idx,
        x + 0.2,
        mis=torch.tensor([True, True, True, False]),
        flagged=torch.tensor([False, True, True, False]),
        score=torch.tensor([7.0, 0.5, 8.0, 0.1]),
    )
    # 0: now evaded (beats flagged); 1: already evaded, a flagged one never replaces it; 2: now misclassified;
    # 3: misclassified-but-flagged beats correctly-classified-unflagged
    assert taken.tolist() == [True, False, True, False]
    assert best.evaded.tolist() == [True, True, False, False] and best.misclassified.tolist() == [
        True,
        True,
        True,
        True,
    ]
    taken = best.update(
        idx,
        x + 0.3,
        mis=torch.ones(4, dtype=torch.bool),
        flagged=torch.tensor([False, False, True, True]),
        score=torch.tensor([6.0, 9.5, 9.0, 2.0]),
    )
    assert taken.tolist() == [True, False, False, True]  # the lower combined score wins among equals
    assert torch.allclose(best.x[:, 0, 0, 0], torch.tensor([0.3, 0.1, 0.2, 0.3]))


def test_logit_matching_takes_accepted_guides_of_another_class(guarded_tv, tiny_model, small_split):
    _, test = small_split
    x, y = test.x[128:160], test.y[128:160]
    guides, labels = test.x[160:256], test.y[160:256]
    res = LogitMatching(guarded=guarded_tv, guides=guides, guide_labels=labels, eps=0.3, steps=30, seed=0)(
        tiny_model, x, y
    )
    gi = res.extras["guide_index"]
    used = gi >= 0
    assert bool(used.all()) and bool((labels[gi] != y).all())
    out = guarded_tv(guides[gi])
    assert bool((out.logits.argmax(1) == labels[gi]).all()) and not bool(out.flagged.any())  # only accepted guides
    assert float((res.x_adv - x).abs().amax()) <= 0.3 + 1e-6
    mis, _ = _verdict(guarded_tv, res.x_adv, y)
    assert mis >= 0.5, mis  # the network sees the guide's class


def test_eot_is_used_exactly_when_the_guarded_model_is_random(guarded_tv, tiny_model, small_split):
    train, test = small_split
    noisy = guard.wrap(tiny_model, {"noisy_tv": NoisyTotalVariation()}).fit(train).calibrate(test.x[:128], fpr=0.05)
    x = test.x[128:144]
    assert stochastic_parts(guarded_tv, x) == []
    assert stochastic_parts(noisy, x) == ["noisy_tv"]
    assert resolve_eot("auto", guarded_tv, x, "t")[0] == 1 and resolve_eot("auto", noisy, x, "t")[0] == 8
    res = OrthogonalPGD(guarded=noisy, eps=0.3, steps=3, seed=0)(tiny_model, x, test.y[128:144])
    assert res.extras["eot"] == 8 and res.extras["random_parts"] == ["noisy_tv"]


def test_evaluate_adaptive_reports_misclassification_beside_evasion_with_intervals(guarded_default, small_split):
    _, test = small_split
    data = guard.Split(test.x[128:256], test.y[128:256])
    rep = evaluate_adaptive(
        guarded_default,
        data,
        eps=[0.05, 0.1],
        steps=4,
        n=24,
        weights=[1.0],
        restarts=1,
        members=["pgd", "orthogonal", "logit_matching"],
    )
    assert (
        rep["eps"] == 0.1 and rep["n"] == 24 and rep["weights"] == [1.0] and rep["restarts"] == 1 and rep["steps"] == 4
    )
    pred = guarded_default.model(data.x[:24]).argmax(1)
    assert rep["n_correct"] == int((pred == data.y[:24]).sum())
    for e in rep["per_eps"]:
        for key in ("evasion", "misclassified", "evasion_correct", "oblivious_evasion", "oblivious_full_evasion"):
            lo, hi = e[f"{key}_ci95"]
            assert lo <= e[key] <= hi and e[f"{key}_k"] == round(
                e[key] * (e["n_correct"] if key.endswith("correct") else e["n"])
            )
        assert e["evasion"] >= max(e["oblivious_evasion"], e["oblivious_full_evasion"])
        assert e["misclassified"] >= e["evasion"] and e["misclassified"] >= e["oblivious_misclassified"]
        assert set(e["per_member"]) == {"pgd", "pgd_full", "orthogonal", "logit_matching"}
    report = guard.evaluate(
        guarded_default,
        test.x[128:192],
        {},
        adaptive=True,
        eps=0.05,
        steps=2,
        n=8,
        weights=[1.0],
        restarts=1,
        members=["pgd"],
    )
    assert report["adaptive"]["n"] == 8 and report["adaptive"]["per_eps"][0]["eps"] == 0.05


def test_clopper_pearson_matches_the_exact_interval():
    lo, hi = clopper_pearson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.30850, abs=1e-4)
    lo, hi = clopper_pearson(5, 10)
    assert lo == pytest.approx(0.18709, abs=1e-4) and hi == pytest.approx(0.81291, abs=1e-4)
    assert clopper_pearson(10, 10) == [pytest.approx(0.69150, abs=1e-4), 1.0] and clopper_pearson(0, 0) is None


def test_bad_input_is_refused_with_its_name(guarded_tv, tiny_model, small_split):
    _, test = small_split
    with pytest.raises(ValueError, match="'variant'.*Got 'sideways'"):
        OrthogonalPGD(guarded=guarded_tv, eps=0.1, variant="sideways")
    with pytest.raises(ValueError, match="restarts"):
        OrthogonalPGD(guarded=guarded_tv, eps=0.1, restarts=0)
    with pytest.raises(ValueError, match="calibrated GuardedModel"):
        OrthogonalPGD(guarded=tiny_model, eps=0.1)
    with pytest.raises(ValueError, match="'members'"):
        AdaptiveEnsemble(guarded=guarded_tv, eps=0.1, members=["pgd", "magic"])
    with pytest.raises(TypeError, match="'weights'"):
        AdaptiveEnsemble(guarded=guarded_tv, eps=0.1, weights=[])
    with pytest.raises(ValueError, match="weights"):
        AdaptiveEnsemble(guarded=guarded_tv, eps=0.1, weights=[-1.0])
    with pytest.raises(ValueError, match="guides must hold at least one image"):
        LogitMatching(guarded=guarded_tv, guides=test.x[:0], eps=0.1)
    with pytest.raises(ValueError, match="eot"):
        AdaptivePGD(guarded=guarded_tv, eps=0.1, eot=0)
    with pytest.raises(TypeError, match="data must be a Split or a Tensor"):
        evaluate_adaptive(guarded_tv, [1, 2, 3])
    with pytest.raises(ValueError, match="eps must hold budgets >= 0"):
        evaluate_adaptive(guarded_tv, test, eps=[-0.1])
    with pytest.raises(TypeError, match="guarded must be a GuardedModel"):
        evaluate_adaptive(tiny_model, test)
    with pytest.raises(ValueError, match="n"):
        evaluate_adaptive(guarded_tv, test, n=0)


def test_evaluate_adaptive_checkpoint_resumes_budget_by_budget(guarded_tv, small_split, tmp_path, monkeypatch):
    _, test = small_split
    data = guard.Split(test.x[128:200], test.y[128:200])
    kw = {"eps": [0.05, 0.1], "steps": 3, "n": 12, "weights": [1.0], "restarts": 1, "members": ["pgd", "orthogonal"]}
    whole = evaluate_adaptive(guarded_tv, data, **kw)
    path = tmp_path / "budgets.json"
    # the first budget finishes, then the run is killed in the second
    real_put, calls = ae._BudgetStore.put, []

    def put_then_die(self, e, value):
        real_put(self, e, value)
        calls.append(e)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(ae._BudgetStore, "put", put_then_die)
    with pytest.raises(KeyboardInterrupt):
        evaluate_adaptive(guarded_tv, data, checkpoint=path, **kw)
    monkeypatch.setattr(ae._BudgetStore, "put", real_put)
    attacked = []
    real_run = AdaptiveEnsemble.run
    monkeypatch.setattr(AdaptiveEnsemble, "run", lambda self, *a: attacked.append(self.eps) or real_run(self, *a))
    resumed = evaluate_adaptive(guarded_tv, data, checkpoint=path, **kw)
    assert attacked == [0.1]  # the finished budget was read back, not attacked again

    def same(entry):  # JSON's view (tuples become lists), without the wall-clock time
        return {k: v for k, v in json.loads(json.dumps(entry)).items() if k != "seconds"}

    assert [same(e) for e in whole["per_eps"]] == [same(e) for e in resumed["per_eps"]]
    assert whole["evasion"] == resumed["evasion"] and whole["misclassified"] == resumed["misclassified"]
    # another setting may not read this file
    with pytest.raises(ValueError, match="written for other settings"):
        evaluate_adaptive(guarded_tv, data, checkpoint=path, **{**kw, "steps": 4})
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        evaluate_adaptive(guarded_tv, data, checkpoint=path, **kw)
