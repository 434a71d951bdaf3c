"""What every section builder shares: a writer that collects HTML and says what is missing.

A section builder is a function ``build(src: AuditFolder) -> Section | None`` (None: its step did
not run, so the page leaves the section out). It writes through a :class:`SectionWriter`, whose
:meth:`~SectionWriter.artifact` loads an artifact or, when it is missing, puts a note into the
section saying what cannot be shown and why; the page lists those notes again at the top.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from guard.report.html import Raw, StripRow, command, note, tile
from guard.report.images import display_size, png_uri
from guard.report.source import AuditFolder
from guard.report.text import audit_command, class_names

__all__ = ["Section", "SectionWriter", "image_row", "example_positions"]


@dataclass
class Section:
    """One section of the page: its anchor, heading, HTML and the artifacts it missed."""

    id: str
    title: str
    body: str
    missing: list[str] = field(default_factory=list)


class SectionWriter:
    """Collects a section's HTML; knows the report, class names and the audit command."""

    def __init__(self, src: AuditFolder, sid: str, title: str) -> None:
        self.src = src
        self.report = src.report
        self.names = class_names(src.report)
        self.audit = audit_command(src.report)
        self.id, self.title = sid, title
        self.parts: list[str] = []
        self.missing: list[str] = []

    def add(self, *html: str) -> None:
        self.parts.extend(html)

    def cmd(self, keys: Sequence[str] = (), artifacts: Sequence[str] = ()) -> Raw:
        return command(self.audit, keys, artifacts)

    def artifact(self, name: str, what: str, *, needs: Sequence[str] = ()) -> dict[str, np.ndarray] | None:
        """Artifact ``name`` (with the tensors ``needs``), or None after a note saying ``what`` is not shown."""
        arrays = self.src.artifact(name)
        reason = self.src.missing.get(name)
        if arrays is not None:
            lacking = [k for k in needs if k not in arrays]
            if not lacking:
                return arrays
            reason = f"has no {', '.join(repr(k) for k in lacking)} (written by an older guard?)"
        if name not in self.missing:
            self.missing.append(name)
        why = "is missing" if reason in (None, "missing") else f"cannot be used: {reason}"
        self.add(
            note(
                f"artifacts/{name}.safetensors {why}, so {what} cannot be shown here. "
                f"Re-running the audit step that writes it (or the whole audit) brings it back; then run guard report OUT."
            )
        )
        return None

    def done(self) -> Section:
        return Section(self.id, self.title, "".join(self.parts), self.missing)


def image_row(
    heading: str, images: np.ndarray, captions: Sequence[str] = (), bad: Sequence[bool] = (), *, alt: str = ""
) -> StripRow:
    """A :class:`StripRow` of (N, C, H, W) images with their captions."""
    tiles = []
    for i in range(int(images.shape[0])):
        h, w = images.shape[-2:]
        dw, dh = display_size(int(h), int(w))
        cap = captions[i] if i < len(captions) else ""
        tiles.append(
            tile(
                png_uri(images[i]),
                f"{alt or heading} {i + 1}",
                cap,
                width=dw,
                height=dh,
                bad=bool(bad[i]) if i < len(bad) else False,
            )
        )
    return StripRow(heading, tiles)


def example_positions(test_index: Any, n_examples: int) -> dict[int, int]:
    """Held-out index k < n_examples -> its position in an attack artifact (from ``test_index``)."""
    if test_index is None:
        return {}
    idx = np.asarray(test_index).reshape(-1)
    return {int(k): j for j, k in enumerate(idx.tolist()) if 0 <= int(k) < n_examples}
