"""Reader for the IDX format of the MNIST files (optionally gzip-compressed).

Written by hand because it is 30 lines and torchvision's reader is private
(``torchvision.datasets.mnist.read_image_file``) and gives no clear error on a damaged file.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np
import torch

__all__ = ["read_idx"]

# The third byte of the magic number codes the element type; MNIST uses 0x08 (uint8).
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: str | os.PathLike[str]) -> bytes:
    with open(path, "rb") as fh:
        head = fh.read(2)
        fh.seek(0)
        raw = fh.read()
    if head == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(
                f"IDX file {os.fspath(path)!r} is not a valid gzip stream (corrupt or truncated): {err}."
            ) from err
    return raw


def read_idx(path: str | os.PathLike[str], *, expect_dims: int | None = None) -> torch.Tensor:
    """Read an IDX file into a tensor.

    Args:
        path: a ``.idx`` / ``-ubyte`` file, gzip-compressed or not.
        expect_dims: if given, the number of dimensions the file must declare (3 for images,
            1 for labels).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: bad magic number, unexpected dimensions, or a body shorter/longer than the
            header declares.
    """
    data = _read_bytes(path)
    name = os.fspath(path)
    if len(data) < 4:
        raise ValueError(f"IDX file {name!r} is too short for a header: {len(data)} byte(s).")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code not in _DTYPES or ndim == 0:
        raise ValueError(
            f"IDX file {name!r} has a bad magic number 0x{data[:4].hex()} (expected 0x0000 + type code + ndim, e.g. 0x00000803)."
        )
    if expect_dims is not None and ndim != expect_dims:
        raise ValueError(f"IDX file {name!r} declares {ndim} dimension(s); expected {expect_dims}.")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"IDX file {name!r} is truncated inside its header ({len(data)} < {header} bytes).")
    shape = struct.unpack(">" + "I" * ndim, data[4:header])
    dtype = np.dtype(_DTYPES[dtype_code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    body = len(data) - header
    if body != expected:
        raise ValueError(
            f"IDX file {name!r} is corrupt or truncated: header declares shape {shape} ({expected} bytes) but the body holds {body} bytes."
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return torch.from_numpy(arr.astype(arr.dtype.newbyteorder("=")).copy())
