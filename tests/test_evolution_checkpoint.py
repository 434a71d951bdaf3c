"""FoolingEvolution(checkpoint_dir=...): an interrupted run resumes to exactly the uninterrupted result."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from guard.attacks.evolution_checkpoint import STATE_NAME, EvolutionCheckpointMismatch
from guard.attacks.fooling_evolution import CPPNOptions, FoolingEvolution


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Many tiny ops: see conftest.one_thread."""


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 7 * 7, 6)).eval()


SETTINGS = {
    "cppn": dict(
        encoding="cppn",
        population=8,
        extra_samples=5,
        extra_threshold=0.2,
        cppn=CPPNOptions(init_hidden=2, refine_every=4, refine_steps=2, polish_steps=3),
    ),
    "direct": dict(encoding="direct", population=8, extra_samples=5, extra_threshold=0.2),
}


def _same(a, b, logged_end: int = 0) -> None:
    """``b`` is ``a`` resumed; ``logged_end``: the generation where ``b``'s first call ended (and logged)."""
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.extras["confidence"], b.extras["confidence"])
    assert torch.equal(a.extras["label"], b.extras["label"])
    assert (
        a.extras["generations"] == b.extras["generations"]
        and a.extras["refine_evaluations"] == b.extras["refine_evaluations"]
    )
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(a.extras["history"]) == [e for e in strip(b.extras["history"]) if e["generation"] != logged_end]
    assert (
        a.extras.get("genomes") == b.extras.get("genomes")
        and a.extras["polish_evaluations"] == b.extras["polish_evaluations"]
    )


@pytest.mark.parametrize("kind", ["cppn", "direct"])
def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path, kind):
    net, kw = _net(), SETTINGS[kind]
    whole = FoolingEvolution(generations=11, stop_when_done=False, seed=3, **kw)(net, shape=(3, 16, 16))
    assert (whole.extras["polish_evaluations"] > 0) == (
        kind == "cppn"
    )  # the 6-generation call polished too, and was extended
    # "interrupted" after 6 generations (the state saved then), continued to 11 from the folder
    FoolingEvolution(generations=6, stop_when_done=False, seed=3, **kw)(
        net, shape=(3, 16, 16), checkpoint_dir=tmp_path, checkpoint_every=3
    )
    assert (tmp_path / STATE_NAME).is_file()
    resumed = FoolingEvolution(generations=11, stop_when_done=False, seed=3, **kw)(
        net, shape=(3, 16, 16), checkpoint_dir=tmp_path, checkpoint_every=3
    )
    _same(whole, resumed, logged_end=6)
    # a finished run called again returns its result without evolving further
    again = FoolingEvolution(generations=11, stop_when_done=False, seed=3, **kw)(
        net, shape=(3, 16, 16), checkpoint_dir=tmp_path
    )
    _same(whole, again, logged_end=6)


def test_another_runs_checkpoint_is_refused(tmp_path):
    net = _net()
    FoolingEvolution(generations=2, seed=0, **SETTINGS["direct"])(net, shape=(3, 16, 16), checkpoint_dir=tmp_path)
    with pytest.raises(EvolutionCheckpointMismatch, match=r"differs in \['params'\]"):
        FoolingEvolution(generations=2, seed=1, **SETTINGS["direct"])(net, shape=(3, 16, 16), checkpoint_dir=tmp_path)
    with pytest.raises(EvolutionCheckpointMismatch, match=r"differs in \['classes'\]"):
        FoolingEvolution(generations=2, seed=0, **SETTINGS["direct"])(
            net, shape=(3, 16, 16), classes=[0, 1], checkpoint_dir=tmp_path
        )
    other = _net()
    with torch.no_grad():
        other[3].bias.add_(1.0)
    with pytest.raises(EvolutionCheckpointMismatch, match=r"differs in \['model'\]"):
        FoolingEvolution(generations=2, seed=0, **SETTINGS["direct"])(other, shape=(3, 16, 16), checkpoint_dir=tmp_path)


def test_a_damaged_checkpoint_and_bad_arguments_give_clear_errors(tmp_path):
    net = _net()
    (tmp_path / STATE_NAME).write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="shorter than a safetensors header"):
        FoolingEvolution(generations=2, seed=0, **SETTINGS["direct"])(net, shape=(3, 16, 16), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="checkpoint_every"):
        FoolingEvolution(generations=2, seed=0, **SETTINGS["direct"])(
            net, shape=(3, 16, 16), checkpoint_dir=tmp_path, checkpoint_every=0
        )
