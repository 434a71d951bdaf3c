"""Integrity of saved artefacts: a keyed HMAC-SHA256, or a SHA-256 digest you pin.

Everything that decides a flag (tensors, parameters, thresholds, the combined rule, the class
and the format) is hashed in one canonical form: the sorted-key JSON of the metadata, then each
tensor's name, dtype, shape and bytes (sorted by name), every field length-prefixed so that no
two contents hash alike. Two modes:

* **keyed** (``key=b"..."`` or ``key_env="NAME"``): the seal is an HMAC-SHA256 under a secret
  key. A writer who lacks the key cannot produce a valid seal; a signed file loaded without
  the key, with another key, or an unsigned file loaded with a key, raises.
* **unkeyed**: the seal is a plain SHA-256 of the same content. It catches accidental damage
  (a flipped bit, a hand edit of a threshold) but anyone who can write the file can recompute
  it. Against such a writer, pin the artefact's digest (what ``save`` returns and writes to
  ``FILE.sha256``), keep it where the writer cannot reach, and pass it back as
  ``expected_sha256=``.

:class:`IntegrityError` is a ValueError, so callers catching ValueError for "damaged file"
keep working.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "IntegrityError",
    "resolve_key",
    "canonical_json",
    "content_seal",
    "check_seal",
    "file_sha256",
    "pinned_sha256",
    "check_expected_sha256",
    "write_digest_file",
    "read_digest_file",
    "tensors_digest",
    "save_sealed",
    "load_sealed",
    "SCHEMES",
    "MIN_KEY_BYTES",
]

DOMAIN = b"guard.integrity/1"
SCHEMES = ("sha256", "hmac-sha256")
MIN_KEY_BYTES = 16
_HEX64 = re.compile(r"[0-9a-f]{64}")


class IntegrityError(ValueError):
    """An artefact failed its integrity check (altered, replaced, unsigned or signed with another key)."""


def resolve_key(key: Any = None, key_env: Any = None) -> bytes | None:
    """The HMAC key: ``key`` itself (bytes), or the UTF-8 value of environment variable ``key_env``.

    A ``str`` key is refused on purpose, so that the name of a variable is never taken for the
    secret (or the other way round). None of both: no key (unkeyed mode).
    """
    if key is not None and key_env is not None:
        raise ValueError(
            "pass either key (the secret, bytes) or key_env (the name of an environment variable holding it), not both."
        )
    if key_env is not None:
        if not isinstance(key_env, str) or not key_env:
            raise TypeError(f"key_env must be the name of an environment variable (a non-empty str); got {key_env!r}.")
        value = os.environ.get(key_env)
        if not value:
            raise ValueError(
                f"key_env={key_env!r}: the environment variable {key_env} is not set or empty; "
                "export it with the signing key first."
            )
        key = value.encode("utf-8")
    if key is None:
        return None
    if isinstance(key, str):
        raise TypeError(
            "key must be bytes (the secret itself, e.g. key=b'...' or key=secret.encode()); got a str. "
            "To read the key from an environment variable, pass key_env='NAME'."
        )
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise TypeError(f"key must be bytes; got {type(key).__name__}.")
    key = bytes(key)
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(
            f"key must be at least {MIN_KEY_BYTES} bytes long (use e.g. secrets.token_hex(32)); got {len(key)} byte(s)."
        )
    return key


def canonical_json(obj: Any) -> bytes:
    """Sorted-key, whitespace-free JSON (NaN/inf allowed, as ``json.dumps`` writes them)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _frame(h: Any, data: bytes) -> None:
    h.update(len(data).to_bytes(8, "big"))
    h.update(data)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _hasher(key: bytes | None) -> Any:
    return hmac.new(key, digestmod=hashlib.sha256) if key is not None else hashlib.sha256()


def _content_digest(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], key: bytes | None) -> str:
    h = _hasher(key)
    h.update(DOMAIN)
    _frame(h, canonical_json(json.loads(json.dumps(meta))))  # the JSON round trip a file makes (tuples -> lists)
    for name in sorted(tensors):
        t = tensors[name]
        _frame(h, name.encode("utf-8"))
        _frame(h, str(t.dtype).encode())
        _frame(h, canonical_json(list(t.shape)))
        _frame(h, _tensor_bytes(t))
    return h.hexdigest()


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """Unkeyed SHA-256 of tensors alone (names, dtypes, shapes, bytes; sorted by name)."""
    return _content_digest({}, tensors, None)


def content_seal(
    meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None, key: bytes | None = None
) -> dict[str, str]:
    """The seal of ``meta`` (JSON-able) and ``tensors``: ``{"scheme", "digest"}``, keyed when ``key`` is given."""
    return {"scheme": SCHEMES[key is not None], "digest": _content_digest(meta, tensors or {}, key)}


