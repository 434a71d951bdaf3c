"""One test per bug the fuzzing (tests/test_fuzz.py) found: each failed before its fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import guard
from guard.attacks import FGSM, FeatureAdversary, FoolingEvolution, FoolingGradient, LinfPGD, RandomPatch
from guard.cli import main
from guard.core.models import DemoNet
from guard.core.validation import check_device, check_images, check_labels
from guard.detectors import (
    BitDepthSqueeze,
    KNNConsistency,
    KNNRank,
    LIDDetector,
    MahalanobisDetector,
    PPCAManifold,
    SaliencyConcentration,
)
from guard.export import build_export_head


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """Many tiny ops (and, for serving, many Python threads): see conftest.one_thread."""


@pytest.fixture(scope="module")
def net() -> DemoNet:
    torch.manual_seed(0)
    return DemoNet(width=4, hidden=8).eval()


def test_meta_and_empty_dimension_tensors_are_refused_by_name(net) -> None:
    with pytest.raises(ValueError, match="x is on the meta device"):
        FGSM()(net, torch.empty(2, 1, 28, 28, device="meta"))  # was RuntimeError: Tensor.item() on meta tensors
    with pytest.raises(ValueError, match="at least one channel, row and column"):
        check_images(torch.rand(2, 1, 0, 28), "x")
    with pytest.raises(ValueError, match="y is on the meta device"):
        check_labels(torch.empty(3, dtype=torch.long, device="meta"), "y")  # was NotImplementedError in the attacks
    with pytest.raises(ValueError, match="meta device"):
        guard.to_onnx(net, "unused.onnx", torch.empty(1, 1, 28, 28, device="meta"))


@pytest.mark.parametrize(
    "attack", [FGSM(), LinfPGD(steps=1), RandomPatch(size=0.05)], ids=["fgsm", "pgd", "random_patch"]
)
def test_labels_outside_the_models_classes_are_refused(net, attack) -> None:
    x = torch.rand(3, 1, 28, 28)
    with pytest.raises(
        ValueError, match=r"y must lie in \[0, 9\]"
    ):  # was IndexError (FGSM/PGD), success 1.0 (RandomPatch)
        attack(net, x, torch.tensor([0, 10, 1]))
    with pytest.raises(ValueError, match="y must hold class indices >= 0"):
        attack(net, x, torch.tensor([0, -1, 1]))


def test_a_model_without_class_logits_is_refused() -> None:
    class Flat(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1).sum(1)

    with pytest.raises(ValueError, match=r"logits of shape \(2, C\)"):  # was IndexError inside the attack
        FGSM()(Flat(), torch.rand(2, 1, 4, 4))


def test_images_that_require_grad_are_attacked(net) -> None:
    x = torch.rand(4, 1, 28, 28, requires_grad=True)  # was RuntimeError: numpy() on a tensor that requires grad
    res = FeatureAdversary(layer="fc1", delta=0.1, max_iter=2)(net, x, torch.tensor([0, 1, 2, 3]))
    assert res.x_adv.shape == x.shape and not res.x_adv.requires_grad


def test_input_detectors_take_float64_images_and_name_a_wrong_size(net) -> None:
    x = torch.rand(6, 1, 28, 28)
    for det in (SaliencyConcentration().fit(net, x), BitDepthSqueeze(bits=4).fit(net, x)):
        torch.testing.assert_close(det.score(net, x.double()), det.score(net, x))  # was RuntimeError: double vs float
        with pytest.raises(ValueError, match="cannot take x of shape"):  # was RuntimeError from a conv
            det.score(net, torch.rand(2, 1, 5, 5))


def test_saliency_target_outside_the_models_classes_is_refused(net) -> None:
    x = torch.rand(4, 1, 28, 28)
    det = SaliencyConcentration().fit(net, x)
    with pytest.raises(
        ValueError, match=r"target must lie in \[0, 9\]"
    ):  # was RuntimeError (index out of bounds) from Captum
        det.score(net, x, target=torch.tensor([0, 1, 2, 30]))
    with pytest.raises(ValueError, match="target must have 4 entries"):
        det.score(net, x, target=torch.tensor([0, 1]))


def test_fit_labels_the_model_cannot_output_are_refused(tiny_model, small_split) -> None:
    train, _ = small_split
    with pytest.raises(
        ValueError, match=r"data labels must lie in \[0, 9\]"
    ):  # were silently accepted (kNN consistency)
        guard.wrap(tiny_model, ["knn_consistency"]).fit(train.x[:40], train.y[:40] + 100)
    with pytest.raises(ValueError, match=r"y must lie in \[0, 9\]"):
        KNNRank("fc1", k=2).fit(tiny_model, train.x[:20], train.y[:20] + 10)


def test_mahalanobis_refuses_features_that_never_vary(net) -> None:
    with pytest.raises(ValueError, match="do not vary"):  # its precision was 0: every input scored 0, silently blind
        MahalanobisDetector(["fc1"]).fit(net, torch.zeros(30, 1, 28, 28))


def test_flags_are_not_scores() -> None:
    det = KNNRank("f", k=2).fit_features({"f": torch.randn(10, 3)}, torch.zeros(10, dtype=torch.long))
    with pytest.raises(TypeError, match="flags are not scores"):  # a bool tensor was taken as scores 0/1
        det.calibrate(torch.ones(8, dtype=torch.bool), 0.1)


def test_wrap_takes_one_name_as_one_detector(tiny_model) -> None:
    g = guard.wrap(tiny_model, "knn", flag_with="knn")  # "knn" was split into 'k', 'n', 'n'
    assert g.defaults == ["knn"] and g.flag_with == ["knn"]
    with pytest.raises(TypeError, match="detectors must be a list"):  # was "'int' object is not iterable"
        guard.wrap(tiny_model, 5)


def test_evaluate_names_its_arguments(knn_graph) -> None:
    g, _ = knn_graph
    x = torch.rand(4, 1, 28, 28)
    with pytest.raises(TypeError, match="guarded must be a GuardedModel"):  # was AttributeError
        guard.evaluate(g.model, x, {"a": x})
    with pytest.raises(TypeError, match="success must be a bool"):  # 0.5 and 2.0 were taken as True
        guard.evaluate(g, x, {"a": (x, torch.tensor([0.5, 2.0, 0.0, 1.0]))})
    with pytest.raises(TypeError, match="clean_data must be"):  # the message named 'x'
        g.calibrate((x, torch.zeros(4, dtype=torch.long)), 0.1)


def test_leave_out_is_a_list_of_names_not_a_substring(knn_graph, tiny_model, small_split) -> None:
    train, test = small_split
    g = guard.wrap(tiny_model, ["knn", "knn_consistency"]).fit(train).calibrate(test.x[:128], fpr=0.1)
    _, notes = build_export_head(g, test.x[:2], leave_out="knn_consistency")  # "knn" in "knn_consistency" left out both
    assert set(notes["left_out"]) == {"knn_consistency"}
    with pytest.raises(ValueError, match="not detectors of this GuardedModel"):
        build_export_head(g, test.x[:2], leave_out=["nope"])


def test_to_onnx_checks_the_example_against_the_model_first(net, tmp_path) -> None:
    with pytest.raises(ValueError, match="cannot take example_input of shape"):  # was RuntimeError from the tracer
        guard.to_onnx(net, tmp_path / "m.onnx", torch.rand(1, 1, 5, 5))
    with pytest.raises(ValueError, match="parity_inputs must have the shape"):
        guard.to_onnx(net, tmp_path / "m.onnx", torch.rand(1, 1, 28, 28), parity_inputs=torch.rand(2, 1, 5, 5))
    assert not any(tmp_path.iterdir())


def test_session_refuses_images_outside_the_contract(knn_graph) -> None:
    _, rep = knn_graph
    sess = guard.load_session(rep.path, "cpu")
    with pytest.raises(ValueError, match="must be finite"):  # was served (flagged, but silently)
        sess.run(np.full((2, 1, 28, 28), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        sess.run(np.full((2, 1, 28, 28), 255.0, np.float32))
    with pytest.raises(ValueError, match="meta device"):  # was NotImplementedError
        sess.run(torch.empty(2, 1, 28, 28, device="meta"))
    with pytest.raises(TypeError, match="strict must be True or False"):
        guard.load_session(rep.path, "cpu", strict="yes")


def test_cli_refuses_a_device_that_is_not_there(capsys, tmp_path) -> None:
    out = tmp_path / "unused"
    assert main(["audit", "--device", "nope", "--out", str(out)]) == 2  # was RuntimeError out of main
    assert "--device must be a device name" in capsys.readouterr().err
    assert main(["audit", "--repetitions", "0", "--out", str(out)]) == 2
    assert "--repetitions must be >= 1" in capsys.readouterr().err
    assert not out.exists()  # refused before any work (0 once slipped through and ran the model step)
    with pytest.raises(ValueError, match="meta device"):
        check_device("meta")


def test_load_data_and_load_model_name_what_was_wrong(tmp_path) -> None:
    with pytest.raises(
        ValueError, match="image_size must be a positive int"
    ):  # was only checked when a folder was read
        guard.load_data(tmp_path, image_size=-3)
    with pytest.raises(ValueError, match=r"calling dumps\(\) failed"):  # the factory's own TypeError escaped
        guard.load_model("json:dumps")


@pytest.mark.parametrize(
    "fooler",
    [FoolingGradient(steps=1), FoolingEvolution(population=4, generations=1, extra_samples=0)],
    ids=["gradient", "evolution"],
)
def test_foolers_check_shape_classes_and_num_classes_against_the_model(net, fooler) -> None:
    with pytest.raises(ValueError, match=r"shape=\(3, 28, 28\): the model cannot take"):  # was RuntimeError from a conv
        fooler(net, shape=(3, 28, 28))
    with pytest.raises(
        ValueError, match="'num_classes' parameter .* <= 10. Got 11"
    ):  # was IndexError/RuntimeError in the search
        fooler(net, shape=(1, 28, 28), num_classes=11)
    with pytest.raises(ValueError, match="'num_classes' parameter"):  # 2.5 was RuntimeError/IndexError, -1 RuntimeError
        fooler(net, shape=(1, 28, 28), num_classes=2.5)
    with pytest.raises(TypeError, match="classes must be class indices"):  # 1.5 and True were silently taken as class 1
        fooler(net, shape=(1, 28, 28), classes=[1.5])
    with pytest.raises(TypeError, match="classes must be class indices"):
        fooler(net, shape=(1, 28, 28), classes=[True])
    with pytest.raises(TypeError, match="1-D integer tensor"):  # a (1, 1) tensor was flattened silently
        fooler(net, shape=(1, 28, 28), classes=torch.tensor([[1]]))
    with pytest.raises(TypeError, match="a list of class indices"):  # was "'int' object is not iterable"
        fooler(net, shape=(1, 28, 28), classes=3)
    res = fooler(net, shape=(1, 28, 28), classes=range(2), num_classes=4)
    assert set(res.extras["label"].tolist()) <= {0, 1}


@pytest.fixture(scope="module")
def feature_bank() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {"a": torch.randn(60, 6, generator=gen), "b": torch.randn(60, 4, generator=gen)}


@pytest.mark.parametrize(
    "make",
    [
        lambda: KNNConsistency(["a", "b"], k=3),
        lambda: MahalanobisDetector(["a", "b"]),
        lambda: LIDDetector(["a", "b"], k=3, reference_size=40),
    ],
    ids=["knn_consistency", "mahalanobis", "lid"],
)
def test_feature_api_refuses_mismatched_rows_bad_logits_and_meta(feature_bank, make) -> None:
    labels = torch.arange(60) % 3
    det = make().fit_features(feature_bank, labels)
    logits = torch.randn(5, 3)
    five = {k: v[:5] for k, v in feature_bank.items()}
    with pytest.raises(ValueError, match="same number of rows"):  # was RuntimeError (stack / size mismatch)
        det.score_features({"a": five["a"], "b": five["b"][:3]}, logits)
    with pytest.raises(
        ValueError, match=r"logits must be logits of shape \(5, C\)"
    ):  # 3 rows of logits were used for 5 images
        det.score_features(five, logits[:3])
    with pytest.raises(ValueError, match="NaN/inf logits"):  # a NaN logit's argmax silently picked class 0
        det.score_features(five, torch.full((5, 3), float("nan")))
    with pytest.raises(ValueError, match="meta device"):  # was RuntimeError: Tensor.item() on meta tensors
        det.score_features({k: torch.empty(v.shape, device="meta") for k, v in five.items()}, logits)
    with pytest.raises(
        ValueError, match="at least 1 clean example.*empty feature bank"
    ):  # Mahalanobis: RuntimeError from max() of nothing
        make().fit_features({k: v[:0] for k, v in feature_bank.items()}, labels[:0])


@pytest.mark.parametrize(
    "make",
    [
        lambda: KNNRank("a", k=3),
        lambda: KNNConsistency(["a"], k=3),
        lambda: PPCAManifold("a", n_components=2),
        lambda: MahalanobisDetector(["a"]),
        lambda: LIDDetector(["a"], k=3, reference_size=40),
    ],
    ids=["knn", "knn_consistency", "ppca", "mahalanobis", "lid"],
)
def test_feature_detectors_refuse_a_blind_or_overflowing_bank(feature_bank, make) -> None:
    labels = torch.arange(60) % 3
    with pytest.raises(ValueError, match="do not vary"):  # kNN / LID fitted and then scored every input alike
        make().fit_features({"a": torch.ones(60, 6)}, labels)
    with pytest.raises(
        ValueError, match="overflow float32"
    ):  # PPCA: RuntimeError; Mahalanobis: a zero precision, every score 0
        make().fit_features({"a": feature_bank["a"] * 1e30}, labels)
