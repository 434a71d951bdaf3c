"""Export: one ONNX graph (model + detector heads) served by onnxruntime, checked against PyTorch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import guard
from guard.detectors import Batch, SaliencyConcentration
from guard.export import ExportError, ProviderError, build_export_head, compare_with_guarded, load_session, to_onnx

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def guarded(tiny_model, small_split):
    train, test = small_split
    g = guard.wrap(tiny_model, [*guard.DEFAULT_DETECTORS, "occlusion"]).fit(train)  # occlusion: not a default
    g.calibrate(test.x[:128], fpr=0.05)
    return g


@pytest.fixture(scope="module")
def exported(guarded, small_split, tmp_path_factory):
    _, test = small_split
    path = tmp_path_factory.mktemp("onnx") / "guarded.onnx"
    rep = to_onnx(guarded, path, test.x[:8], parity_inputs=test.x[128:192])  # not the calibration images
    return rep, path


def test_guarded_graph_matches_pytorch_at_batch_1_odd_64(exported):
    rep, path = exported
    assert rep.parity is not None and rep.parity["passed"], rep.parity
    assert set(rep.parity["by_batch"]) == {"1", "7", "64"}
    for name in (
        "logits",
        "knn_distance",
        "knn_score",
        "ppca_loglik",
        "saliency_score",
        "occlusion_score",
        "squeeze_score",
        "knn_consistency_score",
        "combined_score",
        "flags",
        "flag",
    ):
        assert name in rep.output_names
    assert rep.parity["outputs"]["logits"]["max_abs"] <= 1e-4
    assert rep.parity["outputs"]["pred"]["agreement"] == 1.0
    assert rep.parity["outputs"]["flags"]["n_diff"] == 0
    model = onnx.load(str(path), load_external_data=False)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert rep.opset == next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert "TopK" in ops and "MatMul" in ops


def test_graph_matches_the_guarded_models_own_scores(guarded, exported, small_split):
    """Against FAISS, float64 PPCA and Captum themselves, not just the ExportHead."""
    _, path = exported
    _, test = small_split
    sess = load_session(path, device="cpu")
    head, _ = build_export_head(guarded, test.x[:8])
    figs = compare_with_guarded(guarded, sess, test.x, head=head)
    assert figs["logits"]["max_abs"] <= 1e-4
    assert figs["pred"]["agreement"] == 1.0
    for name in (
        "knn_score",
        "ppca_score",
        "saliency_score",
        "occlusion_score",
        "squeeze_score",
        "knn_consistency_score",
    ):
        assert figs[name]["passed"], (name, figs[name])
    for name, v in figs.items():
        if name.startswith("flag_"):
            # a flag may only differ for a calibration image sitting exactly on the threshold
            assert v["n_diff"] == v["borderline"], (name, v)


@pytest.mark.parametrize("method,layer", [("saliency", None), ("gradcam", "conv2"), ("integrated_gradients", None)])
def test_saliency_head_equals_captum(tiny_model, small_split, method, layer):
    """The graph's autograd attribution equals Captum's, the eager detector's."""
    _, test = small_split
    x = test.x[:64]
    det = SaliencyConcentration(method, layer=layer, n_steps=8).fit(tiny_model, x)
    ref = det.score(tiny_model, x)
    with torch.no_grad():
        logits = tiny_model(x)
    mine = det.export_head()(Batch(x, logits, {}, tiny_model))
    torch.testing.assert_close(mine, ref, atol=1e-6, rtol=1e-5)


