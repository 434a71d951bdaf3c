"""harden(reject_images=...): known-bad images the caller brings are labelled reject from round 1 on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import guard
from guard.training.harden import CheckpointMismatch, harden
from guard.training.round_attacks import AttackBudget

RUN = dict(
    rounds=1,
    epochs_per_round=3,
    budget=AttackBudget.quick(),
    attacks=("fooling_gradient",),
    progress=False,
    seed=1,
    lr=1e-2,
    reject_share=0.3,
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 3)
    ).eval()


@pytest.fixture(scope="module")
def data() -> guard.Split:
    """Learnable classes: noise in [0, 0.3] with a brighter band of rows 3k..3k+1 for class k."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (96,), generator=g)
    x = torch.rand(96, 1, 8, 8, generator=g) * 0.3
    for k in range(3):
        x[y == k, :, 3 * k : 3 * k + 2] += 0.5
    return guard.Split(x.clamp(0, 1), y)


def _bright(n: int, seed: int) -> torch.Tensor:
    """Images unlike the data (noise with a bright horizontal band) and unlike what gradient ascent from noise
    makes: vertical stripes, the known-bad kind."""
    stripes = (torch.arange(8) % 2).float().view(1, 1, 1, 8).expand(n, 1, 8, 8) * 0.4
    return stripes + 0.1 * torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_given_images_open_the_archive_and_are_learned(data):
    bad = _bright(40, 1)
    unseen = _bright(40, 2)  # the same kind, never trained on
    plain = harden(_net(), data, **RUN)
    given = harden(_net(), data, reject_images=bad, **RUN)
    assert given.archive_size == plain.archive_size + 40
    assert given.history[0]["archive_size"] == 40 + given.history[0]["n_round_attacks"]
    # only the run that saw them learns to reject this kind; clean images are still mostly kept
    assert float((given.model.predict(unseen) == -1).float().mean()) >= 0.9
    assert float((plain.model.predict(unseen) == -1).float().mean()) <= 0.5
    assert given.history[-1]["clean_rejected_share"] <= 0.2


def test_bad_reject_images_are_refused(data):
    with pytest.raises(ValueError, match=r"reject_images must have the data's image shape \(1, 8, 8\).*\(1, 9, 9\)"):
        harden(_net(), data, reject_images=torch.rand(4, 1, 9, 9), **RUN)
    with pytest.raises(TypeError, match="reject_images must be a floating-point tensor"):
        harden(_net(), data, reject_images=torch.zeros(4, 1, 8, 8, dtype=torch.uint8), **RUN)
    with pytest.raises(ValueError, match="reject_images must be finite"):
        harden(_net(), data, reject_images=torch.full((4, 1, 8, 8), float("nan")), **RUN)
    with pytest.raises(ValueError, match=r"reject_images must lie in \[0, 1\]"):
        harden(_net(), data, reject_images=torch.full((4, 1, 8, 8), 2.0), **RUN)
    with pytest.raises(ValueError, match="reject_images must hold at least one image"):
        harden(_net(), data, reject_images=torch.empty(0, 1, 8, 8), **RUN)


def test_resume_needs_the_same_reject_images(tmp_path, data):
    bad = _bright(20, 1)
    first = harden(_net(), data, reject_images=bad, checkpoint_dir=tmp_path, **RUN)
    again = harden(_net(), data, reject_images=bad.clone(), checkpoint_dir=tmp_path, resume=True, **RUN)
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in first.model.state_dict().items())
    with pytest.raises(CheckpointMismatch, match="reject_images"):
        harden(_net(), data, reject_images=_bright(20, 3), checkpoint_dir=tmp_path, resume=True, **RUN)
    with pytest.raises(CheckpointMismatch, match="reject_images"):
        harden(_net(), data, checkpoint_dir=tmp_path, resume=True, **RUN)


def test_cli_reads_reject_images_from_a_safetensors_file(tmp_path, demo_net):
    import json

    from safetensors.torch import save_file

    from guard.cli import main

    f = tmp_path / "bad.safetensors"
    save_file({"x": torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))}, str(f))
    out = tmp_path / "h"
    args = [
        "harden",
        "--demo",
        "--train-size",
        "256",
        "--test-size",
        "128",
        "--rounds",
        "1",
        "--epochs-per-round",
        "1",
        "--budget",
        "quick",
        "--attacks",
        "fooling_gradient",
        "--out",
        str(out),
        "-q",
    ]
    assert main([*args, "--reject-images", str(f)]) == 0
    section = json.loads((out / "harden.json").read_text())["harden"]
    assert main([*args[:-3], "--out", str(tmp_path / "plain"), "-q"]) == 0
    plain = json.loads((tmp_path / "plain" / "harden.json").read_text())["harden"]
    assert section["archive_size"] == plain["archive_size"] + 16
    assert section["settings"]["reject_images"] == {"path": str(f), "n": 16}
    assert plain["settings"]["reject_images"] is None
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    save_file({"a": torch.rand(2, 1, 28, 28), "b": torch.rand(2, 1, 28, 28)}, str(tmp_path / "two.safetensors"))
    save_file({"x": torch.rand(2, 3, 28, 28)}, str(tmp_path / "rgb.safetensors"))
    for name in ("junk", "two", "rgb", "missing"):  # a clear error and exit 2, no traceback
        assert (
            main(
                [
                    *args[:-3],
                    "--out",
                    str(tmp_path / name),
                    "--reject-images",
                    str(tmp_path / f"{name}.safetensors"),
                    "-q",
                ]
            )
            == 2
        )
