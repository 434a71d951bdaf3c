"""Shared fixtures: seeds fixed, threads capped, the embedded data, a tiny and the demo model."""

from __future__ import annotations

import os

import pytest
import torch

import guard
from guard.core.models import DemoNet
from guard.training.classifier import train_classifier

if os.environ.get("PYTEST_XDIST_WORKER"):
    # ``pytest -n auto`` (the README's test command): one worker per core, each with one intra-op
    # thread, and so the guard processes its tests start (inherited OMP_NUM_THREADS). The audits the
    # slow tests run gain nothing from a second thread (measured: 305 s at one thread, 291 s at two),
    # while two workers halve the wall time; two threads per worker would only spin.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``pytest -n``, the slow end-to-end tests first (a stable sort, the same on every worker).

    They take minutes each; handed out first, one at a time (``--dist load --maxschedchunk 1`` in
    pyproject.toml), they spread over the workers and the short tests fill in behind, instead of
    a slow test starting last on a worker while the other stands idle.
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One intra-op thread, restored afterwards: for files of many tiny ops, where a second
    thread only spin-waits (measured 15x slower on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread_module():
    """:func:`one_thread` for a whole module (hypothesis tests take no function-scoped fixtures)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ModelSnapshot:
    """Everything an attack must leave as it was: weights, requires_grad, .grad, each module's mode."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.state = {k: v.clone() for k, v in model.state_dict().items()}
        self.flags = [p.requires_grad for p in model.parameters()]
        self.grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        self.modes = [m.training for m in model.modules()]

    def assert_unchanged(self, model: torch.nn.Module) -> None:
        assert [m.training for m in model.modules()] == self.modes
        assert all(torch.equal(self.state[k], v) for k, v in model.state_dict().items())
        assert [p.requires_grad for p in model.parameters()] == self.flags
        for g, p in zip(self.grads, model.parameters()):
            assert (g is None and p.grad is None) or (g is not None and p.grad is not None and torch.equal(g, p.grad))


@pytest.fixture(scope="session")
def demo_split() -> tuple[guard.Split, guard.Split]:
    """The embedded MNIST default: (8,000 train, 2,000 test)."""
    return guard.demo_data()


@pytest.fixture(scope="session")
def small_split(demo_split):
    """512 training and 256 held-out images of the embedded default."""
    train, test = demo_split
    return guard.Split(train.x[:512], train.y[:512]), guard.Split(test.x[:256], test.y[:256])


@pytest.fixture(scope="session")
def tiny_model(demo_split) -> DemoNet:
    """A narrow DemoNet trained for two epochs on 2,000 images (~2 s; ~90% accurate)."""
    train, _ = demo_split
    torch.manual_seed(0)
    model = DemoNet(width=8, hidden=32)
    train_classifier(model, train.x[:2000], train.y[:2000], epochs=2, lr=3e-3, seed=0, progress=False)
    return model.eval()


@pytest.fixture(scope="session")
def demo_net() -> DemoNet:
    """The real demo model (cached in the user cache; trained once, ~25 s, if missing)."""
    return guard.demo_model(progress=False)


@pytest.fixture(scope="session")
def knn_graph(tiny_model, small_split, tmp_path_factory):
    """A GuardedModel (kNN only, calibrated to 5% FPR) and its unsigned ONNX export (``(guarded, ExportReport)``).

    Shared by the export-integrity tests and the fuzzing of the ONNX session (one export: ~10 s).
    """
    train, test = small_split
    g = guard.wrap(tiny_model, detectors=["knn"]).fit(train).calibrate(test.x[:128], fpr=0.05)
    rep = guard.to_onnx(g, tmp_path_factory.mktemp("knn_graph") / "plain.onnx", test.x[:8])
    return g, rep