def check_seal(
    seal: Any, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None, key: bytes | None, what: str
) -> None:
    """Raise :class:`IntegrityError` unless ``seal`` matches ``meta`` + ``tensors`` under ``key``.

    ``what`` names the artefact in the message (``"detector file '/x/knn.safetensors'"``).
    """
    if not isinstance(seal, Mapping) or seal.get("scheme") not in SCHEMES or not isinstance(seal.get("digest"), str):
        raise IntegrityError(
            f"{what} carries no integrity seal (expected {{'scheme': one of {SCHEMES}, 'digest': hex}}; got "
            f"{seal!r:.80}); it was not written by this version of guard or was altered."
        )
    signed = seal["scheme"] == "hmac-sha256"
    if signed and key is None:
        raise IntegrityError(f"{what} is signed (HMAC-SHA256); pass key=... or key_env=... to load it.")
    if not signed and key is not None:
        raise IntegrityError(
            f"{what} is not signed, but a key was given: refusing an unsigned file (it may have been "
            "rewritten by someone without the key); save it again with the key."
        )
    want = _content_digest(meta, tensors or {}, key)
    if not hmac.compare_digest(want, seal["digest"]):
        if signed:
            raise IntegrityError(
                f"{what} was altered or signed with another key: its HMAC-SHA256 does not match its content."
            )
        raise IntegrityError(
            f"{what} was altered: the SHA-256 of its content (metadata and tensors) does not match the one "
            "recorded when it was saved."
        )


def file_digest(path: str | os.PathLike[str], algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes (read in 1 MiB blocks; ``hashlib.file_digest`` needs Python 3.11)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes."""
    return file_digest(path, "sha256")


def pinned_sha256(expected: Any) -> str | None:
    """``expected_sha256`` checked and normalised (64 lower-case hex digits), or None."""
    if expected is None:
        return None
    if not isinstance(expected, str):
        raise TypeError(f"expected_sha256 must be a str of 64 hex digits; got {type(expected).__name__}.")
    exp = expected.strip().lower()
    if not _HEX64.fullmatch(exp):
        raise ValueError(f"expected_sha256 must be 64 hex digits (a SHA-256); got {expected!r:.80}.")
    return exp


def check_expected_sha256(expected: Any, actual: str, what: str) -> None:
    """Raise unless ``actual`` equals the pinned ``expected`` digest (64 hex digits; None: nothing pinned)."""
    exp = pinned_sha256(expected)
    if exp is None:
        return
    if not hmac.compare_digest(exp, actual):
        raise IntegrityError(f"{what} was altered or replaced: its SHA-256 is {actual}, expected_sha256 is {exp}.")


def write_digest_file(path: str | os.PathLike[str], digest: str) -> Path:
    """Write ``PATH.sha256`` in ``sha256sum`` format (``sha256sum -c`` checks it), atomically."""
    from guard.core.cache import atomic_write_text

    p = Path(path)
    side = p.with_name(p.name + ".sha256")
    atomic_write_text(side, f"{digest}  {p.name}\n")
    return side


def read_digest_file(path: str | os.PathLike[str]) -> str | None:
    """The digest in ``PATH.sha256`` (None when there is no such file)."""
    p = Path(path)
    side = p.with_name(p.name + ".sha256")
    if not side.is_file():
        return None
    first = side.read_text(encoding="utf-8", errors="replace").split()
    return first[0].lower() if first else ""


# ---------------------------------------------------------------- sealed safetensors files


def save_sealed(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    *,
    key: bytes | None = None,
    digest_file: bool = True,
) -> str:
    """Save tensors + metadata with a seal over both (``meta["integrity"]``), atomically.

    Returns the SHA-256 of the written file (also written to ``PATH.sha256`` when
    ``digest_file``): pin it and pass it back to :func:`load_sealed` as ``expected_sha256``.
    """
    from guard.core.cache import save_tensors

    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    body = {k: v for k, v in meta.items() if k != "integrity"}
    body = json.loads(json.dumps(body))  # what the file will hold (tuples -> lists); fails here on non-JSON values
    save_tensors(path, cpu, {**body, "integrity": content_seal(body, cpu, key)})
    digest = file_sha256(path)
    if digest_file:
        write_digest_file(path, digest)
    return digest


def load_sealed(
    path: str | os.PathLike[str],
    *,
    key: bytes | None = None,
    expected_sha256: str | None = None,
    what: str = "file",
    legacy_formats: tuple[str, ...] = (),
    formats: tuple[str, ...] = (),
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load what :func:`save_sealed` wrote, checking (in order) the pinned digest and the seal.

    The bytes are read once: what is hashed is what is parsed. ``legacy_formats``: formats of
    older files that carry no seal; they load only with ``expected_sha256`` (you vouch for the
    bytes) and without a key. ``formats``: when given, a file whose metadata names another format
    is refused first, as the wrong kind of file, before any seal is checked. Raises
    :class:`IntegrityError` (a ValueError) on any mismatch.
    """
    from guard.core.cache import read_tensors

    p = Path(path)
    where = f"{what} {str(p)!r}"
    expected_sha256 = pinned_sha256(expected_sha256)
    if not p.is_file():
        raise ValueError(f"{where} does not exist.")
    data = p.read_bytes()
    check_expected_sha256(expected_sha256, hashlib.sha256(data).hexdigest(), where)
    tensors, meta = read_tensors(data, str(p))
    if formats and meta.get("format") not in (*formats, *legacy_formats):
        raise ValueError(
            f"{where} is not a saved {what.removesuffix(' file')} (format {meta.get('format')!r}; "
            f"expected {formats[0]!r})."
        )
    seal = meta.pop("integrity", None)
    if seal is None and meta.get("format") in legacy_formats:
        if expected_sha256 is None or key is not None:
            raise IntegrityError(
                f"{where} was written by an older guard (format {meta.get('format')!r}) without a seal over its "
                "metadata; it loads only with expected_sha256= (the SHA-256 of the file you trust, e.g. from "
                "sha256sum) and no key. Save it again to seal it."
            )
        return tensors, meta
    check_seal(seal, meta, tensors, key, where)
    return tensors, meta
