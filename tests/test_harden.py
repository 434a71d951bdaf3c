"""guard.harden: reject head, round attacks, checkpoints and resume, bad input, audit wiring."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import guard
from guard.core.models import DemoNet
from guard.training.checkpoint import load_checkpoint, optimizer_from_tensors, optimizer_to_tensors, save_checkpoint
from guard.training.harden import harden
from guard.training.reject import REJECT, RejectClassifier, grow_head
from guard.training.round_attacks import (
    ROUND_ATTACKS,
    AttackBudget,
    check_attacks,
    generate_round_attacks,
    score_attack_set,
)

QUICK = AttackBudget.quick()
SMALL = dict(rounds=2, epochs_per_round=2, budget=QUICK, progress=False, seed=3, lr=3e-3)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_split(small_split):
    """256 training and 128 held-out images: enough for the checks, cheap on two cores."""
    train, test = small_split
    return guard.Split(train.x[:256], train.y[:256]), guard.Split(test.x[:128], test.y[:128])


# ------------------------------------------------------------------ reject head


def test_grow_head_keeps_rows_and_predictions(tiny_model, small_split):
    _, test = small_split
    before = _state(tiny_model)
    grown, name = grow_head(tiny_model)
    assert name == "fc2"
    assert grown is not tiny_model and grown.fc2.out_features == 11
    assert torch.equal(grown.fc2.weight[:10], tiny_model.fc2.weight)
    assert torch.equal(grown.fc2.bias[:10], tiny_model.fc2.bias)
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    assert tiny_model.fc2.out_features == 10
    with torch.no_grad():
        tiny_model.eval()
        grown.eval()
        old = tiny_model(test.x).argmax(1)
        new = grown(test.x)
    assert torch.equal(new[:, :10], tiny_model(test.x).detach())
    assert torch.equal(new.argmax(1), old)  # the new row never wins before training


def test_grow_head_named_head_in_sequential():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3), nn.Softmax(1))
    grown, name = grow_head(model, head="3")
    assert name == "3" and grown[3].out_features == 4 and model[3].out_features == 3
    with pytest.raises(ValueError, match="nn.Linear"):
        grow_head(model, head="2")


def test_reject_classifier_predict_maps_reject_to_minus_one(tiny_model, small_split):
    _, test = small_split
    grown, name = grow_head(tiny_model)
    rc = RejectClassifier(grown, 10, name)
    x = test.x[:20]
    assert torch.equal(rc.predict(x), tiny_model(x).argmax(1))
    with torch.no_grad():
        grown.fc2.bias[10] = 1e4  # reject wins everywhere
    assert (rc.predict(x) == REJECT).all()
    assert torch.allclose(rc.reject_probability(x), torch.ones(20))
    with pytest.raises(ValueError, match="num_classes \\+ 1"):
        RejectClassifier(tiny_model, 10, "fc2")


# ------------------------------------------------------------------ bad input


def test_bad_input_errors(tiny_model, small_split):
    train, test = small_split
    no_head = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
    with pytest.raises(ValueError, match="no nn.Linear"):
        harden(no_head, train, **SMALL)
    with pytest.raises(ValueError, match="num_classes=5 does not match"):
        harden(tiny_model, train, num_classes=5, **SMALL)
    five = DemoNet(num_classes=5, width=4, hidden=8)
    with pytest.raises(ValueError, match="num_classes mismatch"):
        harden(five, train, **SMALL)
    with pytest.raises(ValueError, match="'rounds' parameter of harden must be an int >= 1"):
        harden(tiny_model, train, **{**SMALL, "rounds": 0})
    with pytest.raises(ValueError, match="empty list"):
        harden(tiny_model, train, attacks=[], **SMALL)
    with pytest.raises(ValueError, match="unknown round attack"):
        harden(tiny_model, train, attacks=["fooling_gradient", "nope"], **SMALL)
    with pytest.raises(ValueError, match="reject_share"):
        harden(tiny_model, train, reject_share=0.9, **SMALL)
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        harden(tiny_model, train, resume=True, **SMALL)
    with pytest.raises(TypeError, match="nn.Module"):
        harden("model", train, **SMALL)


def test_check_attacks_accepts_comma_string():
    assert check_attacks("fooling_gradient,universal_patch") == ("fooling_gradient", "universal_patch")
    with pytest.raises(ValueError, match="twice"):
        check_attacks(["pgd", "pgd"])


# ------------------------------------------------------------------ round attacks


def test_round_attacks_images_valid_and_seeded(tiny_model, small_split):
    train, _ = small_split
    before = _state(tiny_model)
    grads = [None if p.grad is None else p.grad.clone() for p in tiny_model.parameters()]
    kw = dict(num_classes=10, image_shape=(1, 28, 28), pool=(train.x, train.y), budget=QUICK, seed=5)
    a = generate_round_attacks(tiny_model, ROUND_ATTACKS, **kw)
    b = generate_round_attacks(tiny_model, ROUND_ATTACKS, **kw)
    assert torch.equal(a.x, b.x)
    assert a.x.dtype == torch.float32 and a.x.min() >= 0 and a.x.max() <= 1 and a.x.shape[1:] == (1, 28, 28)
    assert a.names == list(ROUND_ATTACKS)
    for i, name in enumerate(ROUND_ATTACKS):
        m = a.kind == i
        if name.startswith("fooling"):
            assert sorted(set(a.target[m].tolist())) == list(range(10)) and (a.source[m] == -1).all()
        else:
            assert int(m.sum()) == QUICK.patch_images and (a.source[m] >= 0).all()
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    for g, p in zip(grads, tiny_model.parameters()):  # gradients only w.r.t. the inputs
        assert (g is None and p.grad is None) or torch.equal(g, p.grad)
    s = score_attack_set(tiny_model, a, 10)
    assert s["rejected_share"] == 0.0  # a 10-output model cannot reject
    # the rates on a model whose answer is known: it says "3" with certainty, whatever the image
    sure3 = _Constant(3, outputs=10)
    c = score_attack_set(sure3, a, 10)
    patch = a.mask(("universal_patch", "random_patch"))
    assert c["fooling_classes_ge99"] == pytest.approx(1 / 10)  # only class 3 is ever reached
    assert c["patch_fooling_rate"] == pytest.approx(float((a.source[patch] != 3).float().mean()))
    assert c["rejected_share"] == 0.0
    # and the trained model: the share of classes the fooling images reach at >= 99%, counted by hand
    with torch.no_grad():
        probs = torch.softmax(tiny_model(a.x), 1)
    fool = a.mask(("fooling_gradient", "fooling_direct", "fooling_cppn"))
    reached = {int(k) for k in range(10) if float(probs[fool][:, k].max()) >= 0.99}
    assert s["fooling_classes_ge99"] == pytest.approx(len(reached) / 10)
    pp = probs[patch].argmax(1)
    assert s["patch_fooling_rate"] == pytest.approx(float((pp != a.source[patch]).float().mean()))
    # an 11-output model that always rejects: every image rejected, nothing counted as fooled
    rej = score_attack_set(_Constant(10, outputs=11), a, 10)
    assert rej["rejected_share"] == 1.0 and rej["patch_fooling_rate"] == 0.0 and rej["fooling_classes_ge99"] == 0.0


class _Constant(nn.Module):
    """Logits that put (almost) all probability on one output, whatever the input."""

    def __init__(self, k: int, outputs: int) -> None:
        super().__init__()
        self.k, self.outputs = k, outputs
        self.w = nn.Parameter(torch.zeros(1))  # a parameter, so that device lookups find one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], self.outputs) + 0.0 * self.w
        out[:, self.k] = 30.0
        return out


def test_gradient_fooling_reaches_high_confidence(tiny_model):
    budget = AttackBudget(per_class=1, gradient_steps=60)
    s = generate_round_attacks(
        tiny_model,
        ["fooling_gradient"],
        num_classes=10,
        image_shape=(1, 28, 28),
        pool=(torch.zeros(1, 1, 28, 28), torch.zeros(1, dtype=torch.long)),
        budget=budget,
        seed=0,
    )
    assert score_attack_set(tiny_model, s, 10)["fooling_median_confidence"] > 0.9


# ------------------------------------------------------------------ harden


def test_harden_returns_reject_model_and_history(tiny_model, small_split):
    train, test = small_split
    before = _state(tiny_model)
    res = harden(tiny_model, train, test=test, **SMALL)
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    assert isinstance(res.model, RejectClassifier) and res.model.num_classes == 10
    assert res.model(test.x[:4]).shape == (4, 11)
    assert [h["round"] for h in res.history] == [1, 2]
    for h in res.history:
        for key in (
            "clean_accuracy",
            "fooling_classes_ge99",
            "fooling_median_confidence",
            "patch_fooling_rate",
            "rejected_share_of_round_attacks",
        ):
            assert h[key] is not None, key
    # the last round's clean figures are those of the returned model on the held-out split
    # (a rejected image counts as an error)
    final = res.model.predict(test.x)
    assert res.history[-1]["clean_accuracy"] == pytest.approx(float((final == test.y).float().mean()))
    assert res.history[-1]["clean_rejected_share"] == pytest.approx(float((final == -1).float().mean()))
    assert res.history[-1]["clean_accuracy"] > 0.5  # hardening kept the classifier (the tiny model: ~90%)
    assert res.history[1]["archive_size"] == res.history[0]["n_round_attacks"] + res.history[1]["n_round_attacks"]
    assert res.baseline["round"] == 0 and "fresh" in res.baseline
    pred = res.model.predict(test.x)
    assert set(pred.unique().tolist()) <= set(range(-1, 10))
    # the model learned to reject what it was trained on
    assert res.history[-1]["rejected_share_of_round_attacks"] > 0.5


def test_harden_is_deterministic(tiny_model, tiny_split):
    train, test = tiny_split
    kw = {**SMALL, "rounds": 1}
    a = harden(tiny_model, train, test=test, **kw)
    b = harden(tiny_model, train, test=test, **kw)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_harden_continues_a_reject_classifier(tiny_model, tiny_split):
    train, test = tiny_split
    kw = {**SMALL, "rounds": 1, "epochs_per_round": 1}
    first = harden(tiny_model, train, test=test, **kw)
    second = harden(first.model, (train, test), **kw)
    assert second.model.num_classes == 10 and second.model(test.x[:2]).shape == (2, 11)
    assert second.model.model is not first.model.model


# ------------------------------------------------------------------ checkpoints and resume


def test_optimizer_state_round_trip(tmp_path, tiny_model, small_split):
    train, _ = small_split
    grown, _ = grow_head(tiny_model)
    opt = torch.optim.Adam(grown.parameters(), lr=1e-3)
    loss = nn.functional.cross_entropy(grown(train.x[:8]), train.y[:8])
    loss.backward()
    opt.step()
    tensors, meta = optimizer_to_tensors(opt)
    opt2 = torch.optim.Adam(grown.parameters(), lr=1e-3)
    opt2.load_state_dict(optimizer_from_tensors(tensors, json.loads(json.dumps(meta))))
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for i in s1["state"]:
        for k in s1["state"][i]:
            assert torch.equal(torch.as_tensor(s1["state"][i][k]), torch.as_tensor(s2["state"][i][k]))
    save_checkpoint(tmp_path, grown, opt, {"round_done": 1}, {"archive_x": train.x[:3]})
    model_state, opt_state, extra, meta = load_checkpoint(tmp_path)
    assert meta["round_done"] == 1 and torch.equal(extra["archive_x"], train.x[:3])
    assert all(torch.equal(model_state[k], v) for k, v in grown.state_dict().items())
    assert not list(tmp_path.glob("*.tmp"))


class _Stop(KeyboardInterrupt):
    pass


def test_resume_after_interrupt_equals_uninterrupted(tmp_path, tiny_model, tiny_split):
    train, test = tiny_split
    kw = {**SMALL, "rounds": 2}
    full = harden(tiny_model, train, test=test, **kw)

    seen: list[tuple[int, int]] = []

    def crash(r: int, e: int, model: nn.Module) -> None:
        seen.append((r, e))
        if (r, e) == (2, 0):  # mid-round: round 2's attacks done, one of its two epochs done
            raise _Stop

    with pytest.raises(_Stop):
        harden(tiny_model, train, test=test, checkpoint_dir=tmp_path, on_epoch_end=crash, **kw)
    meta = load_checkpoint(tmp_path)[3]
    assert (meta["round_done"], meta["epoch_done"], meta["cur_round"]) == (1, 0, 2)

    after: list[tuple[int, int]] = []
    resumed = harden(
        tiny_model,
        train,
        test=test,
        checkpoint_dir=tmp_path,
        resume=True,
        on_epoch_end=lambda r, e, m: after.append((r, e)),
        **kw,
    )
    assert after == [(2, 1)]  # no finished epoch is redone
    sf, sr = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(sf[k], sr[k]) for k in sf)
    assert [h["clean_accuracy"] for h in full.history] == [h["clean_accuracy"] for h in resumed.history]
    strip = lambda d: {k: v for k, v in d.items() if k != "attack_seconds"}  # noqa: E731
    assert strip(full.history[-1]["fresh"]) == strip(resumed.history[-1]["fresh"])
    with pytest.raises(ValueError, match="2 finished rounds"):
        harden(tiny_model, train, test=test, checkpoint_dir=tmp_path, resume=True, **{**kw, "rounds": 1})


def test_resume_with_other_settings_is_refused(tmp_path, tiny_model, tiny_split):
    train, test = tiny_split
    kw = {**SMALL, "rounds": 1, "epochs_per_round": 1}
    harden(tiny_model, train, test=test, checkpoint_dir=tmp_path, **kw)
    with pytest.raises(ValueError, match="cannot resume.*reject_share"):
        harden(tiny_model, train, test=test, checkpoint_dir=tmp_path, resume=True, reject_share=0.2, **kw)
    with pytest.raises(ValueError, match="cannot resume.*model_digest"):
        harden(DemoNet(width=8, hidden=32), train, test=test, checkpoint_dir=tmp_path, resume=True, **kw)
    with pytest.raises(ValueError, match="cannot resume.*data_digest"):
        harden(
            tiny_model,
            guard.Split(train.x.flip(0), train.y.flip(0)),
            test=test,
            checkpoint_dir=tmp_path,
            resume=True,
            **kw,
        )
    (tmp_path / "harden_state.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        harden(tiny_model, train, test=test, checkpoint_dir=tmp_path, resume=True, **kw)


def test_resume_finished_run_does_no_work(tmp_path, tiny_model, tiny_split):
    train, test = tiny_split
    kw = {**SMALL, "rounds": 1, "epochs_per_round": 1}
    a = harden(tiny_model, train, test=test, checkpoint_dir=tmp_path, **kw)
    calls: list = []
    b = harden(
        tiny_model,
        train,
        test=test,
        checkpoint_dir=tmp_path,
        resume=True,
        on_epoch_end=lambda *x: calls.append(x),
        **kw,
    )
    assert calls == []
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())


# ------------------------------------------------------------------ audit wiring


def test_audit_step_quick(tmp_path, tiny_model, small_split):
    from guard.audit import AuditContext, AuditOptions, run_audit, step

    train, test = small_split
    steps = [step("model"), step("harden")]
    report = run_audit(
        tiny_model,
        train,
        test,
        tmp_path / "a",
        options=AuditOptions(quick=True, harden=True, progress=False),
        steps=steps,
    )
    h = report["harden"]
    assert len(h["rounds"]) == 1
    row = h["rounds"][0]
    for key in (
        "round",
        "clean_accuracy",
        "fooling_classes_ge99",
        "fooling_median_confidence",
        "patch_fooling_rate",
        "rejected_share_of_round_attacks",
    ):
        assert key in row
    assert (tmp_path / "a" / "artifacts" / "hardened_model.safetensors").is_file()
    on_disk = json.loads((tmp_path / "a" / "report.json").read_text())
    assert on_disk["harden"]["rounds"][0]["clean_accuracy"] == row["clean_accuracy"]
    from guard.report.schema import unknown_keys

    assert unknown_keys(on_disk) == []  # the harden section is in report.json's schema

    skipped = run_audit(
        tiny_model, train, test, tmp_path / "b", options=AuditOptions(quick=True, progress=False), steps=steps
    )
    assert "harden" in skipped["skipped"] and "harden" not in skipped
    # a resumed audit gets the hardened model back from its file, as the export step needs it
    back = step("harden").restore(AuditContext(tiny_model, "tiny", train, test, "test", tmp_path / "a", AuditOptions()))
    assert isinstance(back, RejectClassifier) and back.num_classes == 10
    x = test.x[:16]
    assert torch.equal(
        back.predict(x),
        RejectClassifier.load(tmp_path / "a" / "artifacts" / "hardened_model.safetensors", tiny_model).predict(x),
    )


def test_guard_exposes_harden():
    assert guard.harden is harden
    assert guard.RejectClassifier is RejectClassifier


def test_round_schedule_is_guards_own_attacks(tiny_model, small_split):
    """The rounds run configured instances of guard.attacks, aimed at real classes only."""
    from guard import attacks
    from guard.training import HardenConfig, round_attack_table

    table = round_attack_table(QUICK, num_classes=10, seed=0)
    assert set(table) == set(ROUND_ATTACKS)
    kinds = {
        "fooling_gradient": attacks.FoolingGradient,
        "fooling_direct": attacks.FoolingEvolution,
        "fooling_cppn": attacks.FoolingEvolution,
        "universal_patch": attacks.UniversalPatch,
        "random_patch": attacks.RandomPatch,
        "pgd": attacks.LinfPGD,
    }
    assert all(type(table[k]) is v for k, v in kinds.items())
    assert table["fooling_cppn"].encoding == "cppn" and table["pgd"].real_classes == 10
    train, _ = small_split
    grown, _ = grow_head(tiny_model)
    with torch.no_grad():
        grown.fc2.bias[10] = 50.0  # the reject class wins everywhere: a fooling image must still aim at a real class
    s = generate_round_attacks(
        grown, ROUND_ATTACKS, num_classes=10, image_shape=(1, 28, 28), pool=(train.x, train.y), budget=QUICK, seed=1
    )
    fool = s.mask(("fooling_gradient", "fooling_direct", "fooling_cppn"))
    assert int(s.target[fool].max()) < 10 and int(s.target[fool].min()) >= 0
    with pytest.raises(TypeError, match="unknown keyword"):
        harden(tiny_model, train, attack_engine="attacks", **SMALL)
    assert HardenConfig.quick().rounds == 1 and HardenConfig().rounds == 3


@pytest.mark.parametrize("archive_n", [5, 500])
def test_epoch_set_keeps_the_reject_share(small_split, archive_n):
    from guard.training.harden import epoch_set

    train, _ = small_split
    archive = torch.rand(archive_n, 1, 28, 28)
    x, y, clean = epoch_set(train, archive, 10, 0.12, torch.Generator().manual_seed(0))
    share = float((y == 10).float().mean())
    assert abs(share - 0.12) < 0.005
    assert int(clean.sum()) == len(train) and torch.equal(x[clean], train.x)
    assert (y[~clean] == 10).all()
    if archive_n == 500:  # a large archive is subsampled without repeats
        flat = x[~clean].flatten(1)
        assert torch.unique(flat, dim=0).shape[0] == flat.shape[0]


@pytest.mark.slow
def test_cli_harden_demo_one_round(tmp_path, demo_net):
    from guard.cli import main

    out = tmp_path / "h"
    rc = main(
        [
            "harden",
            "--demo",
            "--train-size",
            "512",
            "--test-size",
            "256",
            "--rounds",
            "1",
            "--epochs-per-round",
            "1",
            "--budget",
            "quick",
            "--out",
            str(out),
            "-q",
        ]
    )
    assert rc == 0
    section = json.loads((out / "harden.json").read_text())["harden"]
    assert [r["round"] for r in section["rounds"]] == [1]
    assert section["baseline"]["clean_accuracy"] > 0.98
    assert (out / "hardened_model.safetensors").is_file() and (
        out / "checkpoints" / "harden_state.safetensors"
    ).is_file()
    back = RejectClassifier.load(out / "hardened_model.safetensors", demo_net)  # what guard export --hardened reads
    assert back.num_classes == 10 and back(guard.demo_data()[1].x[:2]).shape == (2, 11)
    with pytest.raises(ValueError, match="not a saved RejectClassifier"):
        RejectClassifier.load(out / "checkpoints" / "harden_state.safetensors", demo_net)
    assert main(["harden", "--demo", "--rounds", "0", "--out", str(out), "-q"]) == 2  # a clear error, no traceback
