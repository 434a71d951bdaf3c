import json

import pytest
import torch

from guard.audit import run_audit
from guard.cli import main


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "audit" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["audit", "--help"])
    assert "--demo" in capsys.readouterr().out


def test_cli_errors_are_clear(capsys):
    assert main(["audit", "--model", "x:y", "--out", "unused"]) == 2
    assert "--model needs --data" in capsys.readouterr().err


def test_audit_model_section_with_user_folder(tmp_path, tiny_model, capsys):
    """`guard audit --model FILE --data DIR`: a user's TorchScript model on an image folder."""
    from PIL import Image

    from guard.data import demo_data

    _, test = demo_data()
    for i in range(40):
        d = tmp_path / "data" / str(int(test.y[i]))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((test.x[i, 0] * 255).byte().numpy()).save(d / f"{i}.png")
    ts = tmp_path / "m.pt"
    torch.jit.save(torch.jit.trace(tiny_model, test.x[:2]), str(ts))
    rc = main(["audit", "--model", str(ts), "--data", str(tmp_path / "data"), "--grayscale", "--out", str(tmp_path / "o"), "--quick", "-q", "--no-export"])
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    # Logit-only attacks run on a TorchScript model; steps that need layer features fail
    # cleanly, are recorded, and the command exits 1 instead of losing the other sections.
    assert {"fgsm", "pgd", "patch_gan"} <= set(rep["attacks"])
    assert rep["attacks"]["patch_gan"]["params"]["alpha"] == 0.0
    errors = rep.get("errors", {})
    assert rc == (1 if errors else 0)
    assert errors and all(msg.startswith("ValueError: model is a TorchScript module") for msg in errors.values()), errors
    assert "guard audit: step" in capsys.readouterr().err or not errors
    assert rep["version"] == 1
    m = rep["model"]
    assert m["data"]["train"] + m["data"]["test"] == 40 and m["data"]["test"] == 8
    assert 0.0 <= m["clean_accuracy"] <= 1.0


def test_audit_resume_skips_completed_steps(tmp_path, tiny_model, small_split):
    train, test = small_split
    calls = []
    import guard.audit_model as am

    steps = [("model", "guard.audit_model:run"), ("missing", "guard.no_such_step:run")]
    rep = run_audit(tiny_model, train, test, tmp_path, steps=steps)
    assert rep["_completed_steps"] == ["model"]
    real = am.run
    am.run = lambda ctx: calls.append(1) or real(ctx)
    try:
        run_audit(tiny_model, train, test, tmp_path, steps=steps, resume=True)
        assert calls == []  # not recomputed
        run_audit(tiny_model, train, test, tmp_path, steps=steps, resume=False)
        assert calls == [1]
    finally:
        am.run = real
    (tmp_path / "report.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        run_audit(tiny_model, train, test, tmp_path, steps=steps, resume=True)


@pytest.mark.slow
def test_demo_audit_model_section(tmp_path, demo_net):
    from guard.data import demo_data

    train, test = demo_data()
    rep = run_audit(demo_net, train, test, tmp_path, steps=[("model", "guard.audit_model:run")])
    assert rep["model"]["num_classes"] == 10 and rep["model"]["clean_accuracy"] >= 0.98
    assert rep["model"]["data"] == {"source": "user data", "train": 8000, "test": 2000}


def test_skipped_step_runs_on_resume_when_enabled(tmp_path, tiny_model, small_split):
    """A step skipped by an option (returns False) is not marked complete."""
    import types

    from guard.audit import AuditOptions

    mod = types.ModuleType("guard_test_optional_step")

    def step(ctx):
        if not ctx.options.harden:
            ctx.report["opt"] = {"skipped": True}
            return False
        ctx.report["opt"] = {"ran": True}

    mod.run = step
    import sys

    sys.modules[mod.__name__] = mod
    try:
        steps = [("opt", f"{mod.__name__}:run")]
        train, test = small_split
        rep = run_audit(tiny_model, train, test, tmp_path, steps=steps)
        assert rep["opt"] == {"skipped": True} and "opt" not in rep["_completed_steps"]
        rep = run_audit(tiny_model, train, test, tmp_path, steps=steps, resume=True, options=AuditOptions(harden=True))
        assert rep["opt"] == {"ran": True} and rep["_completed_steps"] == ["opt"]
    finally:
        del sys.modules[mod.__name__]
