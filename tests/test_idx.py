import gzip
import struct

import numpy as np
import pytest
import torch

from guard.core.idx import read_idx


def _write(path, header: bytes, body: bytes, compress: bool = False) -> None:
    data = header + body
    path.write_bytes(gzip.compress(data) if compress else data)


@pytest.mark.parametrize("compress", [False, True])
def test_reads_uint8_images_exactly(tmp_path, compress):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / "img.idx"
    _write(p, struct.pack(">HBBIII", 0, 8, 3, 2, 3, 4), arr.tobytes(), compress)
    out = read_idx(p, expect_dims=3)
    assert out.dtype == torch.uint8
    assert torch.equal(out, torch.from_numpy(arr))


def test_reads_big_endian_int32(tmp_path):
    arr = np.array([1, -2, 70000], dtype=">i4")
    p = tmp_path / "x.idx"
    _write(p, struct.pack(">HBBI", 0, 0x0C, 1, 3), arr.tobytes())
    assert read_idx(p).tolist() == [1, -2, 70000]


def test_bad_magic(tmp_path):
    p = tmp_path / "bad.idx"
    _write(p, struct.pack(">HBBI", 7, 8, 1, 3), b"abc")
    with pytest.raises(ValueError, match="magic"):
        read_idx(p)


def test_wrong_dimensions(tmp_path):
    p = tmp_path / "lab.idx"
    _write(p, struct.pack(">HBBI", 0, 8, 1, 3), b"abc")
    with pytest.raises(ValueError, match="declares 1 dimension"):
        read_idx(p, expect_dims=3)


def test_truncated_body(tmp_path):
    p = tmp_path / "short.idx"
    _write(p, struct.pack(">HBBIII", 0, 8, 3, 2, 3, 4), bytes(23))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(p)


def test_truncated_header(tmp_path):
    p = tmp_path / "hdr.idx"
    _write(p, struct.pack(">HBB", 0, 8, 3) + b"\x00\x00", b"")
    with pytest.raises(ValueError, match="header"):
        read_idx(p)


def test_corrupt_gzip(tmp_path):
    good = gzip.compress(struct.pack(">HBBI", 0, 8, 1, 100) + bytes(100))
    p = tmp_path / "c.gz"
    p.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="gzip"):
        read_idx(p)


def test_embedded_mnist_headers():
    from guard.core.data import _data_dir

    images = read_idx(_data_dir("mnist") / "t10k-images-idx3-ubyte.gz", expect_dims=3)
    labels = read_idx(_data_dir("mnist") / "t10k-labels-idx1-ubyte.gz", expect_dims=1)
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and set(labels.unique().tolist()) == set(range(10))
