"""The 1,000-image ImageNet sample (../shared/datasets/imagenet-sample) as a user would hand it to guard.

The archive is flat (``imagenet-sample-224/<wnid>_<name>.jpg``, one image per class, sorted file
name = class index). :func:`image_folder` unpacks it once into the ImageFolder layout
(``<wnid>/<file>.jpg``; sorted wnids are the standard ILSVRC-2012 indices, so ImageFolder's labels
are the model's) under ``$GUARD_CACHE_DIR`` or ``~/.cache/guard``, checking the README's MD5.
ImageNet's terms: benchmarks and tests in this repository only; never shipped in the package.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import torch

__all__ = ["ARCHIVE", "MD5", "image_folder", "load", "available"]

ARCHIVE = Path(
    os.environ.get(
        "GUARD_IMAGENET_SAMPLE",
        Path(__file__).resolve().parents[2].parent
        / "shared"
        / "datasets"
        / "imagenet-sample"
        / "imagenet-sample-224.tar.gz",
    )
)
MD5 = "696802215c56dfeae3d8157de4ec41a9"


def available() -> bool:
    return ARCHIVE.is_file()


def image_folder() -> Path:
    """The sample in ImageFolder layout (unpacked once; the MD5 is checked before)."""
    from guard.core.archive import file_md5

    base = Path(os.environ.get("GUARD_CACHE_DIR", Path.home() / ".cache" / "guard")) / "imagenet-sample-224" / MD5
    done = base / ".complete"
    if done.is_file():
        return base
    if not ARCHIVE.is_file():
        raise FileNotFoundError(f"the ImageNet sample is not at {ARCHIVE} (set GUARD_IMAGENET_SAMPLE)")
    if file_md5(ARCHIVE) != MD5:
        raise ValueError(f"{ARCHIVE} is not the expected archive (MD5 != {MD5})")
    with tarfile.open(ARCHIVE, "r:gz") as tf:
        members = sorted((m for m in tf.getmembers() if m.isfile() and m.name.endswith(".jpg")), key=lambda m: m.name)
        for m in members:
            fname = Path(m.name).name
            wnid = fname.split("_", 1)[0]
            out = base / wnid / fname
            out.parent.mkdir(parents=True, exist_ok=True)
            fh = tf.extractfile(m)
            assert fh is not None
            out.write_bytes(fh.read())
    if len(list(base.iterdir())) != 1000:
        raise ValueError(f"{ARCHIVE}: expected 1,000 class folders")
    done.write_text("ok\n")
    return base


def load(n: int | None = None, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: float32 (N, 3, 224, 224) in [0, 1] and the ILSVRC labels, through ``guard.load_data``.

    ``n`` draws that many images with a fixed seed (all 1,000 when None); only those are decoded
    (an ImageFolder ``Subset``, read through ``load_data``'s Dataset path).
    """
    from torchvision import datasets, transforms

    from guard.core.data import load_data

    if n is None or n >= 1000:
        split = load_data(str(image_folder()), "imagenet sample")
        return split.x, split.y
    folder = datasets.ImageFolder(str(image_folder()), transform=transforms.ToTensor())
    idx = torch.randperm(len(folder), generator=torch.Generator().manual_seed(seed))[:n]
    split = load_data(torch.utils.data.Subset(folder, idx.tolist()), "imagenet sample")
    return split.x.contiguous(), split.y.contiguous()
