"""The exported graph's thresholds decide what gets through: pinned, signed, written atomically."""

from __future__ import annotations

import hashlib
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from integrity_tools import KEY, OTHER_KEY, flip_last_byte
from onnx import numpy_helper

from guard.core.integrity import IntegrityError
from guard.core.models import DemoNet
from guard.export import load_session, to_onnx

TO_ONNX = sys.modules["guard.export.to_onnx"]  # the module (the package re-exports the function under its name)


@pytest.fixture(scope="module")
def guarded(knn_graph):
    return knn_graph[0]


@pytest.fixture(scope="module")
def exported(knn_graph, small_split, tmp_path_factory):
    _, test = small_split
    signed = to_onnx(knn_graph[0], tmp_path_factory.mktemp("signed") / "signed.onnx", test.x[:8], key=KEY)
    return knn_graph[1], signed


def _noise(n: int = 32) -> np.ndarray:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(1)).numpy()


def _raise_thresholds(path, thresholds: list[float]) -> int:
    """Set every scalar constant of the graph equal to a calibrated threshold to 1e9 (an attacker's edit)."""
    model = onnx.load(str(path))
    targets = {np.float32(t) for t in thresholds}
    hits = 0
    tensors = list(model.graph.initializer) + [
        a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"
    ]
    for t in tensors:
        arr = numpy_helper.to_array(t)
        if arr.size == 1 and arr.dtype == np.float32 and np.float32(arr.reshape(-1)[0]) in targets:
            t.CopyFrom(numpy_helper.from_array(np.full(arr.shape, 1e9, dtype=np.float32), t.name))
            hits += 1
    onnx.save(model, str(path))
    return hits


def test_report_digest_and_sidecars(exported) -> None:
    plain, signed = exported
    for rep in (plain, signed):
        raw = open(rep.path, "rb").read()
        assert rep.sha256 == hashlib.sha256(raw).hexdigest()
        assert open(rep.digest_path).read() == f"{rep.sha256}  {rep.path.rsplit('/', 1)[-1]}\n"
    assert not plain.signed and plain.signature_path is None
    assert signed.signed and signed.signature_path.endswith("signed.onnx.sig")
    sess = load_session(plain.path, "cpu", expected_sha256=plain.sha256)
    assert load_session(signed.path, "cpu", key=KEY, expected_sha256=signed.sha256).run(_noise())["flag"].shape == (32,)
    assert sess.run(_noise())["flag"].any()  # noise is flagged by the intact graph


