"""Feature adversaries (Sabour et al. 2016) and the representation measures."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from guard.attacks.feature_adversary import VARIANTS, FeatureAdversary, feature_objective, sample_guides
from guard.attacks.representation import (
    active_units,
    distance_ratio,
    knn_rank_analysis,
    label_agreement,
    representation_report,
)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """These are many tiny ops: see conftest.one_thread."""


@pytest.fixture(scope="module")
def pairs(demo_split):
    """16 test sources and guides of another true class (test split, seeded)."""
    _, test = demo_split
    x, y = test.x[:12], test.y[:12]
    gi = sample_guides(y, test.y[100:300], seed=0)
    return x, y, test.x[100:300][gi]


@pytest.mark.parametrize("variant", VARIANTS)
def test_box_constraint_and_range(tiny_model, pairs, variant):
    x, y, g = pairs
    delta = 0.1
    res = FeatureAdversary(layer="fc1", delta=delta, variant=variant, max_iter=8).generate(tiny_model, x, g, y=y)
    assert res.x_adv.shape == x.shape and res.x_adv.dtype == torch.float32
    assert float((res.x_adv - x).abs().max()) <= delta + 1e-6
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    assert torch.equal(res.extras["guide"], g)
    assert torch.equal(res.y, y)


def test_lbfgs_decreases_objective_and_distance_ratio_below_one(tiny_model, pairs):
    x, y, g = pairs
    res = FeatureAdversary(layer="fc1", delta=0.3, max_iter=25).generate(tiny_model, x, g, y=y)
    ex = res.extras
    assert bool((ex["objective_end"] < ex["objective_start"]).all())
    assert bool((ex["distance_ratio"] < 1.0).all())
    assert float(ex["distance_ratio"].median()) < 0.8
    # success is exactly "the model labels the adversary like its guide"
    with torch.no_grad():
        assert torch.equal(res.success, tiny_model(res.x_adv).argmax(1) == tiny_model(g).argmax(1))
    # the reported ratio matches the one recomputed by the representation module
    rep = representation_report(tiny_model, "fc1", x, res.x_adv, g)
    torch.testing.assert_close(rep["per_image"]["distance_ratio"], ex["distance_ratio"], rtol=1e-4, atol=1e-5)


def test_lbfgs_beats_one_signed_step(tiny_model, pairs):
    x, y, g = pairs
    full = FeatureAdversary(layer="conv2", delta=0.2, max_iter=20).generate(tiny_model, x, g)
    step = FeatureAdversary(layer="conv2", delta=0.2, variant="feature-fgrad").generate(tiny_model, x, g)
    assert float(full.extras["objective_end"].sum()) < float(step.extras["objective_end"].sum())


def test_fgrad_is_one_signed_step_projected(tiny_model, pairs):
    x, _, g = pairs
    delta = 0.05
    res = FeatureAdversary(layer="fc1", delta=delta, variant="feature-fgrad").generate(tiny_model, x, g)
    moved = (res.x_adv - x).abs()
    inside = (x > delta) & (x < 1 - delta)
    # away from the [0, 1] walls every pixel with a non-zero gradient moved by exactly delta
    frac = float((moved[inside] > delta - 1e-6).float().mean())
    assert frac > 0.5
    assert float(moved.max()) <= delta + 1e-6


def test_gradient_matches_finite_differences(tiny_model, pairs):
    x, _, g = pairs
    model = copy.deepcopy(tiny_model).double()
    from guard.core.features import extract_features

    _, fg = extract_features(model, g[:2].double(), ["conv2"])
    fun = feature_objective(model, "conv2", fg["conv2"], tuple(x[:2].shape))
    # an interior point without ties: MNIST's constant background makes exact max-pool ties,
    # where the function has kinks and finite differences disagree with any subgradient.
    noise = torch.rand(x[:2].shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = (0.6 * x[:2].double() + 0.2 + 0.1 * noise).numpy().ravel().copy()
    f0, grad = fun(z)
    rng = np.random.default_rng(0)
    for _ in range(3):
        v = rng.normal(size=z.shape)
        v /= np.linalg.norm(v)
        eps = 1e-5
        fd = (fun(z + eps * v)[0] - fun(z - eps * v)[0]) / (2 * eps)
        assert abs(fd - float(grad @ v)) <= 1e-4 * max(1.0, abs(fd))
    assert f0 > 0


def test_standard_call_samples_guides_of_another_label(tiny_model, pairs):
    x, _, _ = pairs
    attack = FeatureAdversary(layer="fc1", delta=0.1, variant="feature-fgrad", seed=3)
    res = attack(tiny_model, x)
    assert bool((res.extras["guide_label"] != res.y).all())
    assert torch.equal(res.extras["guide"], x[res.extras["guide_index"]])
    again = attack(tiny_model, x)
    assert torch.equal(again.extras["guide_index"], res.extras["guide_index"])


def test_sample_guides_target_and_errors():
    y = torch.tensor([0, 1, 2, 0])
    pool = torch.tensor([1, 1, 2, 0, 2])
    idx = sample_guides(y, pool, seed=0)
    assert bool((pool[idx] != y).all())
    idx_t = sample_guides(y, pool, target=torch.tensor([2, 2, 0, 1]), seed=0)
    assert pool[idx_t].tolist() == [2, 2, 0, 1]
    with pytest.raises(ValueError, match="no guide candidate"):
        sample_guides(torch.tensor([3]), pool, target=torch.tensor([7]))


def test_model_not_mutated(tiny_model, pairs):
    x, _, g = pairs
    tiny_model.train()
    before = [p.requires_grad for p in tiny_model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in tiny_model.parameters()]
    try:
        FeatureAdversary(layer="conv2", delta=0.1, max_iter=3).generate(tiny_model, x[:4], g[:4])
        assert tiny_model.training
        assert [p.requires_grad for p in tiny_model.parameters()] == before
        for p, g0 in zip(tiny_model.parameters(), grads):  # gradients w.r.t. the input only
            assert (p.grad is None) if g0 is None else torch.equal(p.grad, g0)
    finally:
        tiny_model.eval()


def test_bad_input_errors(tiny_model, pairs):
    x, _, g = pairs
    with pytest.raises(ValueError, match="guides must have the same shape"):
        FeatureAdversary(layer="fc1").generate(tiny_model, x, g[:3])
    with pytest.raises(ValueError, match="delta"):
        FeatureAdversary(layer="fc1", delta=0.0)
    with pytest.raises(ValueError, match="delta"):
        FeatureAdversary(layer="fc1", delta=-0.1)
    with pytest.raises(ValueError, match="Unknown layer name 'fc9'"):
        FeatureAdversary(layer="fc9").generate(tiny_model, x, g)
    with pytest.raises(ValueError, match="variant"):
        FeatureAdversary(layer="fc1", variant="cw")
    with pytest.raises(ValueError, match="max_iter"):
        FeatureAdversary(layer="fc1", max_iter=0)
    with pytest.raises(ValueError, match="at least 2 images"):
        FeatureAdversary(layer="fc1")(tiny_model, x[:1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        FeatureAdversary(layer="fc1").generate(tiny_model, x, g * 2)
    with pytest.raises(TypeError, match="model"):
        FeatureAdversary(layer="fc1").generate("model", x, g)  # type: ignore[arg-type]


def test_representation_closed_forms():
    a = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    s = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    g = torch.tensor([[2.0, 0.0], [3.0, 4.0]])
    torch.testing.assert_close(distance_ratio(a, s, g), torch.tensor([0.5, 0.0]))
    au = active_units(torch.tensor([[1.0, 0.0, 2.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    torch.testing.assert_close(au["iou"], torch.tensor([1 / 3]))
    torch.testing.assert_close(au["sparsity_a"], torch.tensor([0.5]))
    assert label_agreement(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 0])) == 0.5


def test_knn_rank_analysis_identity_and_outlier():
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(200, 5, generator=gen)
    labels = torch.zeros(200, dtype=torch.long)
    guide = train[:4] + 0.01
    same = knn_rank_analysis(guide, guide, torch.zeros(4, dtype=torch.long), train, labels, k=3)
    assert same["nn_intersection"].tolist() == [3, 3, 3, 3]
    assert same["rank_difference"].abs().max() == 0
    far = knn_rank_analysis(guide + 50.0, guide, torch.zeros(4, dtype=torch.long), train, labels, k=3)
    assert bool((far["rank_adv"] == 100.0).all()) and bool((far["rank_difference"] > 0).all())
    with pytest.raises(ValueError, match="k="):
        knn_rank_analysis(
            guide,
            guide,
            torch.ones(4, dtype=torch.long),
            train,
            torch.cat([labels[:-2], torch.ones(2, dtype=torch.long)]),
            k=3,
        )


def test_audit_step_quick(tiny_model, demo_split, tmp_path):
    from guard.audit import AuditOptions, run_audit, step

    train, test = demo_split
    opts = AuditOptions(quick=True, progress=False, extra={"feature_n": 12})
    report = run_audit(tiny_model, train, test, tmp_path, options=opts, steps=[step("attacks_features")])
    e = report["attacks"]["feature_adversary"]
    assert e["n"] == 12
    assert e["linf_max"] <= e["delta"] + 1e-6
    # success = the model labels the adversary as it labels the guide: recomputed from the saved images
    from guard.core.cache import load_tensors

    saved, _ = load_tensors(tmp_path / "artifacts" / "attack_feature_adversary.safetensors")
    with torch.no_grad():
        adv_label = tiny_model(saved["x_adv"]).argmax(1)
    assert torch.equal(adv_label, saved["adv_label"])
    assert e["success_rate"] == pytest.approx(float((adv_label == saved["guide_label"]).float().mean()))
    assert (
        e["success_rate"] == e["guide_label_agreement"] and e["success_rate"] >= 0.5
    )  # a guide's label is usually reached
    assert e["distance_ratio"]["median"] < 1.0
    assert set(e["curves"]["by_layer"][e["layer"]]) == {"lbfgs", "feature-fgrad"}
    assert {"nn_intersection", "rank_difference", "iou_adv_guide"} <= set(e["representation"])
    assert (tmp_path / "artifacts" / "attack_feature_adversary.safetensors").is_file()


def test_representation_report_keeps_guides_of_classes_without_training_references(tiny_model, demo_split):
    # a guide class with <= k training images (a 1,000-class model on a few hundred images) gets
    # NaN kNN measures and is counted; the other rows are measured exactly as with full references
    _, test = demo_split
    x = test.x[:12]
    with torch.no_grad():
        pred = tiny_model(x).argmax(1)
    missing = int(pred[0])
    full = representation_report(tiny_model, "fc2:input", x, x, x, train_x=test.x[100:600], train_y=test.y[100:600])
    keep = test.y[100:600] != missing
    cut = representation_report(
        tiny_model, "fc2:input", x, x, x, train_x=test.x[100:600][keep], train_y=test.y[100:600][keep]
    )
    per = cut["per_image"]
    assert (~per["has_reference"]).tolist() == (pred == missing).tolist()
    assert cut["summary"]["n_without_reference"] == int((pred == missing).sum()) >= 1
    assert bool(per["rank_adv"][pred == missing].isnan().all())
    others = pred != missing
    assert torch.equal(per["nn_intersection"][others], full["per_image"]["nn_intersection"][others].float())
    assert not bool(per["rank_guide"][others].isnan().any())
