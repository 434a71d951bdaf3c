"""guard.harden on streams (issue 15): a Dataset / DataLoader / image folder read batch by batch, never whole."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from stream_tools import HeldBatches, TrackedImages
from torch.utils.data import DataLoader, Dataset, TensorDataset

import guard
from guard.demo import shift_augment
from guard.training.harden import CheckpointMismatch, harden
from guard.training.round_attacks import AttackBudget

# patch_images >= the training images: the stream's attack pool is then all of them, in order,
# and the patch attacks draw from it exactly what the tensor path draws from its tensors
FULL_POOL = AttackBudget(
    per_class=1, gradient_steps=10, generations=10, patch_images=300, patch_steps=4, evolved_extra=10
)
KW = dict(
    rounds=1,
    epochs_per_round=1,
    budget=AttackBudget.quick(),
    attacks=("fooling_gradient", "universal_patch"),
    progress=False,
    seed=3,
    lr=3e-3,
    batch_size=64,
)


@pytest.fixture(scope="module")
def split(small_split):
    """256 training and 128 held-out images of the embedded MNIST default."""
    train, test = small_split
    return guard.Split(train.x[:256], train.y[:256]), guard.Split(test.x[:128], test.y[:128])


def _same_weights(a, b) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _ds(s: guard.Split) -> TensorDataset:
    return TensorDataset(s.x, s.y)


def test_materialising_the_tracked_dataset_raises(split) -> None:
    """The guard of the test below works: load_data (every batch held, then concatenated) trips it."""
    train, _ = split
    x = train.x.repeat(4, 1, 1, 1)
    with pytest.raises(RuntimeError, match="materialised"):
        guard.load_data(TrackedImages(x, train.y.repeat(4), limit=3))


def test_harden_never_holds_a_tracked_dataset_whole(tiny_model, split) -> None:
    train, test = split
    x, y = train.x.repeat(4, 1, 1, 1), train.y.repeat(4)  # 1,024 images, 16 batches of 64 per pass
    data, held = TrackedImages(x, y, limit=3), TrackedImages(test.x, test.y, limit=3)
    res = harden(tiny_model, data, test=held, **KW)
    # read: the scan (16 batches), the epoch (1,024 clean + 140 reject images in 19 steps of 64, each
    # with clean ones) and the attack samples of round 1 and of the final measure (one batch each);
    # test: evaluated before and after the round, 2 batches each
    assert data.held.made == 16 + 19 + 2 and data.held.most <= 3 and held.held.made == 4
    assert res.history[0]["n_round_attacks"] > 0 and 0.0 <= res.history[0]["clean_accuracy"] <= 1.0


def test_a_dataset_gives_the_tensor_paths_weights_and_measures(tiny_model, split) -> None:
    """Same images as tensors and as Datasets: the same shuffles, reject draws, augmentation and
    attack pool, hence bit-identical weights, clean accuracies and fresh-attack measures."""
    train, test = split
    kw = {**KW, "rounds": 2, "budget": FULL_POOL, "augment": shift_augment}
    tensors = harden(tiny_model, train, test=test, **kw)
    streamed = harden(tiny_model, _ds(train), test=_ds(test), **kw)
    assert _same_weights(tensors, streamed)
    assert [h["clean_accuracy"] for h in streamed.history] == [h["clean_accuracy"] for h in tensors.history]
    assert streamed.baseline["clean_accuracy"] == tensors.baseline["clean_accuracy"]
    strip = lambda d: {k: v for k, v in d.items() if k != "attack_seconds"}  # noqa: E731
    assert strip(streamed.history[-1]["fresh"]) == strip(tensors.history[-1]["fresh"])
    assert streamed.archive_size == tensors.archive_size > 0
    # a wrong order (here: the stream read in reverse) would give other weights
    flipped = harden(tiny_model, _ds(guard.Split(train.x.flip(0), train.y.flip(0))), test=_ds(test), **kw)
    assert not _same_weights(tensors, flipped)


def test_epoch_batches_of_a_dataset_are_the_tensor_paths_and_of_a_loader_keep_the_share(split) -> None:
    from guard.training.harden import _split_batches
    from guard.training.harden_data import HardenStream

    train, _ = split
    archive = torch.rand(50, 1, 28, 28)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    ds = HardenStream(_ds(train), "data", 64).scan(with_digest=False)
    for (i, x, y, c), (j, x2, y2, c2) in zip(
        _split_batches(train, archive, 10, 0.12, gen(), 7, 0, 1, 64),
        ds.epoch_batches(archive, 10, 0.12, gen(), 7, 0, 1, 64),
        strict=True,
    ):
        assert i == j and torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(c, c2)
    loader = HardenStream(DataLoader(_ds(train), batch_size=30), "data", 64).scan(with_digest=False)
    batches = list(loader.epoch_batches(archive, 10, 0.12, gen(), 7, 0, 1, 64))
    clean = torch.cat([x[c] for _, x, _, c in batches])
    assert torch.equal(clean, train.x) and torch.equal(
        torch.cat([y[c] for _, _, y, c in batches]), train.y
    )  # each once, in order
    rejects = torch.cat([x[~c] for _, x, _, c in batches])
    assert rejects.shape[0] == round(0.12 / 0.88 * 256) and all(bool((y[~c] == 10).all()) for _, _, y, c in batches)
    assert torch.unique(rejects.flatten(1), dim=0).shape[0] == rejects.shape[0]  # archive rows, none repeated
    assert all(
        abs(int((~c).sum()) - 0.12 / 0.88 * int(c.sum())) <= 1.5 for _, _, _, c in batches
    )  # the share in every batch
    assert [i for i, *_ in batches] == [0, *torch.cumsum(torch.tensor([len(c) for *_, c in batches]), 0)[:-1].tolist()]


def test_a_dataloader_streams_in_its_own_order_and_learns_the_reject_class(tiny_model, small_split) -> None:
    train, test = (
        small_split  # 512 and 256 images: test_harden's setting, where the tensor path learns the reject class
    )
    kw = dict(rounds=2, epochs_per_round=2, budget=AttackBudget.quick(), progress=False, seed=3, lr=3e-3)
    tensors = harden(tiny_model, train, test=test, **kw)
    held = HeldBatches(limit=3)
    streamed = harden(tiny_model, DataLoader(_ds(train), batch_size=32, collate_fn=held), test=test, **kw)
    # 16 batches a pass: the scan, 2 x 2 epochs, the attack samples of rounds 1, 2 and of the final measure
    assert held.most <= 3 and held.made == 16 * 8
    t, s = tensors.history[-1], streamed.history[-1]
    assert (
        s["rejected_share_of_round_attacks"] > 0.5
        and abs(s["rejected_share_of_round_attacks"] - t["rejected_share_of_round_attacks"]) < 0.2
    )
    assert abs(s["clean_accuracy"] - t["clean_accuracy"]) < 0.05
    assert not _same_weights(tensors, streamed)  # its own batches: another run than the tensor path's


class _Stop(KeyboardInterrupt):
    pass


def _crash_at(when):
    def crash(r, e, model):
        if (r, e) == when:
            raise _Stop

    return crash


def test_resume_from_a_stream_and_across_paths(tmp_path, tiny_model, split) -> None:
    train, test = split
    kw = {
        **KW,
        "epochs_per_round": 2,
        "budget": FULL_POOL,
    }  # the tensor path's attack pool: its weights are the reference
    full = harden(tiny_model, train, test=test, **kw)
    # a stream run interrupted after epoch 0 resumes from its checkpoint to the uninterrupted weights
    with pytest.raises(_Stop):
        harden(
            tiny_model, _ds(train), test=_ds(test), checkpoint_dir=tmp_path / "s", on_epoch_end=_crash_at((1, 0)), **kw
        )
    after = []
    resumed = harden(
        tiny_model,
        _ds(train),
        test=_ds(test),
        checkpoint_dir=tmp_path / "s",
        resume=True,
        on_epoch_end=lambda r, e, m: after.append((r, e)),
        **kw,
    )
    assert after == [(1, 1)] and _same_weights(full, resumed)
    # the stream's digest is the tensor path's: a tensor run's checkpoint resumes from a Dataset of the same images
    with pytest.raises(_Stop):
        harden(tiny_model, train, test=test, checkpoint_dir=tmp_path / "t", on_epoch_end=_crash_at((1, 0)), **kw)
    across = harden(tiny_model, _ds(train), test=test, checkpoint_dir=tmp_path / "t", resume=True, **kw)
    assert _same_weights(full, across)
    # other stream data: one image changed, or the same images in another order
    changed = train.x.clone()
    changed[100, 0, 0, 0] = 1.0 - changed[100, 0, 0, 0]
    for other in (TensorDataset(changed, train.y), _ds(guard.Split(train.x.flip(0), train.y.flip(0)))):
        with pytest.raises(CheckpointMismatch, match="data_digest"):
            harden(tiny_model, other, test=test, checkpoint_dir=tmp_path / "s", resume=True, **kw)
    # a DataLoader's own batches are another schedule: its checkpoint is not a Dataset's
    with pytest.raises(CheckpointMismatch, match="data_order"):
        harden(
            tiny_model,
            DataLoader(_ds(train), batch_size=64),
            test=test,
            checkpoint_dir=tmp_path / "s",
            resume=True,
            **kw,
        )


class _ImagesOnly(Dataset):
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def test_bad_streams_are_refused_naming_the_argument(tiny_model, split, monkeypatch) -> None:
    train, test = split
    with pytest.raises(ValueError, match="data is empty"):
        harden(tiny_model, TensorDataset(torch.rand(0, 1, 28, 28), torch.zeros(0, dtype=torch.long)), **KW)
    with pytest.raises(TypeError, match=r"data must yield \(image, label\) pairs"):
        harden(tiny_model, _ImagesOnly(train.x), **KW)
    with pytest.raises(ValueError, match="labels of data go up to 12 but the head 'fc2' has 10"):
        harden(tiny_model, TensorDataset(train.x, train.y.clamp(max=9).index_fill(0, torch.tensor([7]), 12)), **KW)
    with pytest.raises(ValueError, match="labels of test go up to 10"):
        harden(
            tiny_model,
            _ds(train),
            test=TensorDataset(test.x, test.y.clamp(max=9).index_fill(0, torch.tensor([3]), 10)),
            **KW,
        )
    with pytest.raises(ValueError, match="data labels"):
        harden(tiny_model, TensorDataset(train.x, -train.y - 1), **KW)
    with pytest.raises(ValueError, match=r"data images .*\[0, 1\]"):
        harden(tiny_model, TensorDataset(train.x * 3, train.y), **KW)
    tracked = TrackedImages(train.x, train.y, limit=3)
    with pytest.raises(ValueError, match="no nn.Linear"):  # a model without a head is refused before the data is read
        harden(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten()), tracked, **KW)
    assert tracked.held.made == 0
    monkeypatch.setenv(
        "WORLD_SIZE", "2"
    )  # under torchrun a DataLoader cannot be sharded (refused before any process group)
    with pytest.raises(
        ValueError, match="data: a DataLoader or IterableDataset cannot be split across the 2 processes"
    ):
        harden(tiny_model, DataLoader(_ds(train), batch_size=64), **KW)


@pytest.mark.parametrize(
    "flags, kwargs",
    [([], {}), (["--trainable", "", "--freeze-known-classes"], {"trainable": (), "freeze_known_classes": True})],
    ids=["defaults", "reject-row-only"],
)
def test_cli_harden_streams_an_image_folder_to_the_tensor_paths_model(
    tmp_path, tiny_model, split, monkeypatch, flags, kwargs
) -> None:
    """``guard harden --model M --data DIR``: the folder is streamed (load_data is never called) and
    the hardened model equals harden on the same seeded 80/20 split loaded as tensors, with the
    fine-tuning flags passed through to HardenConfig."""
    from guard.cli import main

    train, _ = split
    for i in range(60):
        d = tmp_path / "data" / str(int(train.y[i]))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((train.x[i, 0] * 255).round().byte().numpy()).save(d / f"{i:03d}.png")
    torch.save(tiny_model.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "tinynet.py").write_text(
        "import torch\nfrom guard.core.models import DemoNet\n\n"
        "def build():\n    m = DemoNet(width=8, hidden=32)\n"
        "    m.load_state_dict(torch.load('weights.pt', weights_only=True))\n    return m.eval()\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = guard.load_data(tmp_path / "data", grayscale=True)
    monkeypatch.setattr("guard.load_data", lambda *a, **k: pytest.fail("guard harden loaded the folder whole"))
    argv = [
        "harden",
        "--model",
        "tinynet:build",
        "--data",
        "data",
        "--grayscale",
        "--rounds",
        "1",
        "--epochs-per-round",
        "1",
        "--attacks",
        "fooling_gradient",
        "--budget",
        "quick",
        "--batch-size",
        "16",
        "--seed",
        "2",
        "--out",
        "o",
        "-q",
        *flags,
    ]
    assert main(argv) == 0
    cli_model = guard.RejectClassifier.load(tmp_path / "o" / "hardened_model.safetensors", tiny_model)
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(2))
    tr, te = (
        guard.Split(loaded.x[perm[:48]], loaded.y[perm[:48]]),
        guard.Split(loaded.x[perm[48:]], loaded.y[perm[48:]]),
    )
    ref = harden(
        tiny_model,
        tr,
        test=te,
        rounds=1,
        epochs_per_round=1,
        attacks=("fooling_gradient",),
        budget=AttackBudget.quick(),
        batch_size=16,
        seed=2,
        progress=False,
        **kwargs,
    )
    sa, sb = cli_model.state_dict(), ref.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sb)
    if kwargs:  # only the reject row learned
        with torch.no_grad():
            assert torch.equal(cli_model.model(loaded.x[:8])[:, :10], tiny_model(loaded.x[:8]))
