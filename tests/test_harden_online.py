"""guard.harden's online methods: attacks that ascend, steps that descend, the reject option, resume, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import guard
from guard.training import HardenConfig, harden
from guard.training.harden import CheckpointMismatch
from guard.training.online import OnlineHardener
from guard.training.online_losses import ONLINE_METHODS, attack_batch, method_loss, wrong_real_margin
from guard.training.reject import grow_head


def _toy(n: int, seed: int) -> guard.Split:
    """A planted two-class problem on 1x6x6 images: class 1 has a brighter left half (by 0.3)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 1, 6, 6, generator=g) * 0.4 + 0.3
    x[:, :, :, :3] += 0.3 * (y.float() * 2 - 1)[:, None, None, None] / 2
    return guard.Split(x.clamp(0, 1), y)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 2))


@pytest.fixture(scope="module")
def toy_model() -> nn.Module:
    data = _toy(512, 0)
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(net(data.x), data.y).backward()
        opt.step()
    return net.eval()


def _objective(
    method: str, net: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, n: int
) -> torch.Tensor:
    z = net(x_adv)
    if method == "trades":
        return F.kl_div(F.log_softmax(z, 1), F.softmax(net(x), 1), reduction="sum")
    if method == "reject":
        return wrong_real_margin(z, y, n).sum()
    return F.cross_entropy(z, y, reduction="sum")


@pytest.mark.parametrize("method", ONLINE_METHODS)
def test_training_attack_ascends_its_objective_within_the_ball(method, toy_model):
    grown, _ = grow_head(toy_model)
    grown.eval()
    data = _toy(128, 1)
    eps = 0.1
    x_adv = attack_batch(
        grown,
        data.x,
        data.y,
        method=method,
        eps=eps,
        steps=5,
        step_size=0.03,
        n=2,
        gen=torch.Generator().manual_seed(0),
    )
    assert (x_adv - data.x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    noise = (data.x + (torch.rand(data.x.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1) * eps).clamp(0, 1)
    with torch.no_grad():
        attacked = _objective(method, grown, data.x, x_adv, data.y, 2)
        random = _objective(method, grown, data.x, noise, data.y, 2)
    assert attacked > random + 1.0  # an attack stepping the wrong way ends below random noise


@pytest.mark.parametrize("method", ONLINE_METHODS)
def test_training_step_lowers_the_adversarial_loss_on_its_batch(method, toy_model):
    grown, _ = grow_head(toy_model)
    data = _toy(128, 2)
    grown.eval()
    x_adv = attack_batch(
        grown,
        data.x,
        data.y,
        method=method,
        eps=0.1,
        steps=5,
        step_size=0.03,
        n=2,
        gen=torch.Generator().manual_seed(0),
    )
    opt = torch.optim.SGD(grown.parameters(), lr=0.05)
    kw = dict(method=method, n=2, beta=6.0, reject_weight=1.0)
    before = method_loss(grown, data.x, data.y, x_adv, **kw)
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = method_loss(grown, data.x, data.y, x_adv, **kw)
    assert after < before - 1e-4


def test_reject_loss_is_zero_only_where_the_adversarial_image_is_right_or_rejected():
    logits = torch.tensor([[5.0, -5.0, -5.0], [-5.0, -5.0, 5.0], [-5.0, 5.0, -5.0]])  # right, rejected, wrong real
    y = torch.zeros(3, dtype=torch.long)
    net = nn.Identity()
    per = [
        float(
            method_loss(
                net,
                logits[i : i + 1] * 0 + torch.tensor([[10.0, -10, -10]]),
                y[:1],
                logits[i : i + 1],
                method="reject",
                n=2,
                beta=0.0,
                reject_weight=1.0,
            )
        )
        for i in range(3)
    ]
    assert per[0] < 1e-3 and per[1] < 1e-3 and per[2] > 5.0


def _fresh_wrong_real(model: guard.RejectClassifier, data: guard.Split, eps: float) -> float:
    """Share of images a fresh 20-step reject-aware PGD pushes to a wrong real class."""
    x_adv = attack_batch(
        model,
        data.x,
        data.y,
        method="reject",
        eps=eps,
        steps=20,
        step_size=eps / 8,
        n=2,
        gen=torch.Generator().manual_seed(9),
    )
    with torch.no_grad():
        pred = model(x_adv).argmax(1)
    return float(((pred != data.y) & (pred != 2)).float().mean())


def test_reject_method_resists_fresh_attacks_better_than_the_offline_archive(toy_model):
    train, held = _toy(512, 3), _toy(256, 4)
    eps = 0.12
    online = harden(
        toy_model,
        train,
        test=held,
        config=HardenConfig.online(
            "reject", eps=eps, epochs=6, batch_size=64, lr=0.05, attack_steps=5, monitor_images=0
        ),
        progress=False,
    ).model
    offline = harden(
        toy_model,
        train,
        test=held,
        rounds=2,
        epochs_per_round=3,
        attacks=("pgd",),
        lr=3e-3,
        seed=0,
        batch_size=64,
        progress=False,
    ).model
    broken_online, broken_offline = _fresh_wrong_real(online, held, eps), _fresh_wrong_real(offline, held, eps)
    with torch.no_grad():
        clean = (online(held.x).argmax(1) == held.y).float().mean()
    assert clean > 0.8
    assert broken_online < broken_offline - 0.2, (broken_online, broken_offline)


def _cfg(**kw) -> HardenConfig:
    base = dict(eps=0.1, epochs=2, batch_size=32, attack_steps=2, monitor_images=16, eps_warmup_epochs=0.5)
    return HardenConfig.online(kw.pop("method", "pgd"), **{**base, **kw})


@pytest.mark.parametrize("method", ["pgd", "reject"])
def test_resume_mid_epoch_is_bit_identical(method, toy_model, tmp_path, monkeypatch):
    train, held = _toy(160, 5), _toy(32, 6)
    ref = harden(toy_model, train, test=held, config=_cfg(method=method), progress=False).model
    calls = {"n": 0}
    real = OnlineHardener._checkpoint

    def dying(self):
        real(self)
        calls["n"] += 1
        if calls["n"] == 4:  # killed right after the 4th checkpoint (inside epoch 2 with checkpoint_every=2)
            raise KeyboardInterrupt

    monkeypatch.setattr(OnlineHardener, "_checkpoint", dying)
    with pytest.raises(KeyboardInterrupt):
        harden(
            toy_model,
            train,
            test=held,
            config=_cfg(method=method),
            checkpoint_dir=tmp_path,
            checkpoint_every=2,
            progress=False,
        )
    monkeypatch.setattr(OnlineHardener, "_checkpoint", real)
    resumed = harden(
        toy_model,
        train,
        test=held,
        config=_cfg(method=method),
        checkpoint_dir=tmp_path,
        resume=True,
        checkpoint_every=2,
        progress=False,
    )
    for (k, a), b in zip(ref.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert len(resumed.history) == 2


def test_resume_refuses_other_settings(toy_model, tmp_path):
    train, held = _toy(64, 7), _toy(16, 8)
    harden(toy_model, train, test=held, config=_cfg(epochs=1), checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointMismatch, match="eps"):
        harden(
            toy_model,
            train,
            test=held,
            config=_cfg(epochs=1, eps=0.2),
            checkpoint_dir=tmp_path,
            resume=True,
            progress=False,
        )


def test_online_history_and_model_shape(toy_model):
    train, held = _toy(64, 9), _toy(32, 10)
    res = harden(toy_model, train, test=held, config=_cfg(method="fgsm_rs"), progress=False)
    assert isinstance(res.model, guard.RejectClassifier) and res.model.num_classes == 2
    assert [h["epoch"] for h in res.history] == [1, 2] and res.archive_size == 0
    assert res.history[0]["monitor"]["n"] == 16 and "clean_accuracy" in res.baseline
    assert res.config.method == "fgsm_rs"
    assert toy_model[3].out_features == 2  # the caller's model is untouched


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(method="madry"), ValueError, "method"),
        (dict(eps=1.5), ValueError, "eps"),
        (dict(eps=-0.1), ValueError, "eps"),
        (dict(eps=None), ValueError, "eps"),
        (dict(attack_steps=0), ValueError, "attack_steps"),
        (dict(epochs=0), ValueError, "epochs"),
    ],
)
def test_bad_settings_raise(kw, err, match, toy_model):
    base = dict(method="pgd", eps=0.1, epochs=1, batch_size=32)
    with pytest.raises(err, match=match):
        harden(toy_model, _toy(32, 11), progress=False, **{**base, **kw})


