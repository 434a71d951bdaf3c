"""An audit's output folder as the page reads it: report.json (checked) and its artifacts.

:class:`AuditFolder` opens ``OUT/report.json``, refuses a missing, unreadable or newer report
with a :class:`ReportInputError` (a ``ValueError``: the CLI exits 2 on it) and loads the
safetensors artifacts under ``OUT/artifacts`` on demand, as numpy arrays. An artifact that is
missing or damaged is not an error: it is remembered in :attr:`AuditFolder.missing`, and the
section that wanted it says what it cannot show.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from guard.core.cache import load_tensors
from guard.report.schema import REPORT_VERSION, Report

__all__ = ["AuditFolder", "ReportInputError"]

log = logging.getLogger(__name__)


class ReportInputError(ValueError):
    """OUT/report.json is missing, unreadable, not a guard report, or newer than this guard reads."""


def check_report(report: Any, where: str) -> Report:
    """``report`` if it is a guard report of a version this guard reads, else ReportInputError."""
    if not isinstance(report, dict):
        raise ReportInputError(f"{where} must hold a JSON object (a guard report); got a {type(report).__name__}.")
    version = report.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ReportInputError(
            f"{where} must have an integer 'version' (a guard report, version <= {REPORT_VERSION}); got {version!r}."
        )
    if version > REPORT_VERSION:
        raise ReportInputError(
            f"{where} is report version {version}, newer than this guard reads (version <= {REPORT_VERSION}); "
            "upgrade guard to build its page."
        )
    return report


@dataclass
class AuditFolder:
    """The report and, on demand, the artifacts of one audit output folder."""

    out: Path
    #: report.json (its keys: :class:`guard.report.schema.Report`)
    report: Report
    #: artifact name -> why it could not be read ("missing" or the loader's message)
    missing: dict[str, str] = field(default_factory=dict)
    _cache: dict[str, dict[str, np.ndarray] | None] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, out: str | Path) -> AuditFolder:
        """Read ``out/report.json``; ReportInputError when there is none or it cannot be used."""
        folder = Path(out)
        path = folder / "report.json"
        if not folder.is_dir():
            raise ReportInputError(
                f"the audit folder must be a directory holding report.json; got {str(folder)!r}, which "
                f"{'is not a directory' if folder.exists() else 'does not exist'}."
            )
        if not path.is_file():
            raise ReportInputError(
                f"the audit folder {str(folder)!r} must hold report.json (written by guard audit --out DIR); "
                "it has none."
            )
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ReportInputError(
                f"{str(path)!r} must be a readable JSON guard report; reading it failed: {err}"
            ) from err
        return cls(folder, check_report(report, repr(str(path))))

    @classmethod
    def from_report(cls, out: str | Path, report: Report) -> AuditFolder:
        """The folder with a report already in memory (what run_audit has just written)."""
        return cls(Path(out), check_report(report, "report"))

    def artifact_path(self, name: str) -> Path:
        return self.out / "artifacts" / f"{name}.safetensors"

    def artifact(self, name: str) -> dict[str, np.ndarray] | None:
        """The tensors of ``artifacts/NAME.safetensors`` as numpy arrays (None: missing or damaged)."""
        if name not in self._cache:
            path = self.artifact_path(name)
            arrays: dict[str, np.ndarray] | None = None
            if not path.is_file():
                self.missing[name] = "missing"
            else:
                try:
                    tensors, _ = load_tensors(path)
                    arrays = {k: v.numpy() for k, v in tensors.items()}
                except ValueError as err:
                    log.warning("report: artifact %s unreadable: %s", path, err)
                    self.missing[name] = str(err)
            self._cache[name] = arrays
        return self._cache[name]

    def section(self, *keys: str) -> Any:
        """``report[k1][k2]...`` or None when a key is absent or a level is not a dict."""
        node: Any = self.report
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                return None
            node = node[k]
        return node

    def attack(self, name: str) -> dict[str, Any] | None:
        """``report["attacks"][name]`` when it is a dict."""
        entry = self.section("attacks", name)
        return entry if isinstance(entry, dict) else None