def test_raised_threshold_in_the_graph_is_refused(guarded, exported, tmp_path) -> None:
    plain, signed = exported
    thresholds = [guarded.detectors["knn"].threshold_, guarded.combined.threshold_]
    for rep, key in ((plain, None), (signed, KEY)):
        path = tmp_path / rep.path.rsplit("/", 1)[-1]
        for suffix in ("", ".sha256", ".sig"):
            src = rep.path + suffix
            if suffix != ".sig" or rep.signed:
                path.with_name(path.name + suffix).write_bytes(open(src, "rb").read())
        assert _raise_thresholds(path, thresholds) >= 1
        disarmed = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # onnxruntime alone serves it
        assert not disarmed.run(["flag"], {"input": _noise()})[0].any()
        with pytest.raises(IntegrityError, match="altered"):  # the digest beside it, or the signature
            load_session(path, "cpu", key=key)
        # the attacker rewrites the digest beside the graph too: a pin or the key still refuses it
        path.with_name(path.name + ".sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "  x\n")
        with pytest.raises(IntegrityError, match="altered or replaced"):
            load_session(path, "cpu", key=key, expected_sha256=rep.sha256)
        if key is not None:
            with pytest.raises(IntegrityError, match="altered or signed with another key"):
                load_session(path, "cpu", key=key)


def test_signed_graph_needs_the_key(exported, tmp_path, monkeypatch) -> None:
    _, signed = exported
    with pytest.raises(IntegrityError, match="is signed"):
        load_session(signed.path, "cpu")
    with pytest.raises(IntegrityError, match="another key"):
        load_session(signed.path, "cpu", key=OTHER_KEY)
    monkeypatch.setenv("SERVE_KEY", KEY.decode())
    load_session(signed.path, "cpu", key_env="SERVE_KEY")
    # replace the graph by an unsigned one and remove the signature: refused when the key is given
    plain_copy = tmp_path / "swap.onnx"
    plain_copy.write_bytes(open(exported[0].path, "rb").read())
    with pytest.raises(IntegrityError, match="not signed"):
        load_session(plain_copy, "cpu", key=KEY)


def test_flipped_byte_is_refused(exported, tmp_path) -> None:
    plain, _ = exported
    path = tmp_path / "plain.onnx"
    path.write_bytes(open(plain.path, "rb").read())
    (tmp_path / "plain.onnx.sha256").write_bytes(open(plain.digest_path, "rb").read())
    flip_last_byte(path, offset=len(path.read_bytes()) // 2)
    with pytest.raises(IntegrityError, match="altered or only partly written"):  # the digest beside it
        load_session(path, "cpu")
    with pytest.raises(IntegrityError, match="altered or replaced"):
        load_session(path, "cpu", expected_sha256=plain.sha256)


@pytest.fixture
def forced_external(monkeypatch):
    """Weights written as external data even for a tiny model (the > 2 GB path)."""
    monkeypatch.setattr(TO_ONNX, "_TWO_GB", 64 * 1024**2 + 1)


@pytest.mark.parametrize("key", [None, KEY], ids=["digest", "hmac"])
def test_external_data_is_bound_by_the_graph(forced_external, tmp_path, key) -> None:
    model = DemoNet(width=4, hidden=8).eval()
    x = torch.rand(2, 1, 28, 28)
    rep = to_onnx(model, tmp_path / "m.onnx", x, key=key, parity_inputs=x)
    assert rep.external_data and rep.external_files == ["m.onnx.data"] and rep.parity["passed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["m.onnx", "m.onnx.data", "m.onnx.sha256"] + (["m.onnx.sig"] if key else [])
    )
    load_session(tmp_path / "m.onnx", "cpu", key=key, expected_sha256=rep.sha256)
    flip_last_byte(tmp_path / "m.onnx.data", offset=17)
    with pytest.raises(IntegrityError, match="external data file .* was altered"):
        load_session(tmp_path / "m.onnx", "cpu", key=key, expected_sha256=rep.sha256)


def test_failed_export_leaves_the_old_graph_and_no_temporary_files(tmp_path, monkeypatch) -> None:
    model = DemoNet(width=4, hidden=8).eval()
    x = torch.rand(2, 1, 28, 28)
    good = to_onnx(model, tmp_path / "m.onnx", x)
    before = (tmp_path / "m.onnx").read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("checker failed")

    monkeypatch.setattr(onnx.checker, "check_model", broken)
    with pytest.raises(RuntimeError, match="checker failed"):
        to_onnx(DemoNet(width=4, hidden=8), tmp_path / "m.onnx", x)
    assert (tmp_path / "m.onnx").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.sha256"]  # no .tmp left behind
    load_session(tmp_path / "m.onnx", "cpu", expected_sha256=good.sha256)


def test_unsigned_export_removes_a_stale_signature(tmp_path) -> None:
    model = DemoNet(width=4, hidden=8).eval()
    x = torch.rand(2, 1, 28, 28)
    to_onnx(model, tmp_path / "m.onnx", x, key=KEY)
    assert (tmp_path / "m.onnx.sig").is_file()
    to_onnx(model, tmp_path / "m.onnx", x)
    assert not (tmp_path / "m.onnx.sig").exists()
    load_session(tmp_path / "m.onnx", "cpu")
