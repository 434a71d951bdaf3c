import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from guard.core.data import demo_data, load_data


def test_split_sizes_types_and_disjointness(demo_split):
    train, test = demo_split
    assert train.x.shape == (8000, 1, 28, 28) and test.x.shape == (2000, 1, 28, 28)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert 0.0 <= float(train.x.min()) and float(train.x.max()) <= 1.0
    # No image of the test split appears in the train split (exact duplicates aside, MNIST has none).
    tr = {hash(r.numpy().tobytes()) for r in train.x.flatten(1)}
    assert not any(hash(r.numpy().tobytes()) in tr for r in test.x.flatten(1))
    # every class present in both splits, roughly balanced
    assert torch.bincount(test.y, minlength=10).min() > 150


def test_split_is_deterministic_and_seeded(demo_split):
    train, test = demo_split
    train2, test2 = demo_data()
    assert torch.equal(train.x, train2.x) and torch.equal(test.y, test2.y)
    other, _ = demo_data(seed=1)
    assert not torch.equal(train.y, other.y)


def test_demo_data_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_train"):
        demo_data(n_train=9000, n_test=2000)


def test_load_data_accepts_tensors_dataset_loader(small_split):
    train, _ = small_split
    x, y = train.x[:40], train.y[:40]
    for data in [(x, y), TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=7)]:
        s = load_data(data)
        assert torch.equal(s.x, x) and torch.equal(s.y, y)


def test_load_data_image_folder(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (10, 12), color=(40 * i, 0, 255)).save(tmp_path / cls / f"{i}.png")
    s = load_data(tmp_path)
    assert s.x.shape == (6, 3, 12, 10) and s.y.tolist() == [0, 0, 0, 1, 1, 1]
    g = load_data(str(tmp_path), grayscale=True, image_size=8)
    assert g.x.shape == (6, 1, 8, 8)


def test_load_data_errors(tmp_path):
    with pytest.raises(ValueError, match="image folder"):
        load_data(tmp_path / "missing")
    with pytest.raises(TypeError, match="data must be"):
        load_data(42)
    with pytest.raises(ValueError, match="one per image"):
        load_data((torch.rand(3, 1, 4, 4), torch.zeros(2, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"data images must lie in \[0, 1\]"):
        load_data((torch.rand(3, 1, 4, 4) * 255, torch.zeros(3, dtype=torch.long)))
    with pytest.raises(ValueError, match="empty"):
        load_data(TensorDataset(torch.rand(0, 1, 4, 4), torch.zeros(0, dtype=torch.long)))


def test_split_folder_decodes_only_what_it_keeps_and_equals_the_whole_folder_split(tmp_path, monkeypatch):
    from PIL import Image
    from torchvision import datasets

    import guard

    rng = torch.Generator().manual_seed(0)
    for c in range(3):
        (tmp_path / f"c{c}").mkdir()
        for i in range(20):
            arr = (torch.rand(9, 9, 3, generator=rng) * 255).byte().numpy()
            Image.fromarray(arr).save(tmp_path / f"c{c}" / f"{i}.png")
    whole = load_data(tmp_path)
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(7))
    want_train, want_test = perm[:48][:10], perm[48:][:5]
    reads = []
    real = datasets.ImageFolder.__getitem__
    monkeypatch.setattr(datasets.ImageFolder, "__getitem__", lambda self, i: (reads.append(i), real(self, i))[1])
    train, test = guard.split_folder(tmp_path, seed=7, train_size=10, test_size=5)
    assert len(reads) == 15  # not 60
    assert torch.equal(train.x, whole.x[want_train]) and torch.equal(train.y, whole.y[want_train])
    assert torch.equal(test.x, whole.x[want_test]) and torch.equal(test.y, whole.y[want_test])
    full_train, full_test = guard.split_folder(tmp_path, seed=7)
    assert len(full_train) == 48 and len(full_test) == 12
    with pytest.raises(ValueError, match="train_size"):
        guard.split_folder(tmp_path, train_size=0)
    with pytest.raises(ValueError, match="must be an existing image folder"):
        guard.split_folder(tmp_path / "nope")
    with pytest.raises(ValueError, match="test part .* is empty"):
        guard.split_folder(tmp_path, train_fraction=1.0)


def test_sample_stream_is_seeded_uniform_and_independent_of_batching() -> None:
    """The calibration proxy sample and harden's attack pool come from one function: the same rows
    whatever the batch size, in stream order, a different sample per seed, all rows when k >= n."""
    from torch.utils.data import TensorDataset

    from guard.core.data import sample_stream

    x = torch.rand(120, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(120) % 3
    ds = TensorDataset(x, y)
    a, ya = sample_stream(ds, 30, 7)
    b, yb = sample_stream(ds, 30, 50)
    assert a.shape == (30, 1, 4, 4) and torch.equal(a, b) and torch.equal(ya, yb)
    rows = [int((x == r).all(dim=(1, 2, 3)).nonzero()) for r in a]
    assert rows == sorted(rows) and len(set(rows)) == 30  # stream order, no repeats
    assert torch.equal(ya, y[rows])
    other, _ = sample_stream(ds, 30, 7, seed=1)
    assert not torch.equal(other, a)
    whole, yw = sample_stream(ds, 500, 16)
    assert torch.equal(whole, x) and torch.equal(yw, y)
