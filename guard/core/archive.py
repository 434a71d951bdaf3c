"""Image archives: a ``.tar`` / ``.tar.gz`` of JPEG/PNG files in the ImageFolder layout, read in place.

``[SPLIT/]CLASS/FILE`` (the CIFAR-10 JPEG copy: ``test/airplane/0000.jpg``): the label is the
index of the class folder's name in sorted order, as ``torchvision.datasets.ImageFolder``
gives it. Read with :mod:`tarfile` and Pillow, member by member, without unpacking. Written by
hand because torchvision reads folders, not archives; a damaged archive, a member that is not
an image, or images of different sizes are a clear ValueError.
"""

from __future__ import annotations

import io
import os
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch

__all__ = ["read_image_archive", "is_image_archive", "file_md5"]

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def is_image_archive(path: str | os.PathLike[str]) -> bool:
    name = os.fspath(path).lower()
    return name.endswith((".tar", ".tar.gz", ".tgz"))


def file_md5(path: str | os.PathLike[str]) -> str:
    """MD5 of a file's bytes (the checksum the data sets' READMEs give)."""
    from guard.core.integrity import file_digest

    return file_digest(path, "md5")


def read_image_archive(
    path: str | os.PathLike[str],
    *,
    expect_md5: str | None = None,
    grayscale: bool = False,
    image_size: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images (N, C, H, W) uint8, labels (N,) int64 and the sorted class names of an archive.

    Args:
        path: the archive.
        expect_md5: refuse the file unless its MD5 matches (the embedded data's checksum).
        grayscale: decode to one channel (else RGB).
        image_size: resize every image to (H, W); otherwise all must share one size.

    Members are ordered by path, so the order (and any seeded split of it) is the same on every
    machine.
    """
    from PIL import Image, UnidentifiedImageError

    name = os.fspath(path)
    if not Path(name).is_file():
        raise ValueError(f"image archive {name!r} does not exist.")
    if expect_md5 is not None and file_md5(name) != expect_md5:
        raise ValueError(f"image archive {name!r} is damaged or not the expected file: its MD5 is not {expect_md5}.")
    images: list[np.ndarray] = []
    classes: list[str] = []
    try:
        with tarfile.open(name, "r:*") as tf:
            members = sorted(
                (m for m in tf.getmembers() if m.isfile() and m.name.lower().endswith(_IMAGE_SUFFIXES)),
                key=lambda m: m.name,
            )
            if not members:
                raise ValueError(f"image archive {name!r} holds no image files ({', '.join(_IMAGE_SUFFIXES)}).")
            for m in members:
                parts = m.name.strip("/").split("/")
                if len(parts) < 2:
                    raise ValueError(
                        f"image archive {name!r}: {m.name!r} is not inside a class folder (expected [SPLIT/]CLASS/FILE)."
                    )
                fh = tf.extractfile(m)
                if fh is None:
                    raise ValueError(f"image archive {name!r}: member {m.name!r} cannot be read.")
                try:
                    im = Image.open(io.BytesIO(fh.read()))
                    im = im.convert("L" if grayscale else "RGB")
                except (UnidentifiedImageError, OSError) as err:
                    raise ValueError(f"image archive {name!r}: {m.name!r} is not a readable image: {err}") from err
                if image_size is not None:
                    im = im.resize((image_size[1], image_size[0]), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
                images.append(arr[:, :, None] if arr.ndim == 2 else arr)
                classes.append(parts[-2])
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise ValueError(f"image archive {name!r} is corrupt or truncated: {err}") from err
    shapes = {a.shape for a in images}
    if len(shapes) != 1:
        raise ValueError(
            f"image archive {name!r} holds images of {len(shapes)} different sizes ({sorted(shapes)[:3]}...); "
            "pass image_size=(H, W)."
        )
    names = sorted(set(classes))
    index = {c: i for i, c in enumerate(names)}
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor([index[c] for c in classes], dtype=torch.long)
    return x, y, names
