"""The CIFAR-10 default: the embedded JPEG archive, read in place; the shipped ResNet-20 and its hash check."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import guard
from guard.core.archive import read_image_archive


def test_demo_data_cifar10_split():
    train, test = guard.demo_data("cifar10")
    assert train.x.shape == (8000, 3, 32, 32) and test.x.shape == (2000, 3, 32, 32)
    assert train.x.dtype == torch.float32 and 0.0 <= float(train.x.min()) and float(train.x.max()) <= 1.0
    assert torch.bincount(torch.cat([train.y, test.y]), minlength=10).tolist() == [1000] * 10
    assert torch.bincount(test.y, minlength=10).min() > 150
    train2, _ = guard.demo_data("cifar10")
    assert torch.equal(train.x, train2.x)  # the same split from the cached decode
    assert guard.demo_data()[0].x.shape[1:] == (1, 28, 28)  # the default stays MNIST


def test_unknown_demo_names_are_clear():
    with pytest.raises(ValueError, match="unknown embedded data set 'svhn'"):
        guard.demo_data("svhn")
    with pytest.raises(ValueError, match="unknown demo 'svhn'"):
        guard.demo_model("svhn")


def _archive(tmp_path, names=("cat", "dog"), n=3, size=(8, 8)) -> str:
    path = tmp_path / "a.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for c in names:
            for i in range(n):
                buf = io.BytesIO()
                Image.fromarray(np.full((*size, 3), 40 * i, dtype=np.uint8)).save(buf, format="PNG")
                info = tarfile.TarInfo(f"split/{c}/{i}.png")
                info.size = len(buf.getvalue())
                tf.addfile(info, io.BytesIO(buf.getvalue()))
    return str(path)


def test_archive_reading_and_load_data(tmp_path):
    path = _archive(tmp_path)
    x, y, names = read_image_archive(path)
    assert (
        x.shape == (6, 3, 8, 8)
        and x.dtype == torch.uint8
        and names == ["cat", "dog"]
        and y.tolist() == [0, 0, 0, 1, 1, 1]
    )
    split = guard.load_data(path)
    assert split.x.shape == (6, 3, 8, 8) and float(split.x.max()) <= 1.0
    assert guard.load_data(path, image_size=4, grayscale=True).x.shape == (6, 1, 4, 4)


def test_corrupt_truncated_and_foreign_archives_are_clear(tmp_path):
    path = _archive(tmp_path)
    raw = open(path, "rb").read()
    (tmp_path / "trunc.tar.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        read_image_archive(tmp_path / "trunc.tar.gz")
    with pytest.raises(ValueError, match="MD5"):
        read_image_archive(path, expect_md5="0" * 32)
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tf:
        data = b"not an image"
        info = tarfile.TarInfo("split/cat/0.jpg")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="not a readable image"):
        read_image_archive(bad)
    (tmp_path / "junk.tar.gz").write_bytes(gzip.compress(b"junk" * 100))
    with pytest.raises(ValueError, match="corrupt or truncated|no image"):
        read_image_archive(tmp_path / "junk.tar.gz")
    with pytest.raises(ValueError, match="does not exist"):
        read_image_archive(tmp_path / "none.tar.gz")


def test_cifar10_weights_hash_is_checked(tmp_path):
    from importlib import resources

    src = resources.files("guard") / "_data" / "cifar10"
    if not (src / "resnet20.safetensors").is_file():
        pytest.skip("the CIFAR-10 weights are not built into this checkout")
    model = guard.demo_model("cifar10")
    record = json.loads((src / "resnet20.json").read_text())
    assert model.guard_meta["sha256"] == record["sha256"]
    _, test = guard.demo_data("cifar10")
    with torch.no_grad():
        acc = float((model(test.x[:500]).argmax(1) == test.y[:500]).float().mean())
    assert acc > 0.85
    # a copy of the package data with one byte of the weights changed: refused
    fake = tmp_path / "guard" / "_data" / "cifar10"
    shutil.copytree(str(src), fake)
    raw = bytearray((fake / "resnet20.safetensors").read_bytes())
    raw[-10] ^= 0x01
    (fake / "resnet20.safetensors").write_bytes(bytes(raw))
    from guard.demo import cifar10_model

    with pytest.raises(ValueError, match="does not match its recorded SHA-256"):
        cifar10_model(fake)
    (fake / "resnet20.json").unlink()
    with pytest.raises(ValueError, match="missing"):
        cifar10_model(fake)


@pytest.mark.slow
def test_quick_audit_on_cifar10(tmp_path):
    """The natural-image default end to end (quick settings): every section, colour-image defaults."""
    from importlib import resources

    from guard.audit import AuditOptions, run_audit

    if not (resources.files("guard") / "_data" / "cifar10" / "resnet20.safetensors").is_file():
        pytest.skip("the CIFAR-10 weights are not built into this checkout")
    model = guard.demo_model("cifar10")
    train, test = guard.demo_data("cifar10")
    rep = run_audit(
        model, train, test, tmp_path, model_name="cifar10", options=AuditOptions(quick=True, progress=False)
    )
    assert not rep.get("errors"), rep.get("errors")
    assert rep["model"]["clean_accuracy"] > 0.85
    assert rep["defaults"]["kind"] == "natural" and 0.05 < rep["defaults"]["work_scale"] < 0.2
    assert rep["attacks"]["pgd"]["linf_max"] <= 8 / 255 + 1e-6 and rep["attacks"]["pgd"]["success_rate"] > 0.9
    assert {"patch_gan", "universal_patch", "random_patch", "feature_adversary", "fooling_gradient"} <= set(
        rep["attacks"]
    )
    assert {"saliency", "knn", "ppca", "mahalanobis", "lid", "combined"} <= set(rep["detectors"])
    assert rep["detectors_info"]["feature_layers"] == ["layer2", "layer3", "linear:input"]
    assert "saliency_score" in rep["export"]["outputs"] and rep["export"]["parity"]["logits"]["max_abs"] < 1e-3
