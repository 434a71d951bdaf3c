"""Fooling images (Nguyen et al. 2015): CPPN genomes, the MAP-Elites archive, evolution, gradient ascent."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from guard.attacks.cppn import (
    ACTIVATIONS,
    Genome,
    MutationRates,
    _add_connection,
    complete_connections,
    mutate,
    random_genome,
    render,
)
from guard.attacks.fooling_evolution import (
    ClassArchive,
    CPPNOptions,
    DirectOptions,
    FoolingEvolution,
    polynomial_mutation,
    transfer_check,
)
from guard.attacks.fooling_gradient import FoolingGradient


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """These are many tiny ops: see conftest.one_thread."""


class Brightness(nn.Module):
    """Closed form: logits (-w (m - 1/2), +w (m - 1/2)) with m the mean pixel.

    Class 1 wants bright images, class 0 dark ones; p >= 0.9999 iff |m - 1/2| >= ln(9999) / (2w).
    """

    def __init__(self, w: float = 40.0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1, keepdim=True) - 0.5
        return torch.cat([-self.w * m, self.w * m], 1)


# -- CPPN ------------------------------------------------------------------------------------


def test_cppn_render_shape_range_determinism():
    g = random_genome(1, rng=np.random.default_rng(0), hidden=3)
    a = render(g, 28)
    assert a.shape == (1, 1, 28, 28) and a.dtype == torch.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, render(g, 28))
    big = render([g, g], 64, 48)
    assert big.shape == (2, 1, 64, 48)
    # the same function at another resolution: corners coincide exactly
    assert torch.allclose(big[0, 0, 0, 0], a[0, 0, 0, 0]) and torch.allclose(big[0, 0, -1, -1], a[0, 0, -1, -1])
    rgb = render(random_genome(3, rng=np.random.default_rng(1)), 16)
    assert rgb.shape == (1, 3, 16, 16)


def test_cppn_seeded_and_mutation_leaves_parent():
    g1 = random_genome(1, rng=np.random.default_rng(5), hidden=2)
    g2 = random_genome(1, rng=np.random.default_rng(5), hidden=2)
    assert g1.to_dict() == g2.to_dict()
    before = g1.to_dict()
    rng = np.random.default_rng(0)
    child = g1
    for _ in range(30):
        child = mutate(child, rng, MutationRates(add_node=0.5, add_connection=0.5))
        child.validate()
    assert g1.to_dict() == before
    assert child.num_hidden > g1.num_hidden
    assert set(child.activations.values()) <= set(ACTIVATIONS)
    back = Genome.from_dict(child.to_dict())
    assert torch.equal(render(back, 20), render(child, 20))


def test_random_genome_extra_connections_stay_acyclic_and_new():
    rng = np.random.default_rng(3)
    base = random_genome(3, rng=np.random.default_rng(3), hidden=6)
    g = random_genome(3, rng=rng, hidden=6, connections=25)
    g.validate()
    pairs = [(int(a), int(b)) for a, b, _ in g.connections]
    assert len(pairs) == len(set(pairs))  # no connection twice
    assert g.order == base.order and len(pairs) == len(base.connections) + 25  # same nodes, 25 more edges
    pos = {n: i for i, n in enumerate(g.order)}
    assert all(pos[a] < pos[b] for a, b in pairs)
    # a DAG over 4 inputs, 1 hidden node and 1 output has 4 + 4 + 1 = 9 forward pairs: the request is capped there
    full = random_genome(1, rng=np.random.default_rng(0), hidden=1, connections=50)
    assert len(full.connections) == 9
    assert torch.equal(render(full, 8), render(Genome.from_dict(full.to_dict()), 8))
    with pytest.raises(ValueError, match="connections"):
        random_genome(1, rng=rng, connections=-1)


def test_cppn_errors():
    with pytest.raises(ValueError, match="empty"):
        render([], 28)
    g = random_genome(1, rng=np.random.default_rng(0))
    bad = g.to_dict()
    bad["connections"].append([4, 0, 1.0])  # output -> input: backwards
    with pytest.raises(ValueError, match="forward"):
        Genome.from_dict(bad)
    with pytest.raises(ValueError, match="add_node"):
        MutationRates(add_node=1.5)


# -- MAP-Elites archive -------------------------------------------------------------------------


def test_archive_child_replaces_every_class_it_beats():
    arc = ClassArchive(3, (1, 1, 2), seed=0)
    imgs = torch.tensor([[0.1, 0.1], [0.2, 0.2], [0.3, 0.3]]).view(3, 1, 1, 2)
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.6, 0.2], [0.3, 0.3, 0.4]])
    arc.add(imgs, probs)
    el = arc.elites()
    assert el["labels"].tolist() == [0, 1, 2]
    assert el["images"][:, 0, 0, 0].tolist() == pytest.approx([0.1, 0.2, 0.3])
    # one child beats the elites of classes 0 and 2 but not 1: it replaces both, class 1 stays
    child = torch.tensor([[0.9, 0.9]]).view(1, 1, 1, 2)
    status = arc.add(child, torch.tensor([[0.55, 0.05, 0.45]]))
    assert status.tolist() == [[1, 0, 1]]
    el = arc.elites()
    assert el["images"][:, 0, 0, 0].tolist() == pytest.approx([0.9, 0.2, 0.9])
    assert el["confidence"].tolist() == pytest.approx([0.55, 0.6, 0.45])
    # within a batch, the best per class wins
    arc.add(torch.tensor([[0.7, 0.7], [0.8, 0.8]]).view(2, 1, 1, 2), torch.tensor([[0.0, 0.7, 0.0], [0.0, 0.8, 0.0]]))
    assert arc.elites()["images"][1, 0, 0, 0] == pytest.approx(0.8)


def test_polynomial_mutation_range_and_rate():
    gen = torch.Generator().manual_seed(0)
    x = torch.full((200, 50), 0.5)
    y = polynomial_mutation(x, 0.1, 15.0, gen)
    changed = float((y != x).float().mean())
    assert 0.07 < changed < 0.13
    assert float(y.min()) >= 0 and float(y.max()) <= 1


# -- evolution on a closed-form model --------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["direct", "cppn"])
def test_evolution_fools_closed_form_model(encoding):
    model = Brightness()
    evo = FoolingEvolution(
        encoding=encoding,
        population=30,
        generations=300,
        direct=DirectOptions(mutation_rate=0.5, eta=2.0),
        extra_samples=10,
        seed=0,
    )
    res = evo(model, shape=(1, 6, 6))
    ex = res.extras
    assert ex["generation_all_fooled"] > 0 and ex["generations"] == ex["generation_all_fooled"]
    assert ex["elite_label"].tolist() == [0, 1]
    assert bool((ex["elite_confidence"] >= 0.9999).all())
    # the reported confidence is the model's softmax of the label, success is exactly the threshold test
    with torch.no_grad():
        p = F.softmax(model(res.x_adv), 1).gather(1, ex["label"][:, None]).squeeze(1)
    torch.testing.assert_close(ex["confidence"], p)
    assert torch.equal(res.success, p >= 0.9999)
    m = res.x_adv[ex["is_elite"]].flatten(1).mean(1)
    assert float(m[0]) < 0.5 - np.log(9999) / 80 + 1e-6 and float(m[1]) > 0.5 + np.log(9999) / 80 - 1e-6
    assert float(res.x_adv.min()) >= 0 and float(res.x_adv.max()) <= 1
    if encoding == "cppn":
        assert len(ex["genomes"]) == 2
        torch.testing.assert_close(render(Genome.from_dict(ex["genomes"][1]), 6), res.x_adv[1:2])


def test_evolution_extra_generations_fill_reservoir():
    model = Brightness()
    res = FoolingEvolution(
        population=20,
        generations=400,
        direct=DirectOptions(mutation_rate=0.5, eta=2.0),
        extra_generations=5,
        extra_samples=40,
        seed=0,
    )(model, shape=(1, 4, 4))
    ex = res.extras
    assert ex["generations"] == ex["generation_all_fooled"] + 5
    extra = ~ex["is_elite"]
    assert int(extra.sum()) == 40 and bool(res.success[extra].all())


def test_evolution_is_seeded():
    model = Brightness()
    a = FoolingEvolution(population=8, generations=5, seed=1)(model, shape=(1, 4, 4))
    b = FoolingEvolution(population=8, generations=5, seed=1)(model, shape=(1, 4, 4))
    assert torch.equal(a.x_adv, b.x_adv)


def test_evolution_errors():
    with pytest.raises(ValueError, match="population"):
        FoolingEvolution(population=0)
    with pytest.raises(ValueError, match="generations"):
        FoolingEvolution(generations=0)
    with pytest.raises(ValueError, match="encoding"):
        FoolingEvolution(encoding="indirect")
    with pytest.raises(ValueError, match="threshold"):
        FoolingEvolution(threshold=1.5)
    with pytest.raises(ValueError, match="parent_selection"):
        FoolingEvolution(parent_selection="best")
    with pytest.raises(ValueError, match="shape"):
        FoolingEvolution()(Brightness(), shape=(28, 28))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model"):
        FoolingEvolution()("model")  # type: ignore[arg-type]


def test_option_groups_check_their_fields_and_the_encoding():
    with pytest.raises(ValueError, match=r"'refine_steps' parameter of CPPNOptions must be an int >= 1\. Got 0"):
        CPPNOptions(refine_steps=0)
    with pytest.raises(TypeError, match="'rates' parameter of CPPNOptions must be a MutationRates. Got dict"):
        CPPNOptions(rates={"add_node": 0.3})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'mutation_rate' parameter of DirectOptions .* Got 0\.0"):
        DirectOptions(mutation_rate=0.0)
    with pytest.raises(ValueError, match="refine_every=2.*encoding='cppn', got 'direct'"):
        FoolingEvolution(encoding="direct", cppn=CPPNOptions(refine_every=2))
    with pytest.raises(TypeError, match="'cppn' parameter of FoolingEvolution must be a CPPNOptions or None. Got dict"):
        FoolingEvolution(encoding="cppn", cppn={"refine_every": 2})  # type: ignore[arg-type]
    # checked values are normalised (a NumPy int is stored as an int), so params() stays JSON-friendly
    p = FoolingEvolution(encoding="cppn", cppn=CPPNOptions(init_hidden=np.int64(3))).params()
    assert type(p["init_hidden"]) is int and p["rates"] == vars(MutationRates())
    # the CPPN settings' defaults are accepted (and ignored) with the direct encoding, as the flat keywords were
    assert FoolingEvolution(encoding="direct", cppn=CPPNOptions(init_hidden=5)).params()["rates"] is None


# -- gradient ascent --------------------------------------------------------------------------------


def test_gradient_ascent_closed_form_and_tiny_model(tiny_model):
    res = FoolingGradient(steps=100, lr=0.05, seed=0)(Brightness(), shape=(1, 8, 8))
    assert bool(res.success.all())
    m = res.x_adv.flatten(1).mean(1)
    assert float(m[0]) < 0.4 and float(m[1]) > 0.6
    fooler = FoolingGradient(steps=60, lr=0.1, samples_per_class=2, seed=0)
    out = fooler(tiny_model, classes=[0, 3, 7])
    assert out.x_adv.shape == (6, 1, 28, 28)
    assert out.extras["label"].tolist() == [0, 0, 3, 3, 7, 7]
    assert float(out.x_adv.min()) >= 0 and float(out.x_adv.max()) <= 1
    with torch.no_grad():
        p = F.softmax(tiny_model(out.x_adv), 1).gather(1, out.extras["label"][:, None]).squeeze(1)
        start = F.softmax(tiny_model(torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))), 1)
    torch.testing.assert_close(out.extras["confidence"], p)
    assert bool((p > start.gather(1, out.extras["label"][:, None]).squeeze(1)).all())
    assert float(p.min()) > 0.99
    again = fooler(tiny_model, classes=[0, 3, 7])
    assert torch.equal(again.x_adv, out.x_adv)
    smooth = FoolingGradient(steps=20, tv_weight=0.5, blur_sigma=0.8, seed=0)(tiny_model, classes=[1])
    assert smooth.x_adv.shape == (1, 1, 28, 28)


def test_gradient_ascent_errors(tiny_model):
    with pytest.raises(ValueError, match="steps"):
        FoolingGradient(steps=0)
    with pytest.raises(ValueError, match="samples_per_class"):
        FoolingGradient(samples_per_class=0)
    with pytest.raises(ValueError, match="classes"):
        FoolingGradient(steps=1)(tiny_model, classes=[10])
    with pytest.raises(ValueError, match="objective"):
        FoolingGradient(objective="hinge")


def test_transfer_check_same_model_agrees(tiny_model):
    res = FoolingGradient(steps=40, lr=0.1, seed=0)(tiny_model)
    tr = transfer_check(tiny_model, res.x_adv, res.extras["label"], threshold=0.9999)
    assert tr["at_threshold"] == pytest.approx(res.success_rate)
    assert tr["n"] == 10
    with pytest.raises(ValueError, match="labels"):
        transfer_check(tiny_model, res.x_adv, res.extras["label"][:3])


def test_audit_step_quick(tiny_model, demo_split, tmp_path):
    from guard.audit import AuditContext, AuditOptions, step
    from guard.core.data import Split

    train, test = demo_split
    ctx = AuditContext(
        model=tiny_model,
        model_name="tiny",
        train=Split(train.x[:1000], train.y[:1000]),
        test=test,
        data_source="test",
        out=tmp_path,
        options=AuditOptions(quick=True, progress=False),
    )
    given = step("attacks_fooling").run(ctx)
    for name in ("fooling_gradient", "fooling_direct", "fooling_cppn"):
        e = ctx.report["attacks"][name]
        assert e["n"] >= 10
        assert {"median_confidence", "generations", "seconds", "transfer"} <= set(e)
        res = given.results[name]
        assert torch.equal(res.success, res.extras["confidence"] >= 0.9999)
        # the confidences are the model's own, and success_rate is the share of attacked classes
        # with a saved image at >= 99.99% of that class
        with torch.no_grad():
            conf = torch.softmax(tiny_model(res.x_adv), 1).gather(1, res.extras["label"][:, None]).squeeze(1)
        torch.testing.assert_close(conf, res.extras["confidence"].float(), rtol=0, atol=1e-4)
        fooled = sorted({int(c) for c in res.extras["label"][res.success].tolist()})
        assert e["classes_fooled"] == fooled
        assert e["success_rate"] == pytest.approx(len(fooled) / e["classes_attacked"])
        assert (tmp_path / "artifacts" / f"attack_{name}.safetensors").is_file()
    cppn = ctx.report["attacks"]["fooling_cppn"]["params"]  # the audit's CPPN settings are on record
    assert (cppn["refine_every"], cppn["refine_steps"], cppn["init_hidden"], cppn["rates"]["add_node"]) == (
        100,
        100,
        8,
        0.3,
    )
    assert ctx.report["attacks"]["fooling_direct"]["params"]["refine_every"] == 0


def test_audit_step_pure_cppn_evolution_on_request(tiny_model, demo_split, tmp_path):
    from guard.audit import AuditContext, AuditOptions, step
    from guard.core.data import Split

    train, test = demo_split
    opts = AuditOptions(
        quick=True,
        progress=False,
        extra={
            "fooling_refine_every": 0,
            "fooling_cppn_hidden": 2,
            "fooling_cppn_add_node": 0.15,
            "fooling_transfer": False,
            "fooling_generations": 3,
        },
    )
    ctx = AuditContext(
        model=tiny_model,
        model_name="tiny",
        train=Split(train.x[:200], train.y[:200]),
        test=Split(test.x[:50], test.y[:50]),
        data_source="test",
        out=tmp_path,
        options=opts,
    )
    step("attacks_fooling").run(ctx)
    e = ctx.report["attacks"]["fooling_cppn"]
    assert (e["params"]["refine_every"], e["params"]["init_hidden"], e["params"]["rates"]["add_node"]) == (0, 2, 0.15)
    assert e["refine_evaluations"] == 0 and e["generations"] == 3


def test_fooling_gradient_in_chunks_equals_one_batch(tiny_model):
    # each image's loss and Adam state are its own: chunks change memory, not the images (no image
    # reaches a threshold of 1.0, so no chunk stops early). Not bit for bit: the kernels of another
    # batch size round differently, and Adam's step is ~lr * sign(g) wherever g is ~0, so a pixel
    # whose gradient is a rounding error away from zero may move the other way (2 of 23,520 on
    # an AMD EPYC); a wrong split (shared Adam state, other start noise) moves nearly all of them.
    kw = dict(steps=5, lr=0.1, threshold=1.0, samples_per_class=3, seed=0)
    whole = FoolingGradient(**kw)(tiny_model, shape=(1, 28, 28), num_classes=10)
    parts = FoolingGradient(**kw, batch_size=7)(tiny_model, shape=(1, 28, 28), num_classes=10)
    off = ((parts.x_adv - whole.x_adv).abs() > 1e-5).float().mean()
    assert off < 1e-3, f"{float(off):.2%} of the pixels differ"
    torch.testing.assert_close(parts.extras["confidence"], whole.extras["confidence"], atol=1e-3, rtol=1e-3)
    assert torch.equal(parts.extras["label"], whole.extras["label"])
    with pytest.raises(ValueError, match="batch_size"):
        FoolingGradient(batch_size=0)


def test_audit_step_attacks_a_seeded_sample_of_many_classes(demo_split, tmp_path):
    from guard.audit import AuditContext, AuditOptions, step
    from guard.audit.fooling import target_classes
    from guard.core.data import Split
    from guard.core.models import DemoNet

    assert torch.equal(target_classes(10, 10, 0), torch.arange(10))
    picked = target_classes(1000, 10, 3)
    assert (
        picked.numel() == 10
        and torch.equal(picked, picked.sort().values)
        and torch.equal(picked, target_classes(1000, 10, 3))
    )
    assert not torch.equal(picked, target_classes(1000, 10, 4))
    torch.manual_seed(0)
    many = DemoNet(num_classes=40, width=4, hidden=16).eval()  # 40 outputs: the quick step attacks 10 of them
    train, test = demo_split
    ctx = AuditContext(
        model=many,
        model_name="many",
        train=Split(train.x[:200], train.y[:200]),
        test=Split(test.x[:50], test.y[:50]),
        data_source="test",
        out=tmp_path,
        options=AuditOptions(quick=True, progress=False, seed=3, extra={"fooling_transfer": False}),
    )
    given = step("attacks_fooling").run(ctx)
    want = set(target_classes(40, 10, 3).tolist())
    for name in ("fooling_gradient", "fooling_direct", "fooling_cppn"):
        e = ctx.report["attacks"][name]
        assert e["classes_attacked"] == 10 and set(e["classes_fooled"]) <= want
        assert set(given.results[name].extras["label"].tolist()) <= want
        assert e["success_rate"] == len(e["classes_fooled"]) / 10


# -- Lamarckian refinement of CPPN weights -------------------------------------------------------


def test_render_with_own_weights_is_render():
    from guard.attacks.cppn import coordinate_grid
    from guard.attacks.cppn_refine import render_with_weights

    g = random_genome(3, rng=np.random.default_rng(4), hidden=4)
    w = torch.tensor([c[2] for c in g.connections])
    img = render_with_weights(g, coordinate_grid(9, 7), w).view(1, 3, 9, 7).clamp(0, 1)
    torch.testing.assert_close(img, render(g, 9, 7))
    with pytest.raises(ValueError, match="one per connection"):
        render_with_weights(g, coordinate_grid(9, 7), w[:-1])


def test_refine_weights_raises_the_target_and_never_loses():
    from guard.attacks.cppn_refine import refine_weights

    model = Brightness(w=4.0)  # soft: p(bright) moves smoothly with the mean pixel
    rng = np.random.default_rng(0)
    genomes = [random_genome(1, rng=rng, hidden=2) for _ in range(4)]
    targets = torch.tensor([1, 0, 1, 0])
    with torch.no_grad():
        lp0 = F.log_softmax(model(render(genomes, 6)), 1).gather(1, targets[:, None]).squeeze(1)
    new, lp = refine_weights(genomes, model, targets, 6, 6, steps=30, lr=0.2, max_weight=8.0)
    with torch.no_grad():
        lp1 = F.log_softmax(model(render(new, 6)), 1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(lp1, lp, atol=1e-5, rtol=0)  # the returned figure is the refined genome's own
    _, lo = refine_weights(genomes, model, targets, 6, 6, steps=30, lr=0.2, objective="log_odds")
    assert bool((lo > torch.log(-torch.expm1(lp0)).neg() + lp0).all())  # log-odds rose above the start's too
    with pytest.raises(ValueError, match="objective"):
        refine_weights(genomes, model, targets, 6, 6, objective="margin")
    assert bool((lp1 >= lp0 - 1e-6).all()) and float((lp1 - lp0).min()) > 0.05  # every genome gained
    assert model.w.grad is None  # the model's parameters are left alone
    for g0, g1 in zip(genomes, new):
        assert g1.order == g0.order and [c[:2] for c in g1.connections] == [c[:2] for c in g0.connections]
        assert max(abs(c[2]) for c in g1.connections) <= 8.0
    m = render(new, 6).flatten(1).mean(1)  # bright for class 1, dark for class 0
    assert float(m[0]) > 0.5 and float(m[2]) > 0.5 and float(m[1]) < 0.5 and float(m[3]) < 0.5


def test_complete_connections_keeps_the_image_and_grown_refinement_uses_the_new_edges():
    from guard.attacks.cppn_refine import refine_weights

    g = random_genome(3, rng=np.random.default_rng(2), hidden=3)
    full = complete_connections(g)
    pairs = [(int(a), int(b)) for a, b, _ in full.connections]
    assert len(pairs) == len(set(pairs))  # every pair once
    more = Genome.from_dict(full.to_dict())
    _add_connection(more, np.random.default_rng(0))
    assert more.connections == full.connections  # the mutation finds no forward pair left to add
    assert full.order == g.order and len(g.connections) < len(full.connections)
    assert torch.equal(render(full, 12), render(g, 12))  # zero weights: the same image
    assert complete_connections(full).connections == full.connections  # nothing left to add
    model = Brightness(w=4.0)
    rng = np.random.default_rng(0)
    genomes = [random_genome(1, rng=rng, hidden=2) for _ in range(3)]
    targets = torch.tensor([1, 0, 1])
    with torch.no_grad():
        lp0 = F.log_softmax(model(render(genomes, 6)), 1).gather(1, targets[:, None]).squeeze(1)
    grown, lp = refine_weights(genomes, model, targets, 6, 6, steps=20, lr=0.2, grow=True)
    assert bool((lp > lp0 + 0.05).all())
    for g0, g1 in zip(genomes, grown):
        assert g1.order == g0.order and len(g1.connections) == len(complete_connections(g0).connections)
        new_edges = [c for c in g1.connections if (c[0], c[1]) not in {(a, b) for a, b, _ in g0.connections}]
        assert any(abs(c[2]) > 1e-3 for c in new_edges)  # the gradient moved the added edges off zero
    evo = FoolingEvolution(
        encoding="cppn",
        population=2,
        generations=5,
        extra_samples=0,
        cppn=CPPNOptions(refine_every=5, refine_steps=3, refine_grow=True),
        seed=0,
    )
    assert evo.params()["refine_grow"] is True
    with pytest.raises(TypeError, match="refine_grow"):
        CPPNOptions(refine_grow="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="refine_every > 0"):
        CPPNOptions(refine_grow=True)  # would be silently ignored


def test_lamarckian_evolution_reaches_the_threshold_sooner_and_is_recorded():
    model = Brightness(w=9.5)  # needs |mean - 1/2| >= 0.485: near-saturated sigmoids, slow for mutation alone
    for seed in (0, 1, 2):
        kw = dict(encoding="cppn", population=2, generations=300, extra_samples=0, seed=seed)
        pure = FoolingEvolution(**kw)(model, shape=(1, 6, 6)).extras
        lamarck = CPPNOptions(refine_every=5, refine_steps=20, refine_lr=0.3)
        lam = FoolingEvolution(**kw, cppn=lamarck)(model, shape=(1, 6, 6)).extras
        assert pure["refine_evaluations"] == 0 and lam["refine_evaluations"] > 0
        assert 0 < lam["generation_all_fooled"] <= 5 < pure["generation_all_fooled"]  # the first refinement does it
        assert bool((lam["elite_confidence"] >= 0.9999).all())
    with pytest.raises(ValueError, match="encoding='cppn'"):
        FoolingEvolution(encoding="direct", cppn=CPPNOptions(refine_every=5))
    with pytest.raises(ValueError, match="init_connections"):
        FoolingEvolution(encoding="direct", cppn=CPPNOptions(init_connections=5))
    dense = FoolingEvolution(
        encoding="cppn", population=3, generations=1, extra_samples=0, cppn=CPPNOptions(init_connections=12), seed=0
    )
    genomes = dense(model, shape=(1, 6, 6)).extras["genomes"]
    assert dense.params()["init_connections"] == 12
    # 2 hidden nodes leave 15 forward pairs (4 inputs x 3 later nodes, hidden->hidden, 2 hidden->output);
    # the 6 connections after the splits plus 12 requested exceed that, so every initial CPPN is complete
    assert [len(g["connections"]) for g in genomes] == [15] * len(genomes)


def test_the_last_polish_lifts_the_short_classes_and_keeps_what_evolution_reached():
    model = Brightness(w=9.5)  # near-saturated sigmoids: 3 generations of mutation leave classes short
    kw = dict(encoding="cppn", population=2, generations=3, extra_samples=0, seed=0)
    pure = FoolingEvolution(**kw)(model, shape=(1, 6, 6)).extras
    short = int((pure["elite_confidence"] < 0.9999).sum())
    assert short > 0 and "elite_confidence_before_polish" not in pure and pure["polish_evaluations"] == 0
    polish = CPPNOptions(polish_steps=30, polish_starts=2, polish_lr=0.3)
    pol = FoolingEvolution(**kw, cppn=polish)(model, shape=(1, 6, 6)).extras
    # the same evolution (the polish comes after it), then every class over the threshold
    assert torch.equal(pol["elite_confidence_before_polish"], pure["elite_confidence"].float())
    assert bool((pol["elite_confidence"] >= 0.9999).all())
    assert (
        pol["generation_all_fooled"] == pure["generation_all_fooled"] == -1
    )  # evolution's own record, not the polish's
    # 2 elites scored for every cell, then 2 starts per short class, 30 steps (+2 scorings) each
    assert pol["polish_evaluations"] == 2 + short * 2 * 32
    with pytest.raises(ValueError, match="polish_steps.*encoding='cppn'"):
        FoolingEvolution(encoding="direct", cppn=CPPNOptions(polish_steps=10))
    with pytest.raises(ValueError, match="polish_starts"):
        CPPNOptions(polish_starts=0)


def test_polish_genomes_starts_from_the_elites_best_for_each_class_in_any_chunking():
    from guard.attacks.cppn_refine import PolishOptions, polish_genomes

    model = Brightness(w=9.5)
    rng = np.random.default_rng(1)
    genomes = [random_genome(1, rng=rng, hidden=2) for _ in range(5)]
    with torch.no_grad():
        probs = F.softmax(model(render(genomes, 6)), 1)
    classes = torch.tensor([0, 1])
    a, cells_a = polish_genomes(
        genomes, probs, [1, 0], model, classes, 6, 6, options=PolishOptions(starts=2, steps=5, lr=0.3, chunk=1)
    )
    b, cells_b = polish_genomes(
        genomes, probs, [1, 0], model, classes, 6, 6, options=PolishOptions(starts=2, steps=5, lr=0.3, chunk=16)
    )
    assert cells_a == cells_b == [1, 1, 0, 0]
    assert [g.to_dict() for g in a] == [g.to_dict() for g in b]  # chunks bound memory only
    # the starts for class 1 are the two brightest genomes; their topologies come back, completed
    brightest = probs[:, 1].argsort(descending=True)[:2].tolist()
    for g, i in zip(a[:2], brightest):
        assert g.order == genomes[i].order and len(g.connections) == len(complete_connections(genomes[i]).connections)
    with torch.no_grad():
        after = F.softmax(model(render(a, 6)), 1)
    assert bool((after[[0, 1], 1] >= probs[brightest, 1]).all()) and bool((after[[2, 3], 0] > 0.5).all())
    with pytest.raises(ValueError, match="probs must have shape"):
        polish_genomes(genomes, probs[:, :1], [0], model, classes, 6, 6)
    with pytest.raises(
        TypeError, match=r"The 'options' parameter of polish_genomes must be a PolishOptions or None\. Got dict\."
    ):
        polish_genomes(genomes, probs, [0], model, classes, 6, 6, options={"starts": 2})


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"starts": 0}, ValueError, "The 'starts' parameter of PolishOptions must be an int >= 1. Got 0."),
        ({"steps": 1.5}, ValueError, "The 'steps' parameter of PolishOptions must be an int >= 1. Got 1.5."),
        ({"chunk": 0}, ValueError, "The 'chunk' parameter of PolishOptions must be an int >= 1. Got 0."),
        ({"lr": 0.0}, ValueError, "The 'lr' parameter of PolishOptions must be a finite float in (0.0, inf]. Got 0.0."),
        (
            {"max_weight": float("inf")},
            ValueError,
            "The 'max_weight' parameter of PolishOptions must be a finite float in (0.0, inf]. Got inf.",
        ),
        ({"grow": 1}, TypeError, "The 'grow' parameter of PolishOptions must be a bool. Got int."),
    ],
)
def test_polish_options_refuse_a_wrong_value(kwargs, error, message):
    from guard.attacks.cppn_refine import PolishOptions

    with pytest.raises(error) as err:
        PolishOptions(**kwargs)
    assert str(err.value) == message
    assert type(PolishOptions(starts=np.int64(3)).starts) is int
