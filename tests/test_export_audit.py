"""The audit's export step: model.onnx and report["export"] (quick mode); fp16 backbone.

Each export takes 5-20 s on two loaded cores, so these end-to-end runs are marked slow.
"""

from __future__ import annotations

import pytest
import torch

import guard
from guard.attacks.gradient import FGSM
from guard.audit import AttackSet, AuditContext, AuditOptions, run_audit, step


def _ctx(model, small_split, tmp_path, **opts) -> AuditContext:
    train, test = small_split
    return AuditContext(
        model=model,
        model_name="tiny",
        train=train,
        test=test,
        data_source="test",
        out=tmp_path,
        options=AuditOptions(quick=True, progress=False, **opts),
    )


def test_export_step_skipped_without_option(tiny_model, small_split, tmp_path):
    train, test = small_split
    rep = run_audit(
        tiny_model,
        train,
        test,
        tmp_path,
        options=AuditOptions(quick=True, progress=False, export=False),
        steps=[step("export")],
    )
    assert "export" not in rep and "export" in rep["skipped"] and not (tmp_path / "model.onnx").exists()


@pytest.mark.slow
def test_export_step_guarded_quick(tiny_model, small_split, tmp_path):
    train, test = small_split
    ctx = _ctx(tiny_model, small_split, tmp_path)
    g = guard.wrap(tiny_model, ["knn", "ppca", "saliency"]).fit(train)
    g.calibrate(test.x[:128])
    attacks = AttackSet({"fgsm": FGSM(eps=0.3)(tiny_model, test.x[:32], test.y[:32])})
    step("export").run(ctx, guarded=g, attacks=attacks)
    sec = ctx.report["export"]
    assert (tmp_path / "model.onnx").is_file() and sec["path"] == str(tmp_path / "model.onnx")
    assert sec["source"] == "guarded" and isinstance(sec["opset"], int)
    assert sec["parity"]["logits"]["max_abs"] <= 1e-4
    assert set(sec["parity_full"]) == {"clean", "fgsm"}
    assert sec["parity_full"]["fgsm"]["pred"]["agreement"] == 1.0
    assert sec["providers"] == ["CPUExecutionProvider"]
    assert sec["latency_ms"]["batch_1"]["onnxruntime_cpu_ms"] > 0
    assert isinstance(sec["flags_identical"], bool)  # (speed is measured in benchmarks/, never asserted)


@pytest.mark.slow
def test_fp16_backbone_keeps_heads_in_fp32(tiny_model, small_split, tmp_path):
    from guard.export import load_session, to_onnx

    train, test = small_split
    g = guard.wrap(tiny_model, ["knn", "ppca"]).fit(train)
    g.calibrate(test.x[:128])
    rep = to_onnx(g, tmp_path / "h.onnx", test.x[:8], fp16_backbone=True)
    out = load_session(tmp_path / "h.onnx", "cpu").run(test.x[128:192])
    logits, scores, _ = g.score(test.x[128:192])
    assert rep.fp16_backbone
    assert out["knn_distance"].dtype.name == "float32" and out["ppca_loglik"].dtype.name == "float32"
    assert (out["pred"] == logits.argmax(1).numpy()).mean() >= 0.98
    assert torch.allclose(torch.from_numpy(out["logits"]), logits, atol=0.05)


@pytest.mark.slow
def test_export_step_hardened_refits_the_guarded_heads(tiny_model, small_split, tmp_path):
    from guard.training.reject import RejectClassifier, grow_head

    train, test = small_split
    ctx = _ctx(tiny_model, small_split, tmp_path)
    g = guard.wrap(tiny_model, ["knn", "ppca"]).fit(train)
    g.calibrate(test.x[:128])
    net, head_name = grow_head(tiny_model)
    step("export").run(ctx, guarded=g, hardened=RejectClassifier(net, 10, head_name))
    sec = ctx.report["export"]
    assert sec["source"] == "hardened+guarded"
    assert "reject_prob" in sec["outputs"] and "knn_score" in sec["outputs"]
    assert sec["parity_full"]["clean"]["pred"]["agreement"] == 1.0


def test_audit_signs_with_key_env_and_refuses_a_swapped_folder_on_resume(
    tiny_model, small_split, tmp_path, monkeypatch
):
    """``AuditOptions(key_env=...)``: OUT/guarded is signed; resume verifies it against the key and the report's digest."""
    from integrity_tools import KEY

    from guard.core.integrity import IntegrityError

    train, test = small_split
    monkeypatch.setenv("AUDIT_KEY", KEY.decode())
    opts = AuditOptions(quick=True, progress=False, key_env="AUDIT_KEY")
    rep = run_audit(tiny_model, train, test, tmp_path, options=opts, steps=[step("detectors")])
    info = rep["detectors_info"]
    assert info["signed"] and info["sha256"] == (tmp_path / "guarded" / "guarded.json.sha256").read_text().split()[0]
    with pytest.raises(IntegrityError, match="is signed"):
        guard.GuardedModel.load(tmp_path / "guarded", tiny_model)
    guard.GuardedModel.load(tmp_path / "guarded", tiny_model, key=KEY, expected_sha256=info["sha256"])
    # another validly signed folder put in its place: the digest in the report refuses it on resume
    guard.wrap(tiny_model, ["knn"]).fit(train).calibrate(test.x[:128]).save(tmp_path / "guarded", key=KEY)
    with pytest.raises(IntegrityError, match="altered or replaced"):
        run_audit(
            tiny_model, train, test, tmp_path, options=opts, steps=[step("detectors"), step("adaptive")], resume=True
        )
