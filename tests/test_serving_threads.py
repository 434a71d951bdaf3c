"""Serving under load: one GuardedModel / one ONNX session scored from 8 threads at once.

Each thread's flags and scores must be those one thread gets (feature hooks and eval mode are
shared by every thread using the model), and a detector that fails on one batch flags exactly
that batch's images, in one call or from many threads.
"""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch

import guard
from guard.detectors import DETECTORS, SaliencyConcentration
from guard.guarded import GuardedModel

THREADS = 8


def _in_threads(fn, args: list, repeats: int = 3) -> list[list]:
    """``fn(arg)`` for every arg, one thread each, all released at once; ``repeats`` rounds."""
    rounds = []
    for _ in range(repeats):
        out: list = [None] * len(args)
        errors: list = []
        gate = threading.Barrier(len(args))

        def work(i: int) -> None:
            try:
                gate.wait()
                out[i] = fn(args[i])
            except BaseException as err:  # noqa: BLE001 -- reported below, in the test's thread
                errors.append(err)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(args))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert all(not t.is_alive() for t in threads), "a scoring thread hung"
        rounds.append(out)
    return rounds


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """Many tiny ops (and, for serving, many Python threads): see conftest.one_thread."""


@pytest.fixture(scope="module")
def served(tiny_model, small_split) -> GuardedModel:
    """Feature, input and gradient detectors on a model left in *train* mode (its dropout active)."""
    train, test = small_split
    model = copy.deepcopy(tiny_model).train()  # eval_mode must hold for every thread until the last one leaves
    layers = ["conv1", "conv2", "fc2:input"]
    dets = {name: DETECTORS[name].default(layers) for name in ("knn", "ppca", "squeeze", "saliency")}
    dets["gradcam"] = SaliencyConcentration(method="gradcam", layer="conv2")  # Captum's layer hook
    g = GuardedModel(model, dets, batch_size=16).fit(guard.Split(train.x[:256], train.y[:256]))
    return g.calibrate(test.x[:96], fpr=0.1)


@pytest.fixture(scope="module")
def batches(small_split) -> list[torch.Tensor]:
    _, test = small_split
    x = test.x[96 : 96 + THREADS * 12].clone()
    x[5] = 1.0  # a few obvious outliers, so that flags differ between images
    x[30] = 0.0
    return list(x.split(12))


def test_guarded_model_from_8_threads_gives_one_threads_flags(served, batches) -> None:
    ref = [served(x) for x in batches]
    assert any(bool(r.flagged.any()) for r in ref) and not all(
        bool(r.flagged.all()) for r in ref
    )  # the flags carry information
    for outs in _in_threads(served, batches):
        for r, o in zip(ref, outs):
            assert not o.errors, o.errors
            assert torch.equal(o.flagged, r.flagged)
            assert torch.equal(o.logits, r.logits)
            for name in r.scores:
                torch.testing.assert_close(o.scores[name], r.scores[name], rtol=1e-5, atol=1e-5, msg=name)
    assert served.model.training and all(m.training for m in served.model.modules())  # its own mode, back


def test_a_detector_failing_on_one_batch_flags_exactly_that_batch(served, batches, monkeypatch) -> None:
    ref = [served(x) for x in batches]
    marked = [b.clone() for b in batches]
    marked[3][7] = 0.5  # the batch the detector fails on: it holds a uniform grey image
    knn = served.detectors["knn"]
    own = knn.score_batch

    def fails_on_grey(batch):
        if bool((batch.x.flatten(1) == 0.5).all(1).any()):
            raise RuntimeError("knn index unavailable")
        return own(batch)

    monkeypatch.setattr(knn, "score_batch", fails_on_grey)
    for outs in _in_threads(served, marked, repeats=2):
        for i, (r, o) in enumerate(zip(ref, outs)):
            if i == 3:
                assert bool(o.flagged.all()) and bool(torch.isinf(o.scores["knn"]).all()) and "knn" in o.errors
            else:
                assert not o.errors and torch.equal(o.flagged, r.flagged)

    # one call over every image: batches of 16 inside; only the failing one's 16 images are flagged by it
    x = torch.cat(marked)
    logits, scores, errors = served.score(x)
    bad = torch.zeros(x.shape[0], dtype=torch.bool)
    bad[32:48] = True  # image 3 * 12 + 7 = 43 lies in the third batch of 16
    assert "knn" in errors and torch.equal(torch.isinf(scores["knn"]), bad)
    flags = served.combined.predict_scores(served.combined.combine(scores))
    assert bool(flags[bad].all())
    torch.testing.assert_close(flags[~bad], torch.cat([r.flagged for r in ref])[~bad])


def test_onnx_session_from_8_threads_gives_one_threads_flags(knn_graph, batches) -> None:
    _, rep = knn_graph
    sess = guard.load_session(rep.path, "cpu", expected_sha256=rep.sha256)
    arrays = [b.numpy() for b in batches]
    ref = [sess.run(a) for a in arrays]
    assert any(r["flag"].any() for r in ref)
    for outs in _in_threads(sess.run, arrays):
        for r, o in zip(ref, outs):
            assert np.array_equal(o["flag"], r["flag"])
            for name in r:
                np.testing.assert_allclose(o[name], r[name], rtol=1e-6, atol=1e-6, err_msg=name)