class _Residual(nn.Module):
    """A skip connection and BatchNorm between the input and the head: what a hand-written VJP chain could not export."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))) + x
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


def test_skip_connection_and_batchnorm_export_with_saliency(tmp_path):
    torch.manual_seed(0)
    model = _Residual().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.rand(160, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    g = guard.wrap(model, ["saliency", "occlusion", "knn", "ppca"]).fit(x[:64])
    g.calibrate(x[64:96])
    x = x[96:]  # neither fitted nor calibrated on
    rep = to_onnx(g, tmp_path / "r.onnx", x[:4], parity_inputs=x)
    assert rep.parity["passed"], rep.parity["outputs"]
    for name in ("saliency_score", "occlusion_score"):
        assert name in rep.output_names and rep.parity["outputs"][name]["max_abs"] < 1e-5, rep.parity["outputs"][name]
    figs = compare_with_guarded(g, load_session(tmp_path / "r.onnx", "cpu"), x, head=build_export_head(g, x[:4])[0])
    assert figs["saliency_score"]["passed"], figs["saliency_score"]  # against Captum itself
    assert figs["occlusion_score"]["passed"], figs["occlusion_score"]  # against the eager detector


def test_strict_cuda_on_a_cpu_only_machine(exported):
    _, path = exported
    if HAS_CUDA:
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(ProviderError, match="CUDAExecutionProvider"):
        load_session(path, device="cuda", strict=True)
    sess = load_session(path, device="cuda", strict=False)
    assert sess.report.fell_back
    assert sess.report.providers == ["CPUExecutionProvider"]
    assert any("strict=False" in n for n in sess.report.notes)
    assert sum(sess.report.node_providers.values()) > 0


def test_session_rejects_wrong_input_shape(exported):
    _, path = exported
    sess = load_session(path, device="cpu")
    with pytest.raises(ValueError, match=r"input 'input' must have shape \['batch', 1, 28, 28\]; got \[2, 1, 27, 28\]"):
        sess.run(np.zeros((2, 1, 27, 28), dtype=np.float32))
    out = sess.run(np.zeros((3, 1, 28, 28), dtype=np.float32))
    assert out["logits"].shape == (3, 10)


def test_missing_directory_is_a_clear_error(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        to_onnx(tiny_model, tmp_path / "nope" / "m.onnx", torch.rand(2, 1, 28, 28))


class _Eigh(nn.Module):
    def forward(self, x):
        f = x.flatten(1)
        return torch.linalg.eigh(f.T @ f)[0][None].expand(x.shape[0], -1)


def test_unexportable_model_names_the_op(tmp_path):
    with pytest.raises(ExportError, match="linalg_eigh"):
        to_onnx(_Eigh(), tmp_path / "m.onnx", torch.rand(2, 1, 4, 4))


def test_plain_model_opset_and_hardened_reject_output(tiny_model, small_split, tmp_path):
    from guard.training.reject import RejectClassifier, grow_head

    _, test = small_split
    net, head_name = grow_head(tiny_model)
    # a calibrated reject offset is part of forward, so of the graph (here it rejects half the images)
    hardened = RejectClassifier(net, 10, head_name).calibrate_rejection(test.x[:64], rate=0.5)
    rep = to_onnx(hardened, tmp_path / "h.onnx", test.x[:1], opset=18, parity_inputs=test.x[:64])
    assert rep.opset == 18
    assert rep.parity["passed"]
    assert "reject_prob" in rep.output_names and rep.output_names[-2:] == ["flags", "flag"]
    out = load_session(tmp_path / "h.onnx", "cpu").run(test.x[:64])
    with torch.no_grad():
        p = hardened(test.x[:64]).softmax(1)
    np.testing.assert_allclose(out["reject_prob"], p[:, 10].numpy(), atol=1e-6)
    np.testing.assert_array_equal(out["flag"], p.argmax(1).numpy() == 10)
    assert int(out["flag"].sum()) == 32


def test_cli_export_reports_a_missing_directory(tmp_path, capsys):
    from guard.cli import main

    rc = main(["export", "--out", str(tmp_path / "nope" / "m.onnx")])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err


def test_torchvision_normalize_in_front_exports_with_parity(tmp_path):
    """A user's model with torchvision.transforms.Normalize in front (its std == 0 check stopped torch.export)."""
    from torchvision import transforms

    from guard.export.graph import exportable_normalize

    torch.manual_seed(0)
    model = nn.Sequential(
        transforms.Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)),
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 4),
    ).eval()
    swapped = exportable_normalize(model)
    assert isinstance(model[0], transforms.Normalize)  # the caller's model is untouched
    assert type(swapped[0]).__name__ == "Normalize" and not isinstance(swapped[0], transforms.Normalize)
    x = torch.rand(128, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    assert torch.equal(swapped(x), model(x))
    g = guard.wrap(model, ["knn", "ppca"]).fit(x[:64])
    g.calibrate(x[64:96])
    rep = to_onnx(g, tmp_path / "n.onnx", x[96:100], parity_inputs=x[96:])
    assert rep.parity["passed"], rep.parity["outputs"]
    assert exportable_normalize(swapped) is swapped  # nothing to swap: the same object back


def test_large_images_run_the_graph_in_bounded_batches():
    import numpy as np

    from guard.export.parity import parity_batch_sizes, serving_batch

    # at 224 px a batch of 64 through the saliency head peaked at 7.4 GB (EfficientNet-Lite0): 13 images at a time
    assert serving_batch(torch.zeros(2, 3, 224, 224)) == 13 and parity_batch_sizes(torch.zeros(2, 3, 224, 224)) == (
        1,
        7,
        13,
    )
    assert serving_batch(np.zeros((2, 3, 224, 224), np.float32), 8) == 8  # the cap, for numpy input too
    # small images keep the batch sizes every earlier figure was measured with
    assert serving_batch(torch.zeros(2, 3, 32, 32)) == 256 and parity_batch_sizes(torch.zeros(2, 1, 28, 28)) == (
        1,
        7,
        64,
    )
    assert serving_batch(torch.zeros(1, 3, 2048, 2048)) == 1  # never zero
