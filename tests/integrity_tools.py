"""What an attacker who can write guard's files does to them (shared by the integrity tests)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from guard.core.integrity import content_seal

KEY = b"an-hmac-key-of-32-bytes-for-test"
OTHER_KEY = b"another-key-of-32-bytes-for-test"


def rewrite_meta(path: Path, change: Callable[[dict[str, Any]], None], *, reseal: bool | bytes = False) -> None:
    """Edit the guard metadata of a safetensors file in place.

    ``reseal``: False keeps the old seal (a careless edit); True recomputes the unkeyed
    SHA-256 seal (an attacker who read the docs); bytes re-sign it with that key (an attacker
    with a key of their own).
    """
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["guard"])
    change(meta)
    if reseal is not False:
        body = {k: v for k, v in meta.items() if k != "integrity"}
        meta = {**body, "integrity": content_seal(body, tensors, None if reseal is True else reseal)}
    save_file(tensors, str(path), metadata={"guard": json.dumps(meta)})


def flip_last_byte(path: Path, offset: int = -3) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def reseal_index(path: Path, change: Callable[[dict[str, Any]], None], key: bytes | None = None) -> None:
    """Edit guarded.json and recompute its seal (unkeyed, or under ``key``)."""
    index = json.loads(path.read_text())
    index.pop("integrity", None)
    change(index)
    index["integrity"] = content_seal(json.loads(json.dumps(index)), key=key)
    path.write_text(json.dumps(index, indent=2) + "\n")