def test_model_without_a_head_and_reject_images_raise(toy_model):
    headless = nn.Sequential(nn.Flatten(), nn.ReLU())
    with pytest.raises(ValueError, match="nn.Linear"):
        harden(headless, _toy(32, 12), method="pgd", eps=0.1, progress=False)
    with pytest.raises(ValueError, match="reject_images"):
        harden(toy_model, _toy(32, 12), method="pgd", eps=0.1, reject_images=torch.rand(4, 1, 6, 6), progress=False)


def test_demo_model_variants_are_checked():
    with pytest.raises(ValueError, match="variant"):
        guard.demo_model("mnist", variant="robust")
    with pytest.raises(ValueError, match="variant"):
        guard.demo_model("cifar10", variant="sturdy")


def test_cli_harden_online_writes_its_epochs(tmp_path, monkeypatch, capsys):
    from guard.cli import main

    rc = main(
        [
            "harden",
            "--demo",
            "--train-size",
            "96",
            "--test-size",
            "32",
            "--method",
            "fgsm_rs",
            "--eps",
            "0.2",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--out",
            str(tmp_path),
            "--threads",
            "1",
            "-q",
        ]
    )
    assert rc == 0
    import json

    section = json.loads((tmp_path / "harden.json").read_text())["harden"]
    assert section["method"] == "fgsm_rs" and [r["epoch"] for r in section["rounds"]] == [1]
    assert section["settings"]["eps"] == 0.2 and section["settings"]["lr"] == 0.05
    loaded = guard.RejectClassifier.load(tmp_path / "hardened_model.safetensors", guard.demo_model(progress=False))
    assert loaded.num_classes == 10


def test_shipped_robust_variant_is_hash_checked(tmp_path):
    import shutil
    from importlib import resources

    from guard.demo import cifar10_model

    src = resources.files("guard") / "_data" / "cifar10"
    for name in ("resnet20.safetensors", "resnet20.json", "resnet20-robust.safetensors", "resnet20-robust.json"):
        shutil.copy(str(src / name), tmp_path / name)
    model = cifar10_model(tmp_path, variant="robust")
    assert isinstance(model, guard.RejectClassifier) and model.num_classes == 10
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 11)
    blob = bytearray((tmp_path / "resnet20-robust.safetensors").read_bytes())
    blob[-10] ^= 0xFF
    (tmp_path / "resnet20-robust.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ValueError):
        cifar10_model(tmp_path, variant="robust")
