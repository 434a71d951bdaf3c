"""HardenConfig.trainable: fine-tune only named modules (and the head); the rest is frozen and stays in eval mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import guard
from guard.training.harden import HardenConfig, harden
from guard.training.round_attacks import AttackBudget

RUN = dict(
    rounds=1,
    epochs_per_round=2,
    budget=AttackBudget.quick(),
    attacks=("fooling_gradient",),
    progress=False,
    seed=1,
    lr=1e-2,
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(4 * 6 * 6, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    ).eval()


@pytest.fixture(scope="module")
def data() -> guard.Split:
    g = torch.Generator().manual_seed(0)
    return guard.Split(torch.rand(48, 1, 8, 8, generator=g), torch.randint(0, 3, (48,), generator=g))


def _changed(before: nn.Module, after: nn.Module) -> set[str]:
    a, b = before.state_dict(), after.state_dict()
    return {k for k in a if k in b and a[k].shape == b[k].shape and not torch.equal(a[k], b[k])}


def test_head_only_leaves_everything_else_bitwise_unchanged(data):
    net = _net()
    res = harden(net, data, trainable=(), **RUN)
    changed = _changed(net, res.model.model)
    # the grown head (7.*) differs in shape; every other tensor, BatchNorm statistics included, is untouched
    assert changed == set()
    assert not torch.equal(res.model.model[7].weight[:3], net[7].weight)  # the head did train
    assert all(p.requires_grad for p in res.model.model.parameters())  # an ordinary model again


def test_named_stage_trains_and_its_batchnorm_updates_while_the_rest_is_frozen(data):
    net = _net()
    res = harden(net, data, trainable=("1", "5"), **RUN)
    changed = _changed(net, res.model.model)
    assert {"1.weight", "1.bias", "1.running_mean", "1.running_var", "5.weight", "5.bias"} <= changed
    assert not ({"0.weight", "0.bias"} & changed)


def test_everything_trains_by_default(data):
    net = _net()
    res = harden(net, data, **RUN)
    assert {"0.weight", "1.running_mean", "5.weight"} <= _changed(net, res.model.model)


def test_bad_trainable_is_refused(data):
    with pytest.raises(ValueError, match="trainable names modules the model does not have: \\['nope'\\]"):
        harden(_net(), data, trainable=("nope",), **RUN)
    with pytest.raises(TypeError, match="trainable must be None or a tuple"):
        HardenConfig(trainable="1").validated()


def test_budget_population_sets_the_evolution_children_per_generation():
    from guard.training.round_attacks import round_attack_table

    table = round_attack_table(AttackBudget(per_class=2, population=7), num_classes=1000, seed=0)
    assert table["fooling_cppn"].population == 7 and table["fooling_direct"].population == 7
    assert round_attack_table(AttackBudget(per_class=2), num_classes=1000, seed=0)["fooling_cppn"].population == 2000
    with pytest.raises(ValueError, match="'population' parameter of AttackBudget"):
        round_attack_table(AttackBudget(population=0), num_classes=10, seed=0)


def test_freeze_known_classes_keeps_the_known_logits_and_trains_the_reject_row(data):
    net = _net()
    res = harden(net, data, trainable=(), freeze_known_classes=True, **RUN)
    head = res.model.model[7]
    assert torch.equal(head.weight[:3], net[7].weight) and torch.equal(head.bias[:3], net[7].bias)
    assert not torch.equal(head.weight[3], torch.zeros_like(head.weight[3]))  # the reject row learned
    with torch.no_grad():
        # the trunk (BatchNorm statistics included) is bitwise the original's ...
        assert torch.equal(res.model.model[:7](data.x), net[:7](data.x))
        full = res.model.model(data.x)
        # ... and the known logits equal the original's up to the GEMM's rounding: a 4-row head and a
        # 3-row head are blocked differently by the BLAS on some thread counts, so not bit for bit
        torch.testing.assert_close(full[:, :3], net(data.x), rtol=0, atol=1e-6)
    # the hooks are gone: the returned model trains as an ordinary one
    res.model.model(data.x).sum().backward()
    assert head.weight.grad[:3].abs().sum() > 0


def test_freeze_known_classes_must_be_a_bool():
    with pytest.raises(TypeError, match="freeze_known_classes must be a bool; got str"):
        HardenConfig(freeze_known_classes="yes").validated()
