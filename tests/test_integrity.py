"""Saved artefacts cannot be silently disarmed: seals over everything that decides a flag.

Each test plays one writer: a careless edit (the seal is kept: caught in every mode), an
attacker who recomputes the unkeyed digest (caught by a pinned digest or by a key), and an
attacker who signs with a key of their own (caught by the key).
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from integrity_tools import KEY, OTHER_KEY, flip_last_byte, reseal_index, rewrite_meta

import guard
from guard.core.integrity import IntegrityError, content_seal, resolve_key
from guard.detectors import Combined, Detector, KNNRank
from guard.training import RejectClassifier
from guard.training.reject import grow_head


@pytest.fixture
def knn(tmp_path):
    g = torch.Generator().manual_seed(0)
    det = KNNRank("f", k=3, metric="l2").fit_features({"f": torch.randn(60, 4, generator=g)}, torch.arange(60) % 3)
    det.calibrate(det.score_features({"f": torch.randn(80, 4, generator=g)}, torch.randn(80, 3, generator=g)), 0.05)
    return det


def _far(det: KNNRank) -> torch.Tensor:
    """Features far from every training point: flagged by an intact detector."""
    return det.score_features({"f": torch.full((5, 4), 50.0)}, torch.zeros(5, 3))


def _threshold_to_1e9(meta) -> None:
    meta["state"]["threshold_"] = 1e9


# ---------------------------------------------------------------- the defect of issue 13


def test_threshold_edit_in_metadata_is_caught_without_a_key(knn, tmp_path) -> None:
    path = tmp_path / "k.safetensors"
    knn.save(path)
    assert bool(knn.predict_scores(_far(knn)).all())
    rewrite_meta(path, _threshold_to_1e9)
    with pytest.raises(IntegrityError, match="altered"):
        KNNRank.load(path)


def test_recomputed_digest_is_caught_by_the_pinned_digest(knn, tmp_path) -> None:
    path = tmp_path / "k.safetensors"
    digest = knn.save(path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (tmp_path / "k.safetensors.sha256").read_text() == f"{digest}  k.safetensors\n"  # sha256sum -c format
    KNNRank.load(path, expected_sha256=digest.upper())  # the intact file: accepted
    rewrite_meta(path, _threshold_to_1e9, reseal=True)
    # the limit of an unkeyed digest stored in the file: the writer recomputed it, so it loads ...
    disarmed = KNNRank.load(path)
    assert disarmed.threshold_ == 1e9 and not bool(disarmed.predict_scores(_far(disarmed)).any())
    # ... and only the digest kept elsewhere stops it
    with pytest.raises(IntegrityError, match="altered or replaced"):
        KNNRank.load(path, expected_sha256=digest)


def test_signed_file_needs_the_key(knn, tmp_path, monkeypatch) -> None:
    path = tmp_path / "k.safetensors"
    knn.save(path, key=KEY)
    back = KNNRank.load(path, key=KEY)
    assert back.threshold_ == knn.threshold_ and bool(back.predict_scores(_far(back)).all())
    monkeypatch.setenv("MY_GUARD_KEY", KEY.decode())
    assert KNNRank.load(path, key_env="MY_GUARD_KEY").threshold_ == knn.threshold_
    with pytest.raises(IntegrityError, match="is signed"):
        KNNRank.load(path)
    with pytest.raises(IntegrityError, match="another key"):
        KNNRank.load(path, key=OTHER_KEY)


@pytest.mark.parametrize("reseal", [False, True, OTHER_KEY], ids=["kept-seal", "unkeyed-reseal", "own-key"])
def test_signed_file_edits_are_caught_by_the_key(knn, tmp_path, reseal) -> None:
    path = tmp_path / "k.safetensors"
    knn.save(path, key=KEY)
    rewrite_meta(path, _threshold_to_1e9, reseal=reseal)
    with pytest.raises(IntegrityError, match="altered|not signed|another key"):
        KNNRank.load(path, key=KEY)


@pytest.mark.parametrize("key", [None, KEY], ids=["digest", "hmac"])
def test_tensor_bytes_and_every_metadata_field_are_covered(knn, tmp_path, key) -> None:
    path = tmp_path / "k.safetensors"
    knn.save(path, key=key)
    flip_last_byte(path)
    with pytest.raises(IntegrityError, match="altered"):
        KNNRank.load(path, key=key)
    for change in (
        lambda m: m["params"].update(k=1),
        lambda m: m.update({"class": "KNNConsistency"}),
        lambda m: m.update(format="guard.detector/3"),
        lambda m: m["state"].update(calibration_fpr_=0.5),
        lambda m: m.update(extra="x"),
    ):
        knn.save(path, key=key)
        rewrite_meta(path, change)
        with pytest.raises(IntegrityError, match="altered"):
            Detector.load(path, key=key)


def test_combined_rule_and_weights_are_covered(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    comb = Combined(["a", "b"])
    comb.calibrate_scores({"a": torch.randn(200, generator=g), "b": torch.randn(200, generator=g)}, 0.05)
    for key in (None, KEY):
        comb.save(tmp_path / "c.safetensors", key=key)
        rewrite_meta(tmp_path / "c.safetensors", lambda m: m["params"].update(rule="fisher"))
        with pytest.raises(IntegrityError, match="altered"):
            Combined.load(tmp_path / "c.safetensors", key=key)


def test_key_api_errors_name_the_argument(monkeypatch) -> None:
    with pytest.raises(TypeError, match="key must be bytes.*key_env"):
        resolve_key("GUARD_KEY")  # a variable's name is not a key
    with pytest.raises(ValueError, match="at least 16 bytes"):
        resolve_key(b"short")
    with pytest.raises(ValueError, match="not both"):
        resolve_key(KEY, "GUARD_KEY")
    monkeypatch.delenv("NO_SUCH_GUARD_KEY", raising=False)
    with pytest.raises(ValueError, match="NO_SUCH_GUARD_KEY.*not set"):
        resolve_key(key_env="NO_SUCH_GUARD_KEY")
    with pytest.raises(ValueError, match="expected_sha256 must be 64 hex"):
        KNNRank.load("unused.safetensors", expected_sha256="abc")


def test_legacy_unsealed_file_loads_only_when_pinned(knn, tmp_path) -> None:
    path = tmp_path / "old.safetensors"
    knn.save(path)

    def legacy(meta) -> None:
        meta.pop("integrity")
        meta["format"] = "guard.detector/1"

    rewrite_meta(path, legacy)
    with pytest.raises(IntegrityError, match="older guard.*expected_sha256"):
        KNNRank.load(path)
    pinned = hashlib.sha256(path.read_bytes()).hexdigest()
    assert KNNRank.load(path, expected_sha256=pinned).threshold_ == knn.threshold_
    with pytest.raises(IntegrityError):
        KNNRank.load(path, key=KEY, expected_sha256=pinned)


# ---------------------------------------------------------------- GuardedModel folder


@pytest.fixture(scope="module")
def guarded(tiny_model, small_split):
    train, test = small_split
    return (
        guard.wrap(tiny_model, detectors=["knn", "knn_consistency", "ppca"])
        .fit(train)
        .calibrate(test.x[:128], fpr=0.05)
    )


@pytest.mark.parametrize("key", [None, KEY], ids=["digest", "hmac"])
def test_guarded_folder_index_and_member_swaps_are_caught(guarded, tiny_model, small_split, tmp_path, key) -> None:
    _, test = small_split
    folder = tmp_path / "g"
    digest = guarded.save(folder, key=key)
    assert digest == hashlib.sha256((folder / "guarded.json").read_bytes()).hexdigest()
    assert (folder / "guarded.json.sha256").read_text().split()[0] == digest
    back = guard.GuardedModel.load(folder, tiny_model, key=key, expected_sha256=digest)
    assert bool((back(test.x[128:160]).flagged == guarded(test.x[128:160]).flagged).all())
    pristine = tmp_path / "pristine"
    shutil.copytree(folder, pristine)

    def fresh():
        shutil.rmtree(folder)
        shutil.copytree(pristine, folder)

    # 1. edit guarded.json by hand (which detectors flag), keeping its seal
    index = json.loads((folder / "guarded.json").read_text())
    index["flag_with"] = ["ppca"]
    (folder / "guarded.json").write_text(json.dumps(index))
    with pytest.raises(IntegrityError, match="altered"):
        guard.GuardedModel.load(folder, tiny_model, key=key)
    # 2. swap one member for another validly sealed file of the same folder
    fresh()
    shutil.copy(folder / "knn_consistency.safetensors", folder / "knn.safetensors")
    with pytest.raises(IntegrityError, match="altered or replaced"):
        guard.GuardedModel.load(folder, tiny_model, key=key)
    # 3. the same swap, the index's member digest and seal recomputed without the key
    sha = hashlib.sha256((folder / "knn.safetensors").read_bytes()).hexdigest()
    reseal_index(folder / "guarded.json", lambda ix: ix["detectors"]["knn"].update(sha256=sha))
    if key is None:  # only the pinned digest stops a writer of an unkeyed folder
        with pytest.raises(IntegrityError, match="altered or replaced"):
            guard.GuardedModel.load(folder, tiny_model, expected_sha256=digest)
    else:
        with pytest.raises(IntegrityError, match="not signed"):
            guard.GuardedModel.load(folder, tiny_model, key=key)
    # 4. a member's threshold raised, its seal kept
    fresh()
    rewrite_meta(folder / "combined.safetensors", lambda m: m["state"].update(threshold_=1e9))
    with pytest.raises(IntegrityError):
        guard.GuardedModel.load(folder, tiny_model, key=key)
    if key is not None:
        fresh()
        with pytest.raises(IntegrityError, match="is signed"):
            guard.GuardedModel.load(folder, tiny_model)
        with pytest.raises(IntegrityError, match="another key"):
            guard.GuardedModel.load(folder, tiny_model, key=OTHER_KEY)


# ---------------------------------------------------------------- RejectClassifier


def test_reject_classifier_is_sealed(tiny_model, tmp_path) -> None:
    net, head = grow_head(tiny_model)
    rc = RejectClassifier(net, 10, head)
    path = tmp_path / "h.safetensors"
    for key in (None, KEY):
        digest = rc.save(path, key=key)
        back = RejectClassifier.load(path, tiny_model, key=key, expected_sha256=digest)
        x = torch.rand(4, 1, 28, 28)
        torch.testing.assert_close(back(x), rc(x))
        flip_last_byte(path)
        with pytest.raises(IntegrityError, match="altered"):
            RejectClassifier.load(path, tiny_model, key=key)
    rc.save(path, key=KEY)
    with pytest.raises(IntegrityError, match="is signed"):
        RejectClassifier.load(path, tiny_model)
    rewrite_meta(path, lambda m: m.update(head="fc1"), reseal=True)
    with pytest.raises(IntegrityError, match="not signed"):
        RejectClassifier.load(path, tiny_model, key=KEY)


# ---------------------------------------------------------------- the seal itself


def test_seal_is_canonical_and_binds_names_dtypes_and_shapes() -> None:
    t = {"a": torch.arange(6, dtype=torch.float32)}
    base = content_seal({"x": 1, "y": [1, 2]}, t)
    assert content_seal({"y": [1, 2], "x": 1}, t) == base  # key order does not matter
    assert content_seal({"x": 1, "y": (1, 2)}, t) == base  # a tuple is written as a list
    for other in ({"b": t["a"]}, {"a": t["a"].view(2, 3)}, {"a": t["a"].view(torch.int32)}, {"a": t["a"][:5]}):
        assert content_seal({"x": 1, "y": [1, 2]}, other) != base
    assert content_seal({"x": 1, "y": [1, 2]}, t, KEY) != content_seal({"x": 1, "y": [1, 2]}, t, OTHER_KEY)
    assert content_seal({"x": 1, "y": [1, 2]}, t, KEY)["scheme"] == "hmac-sha256"
