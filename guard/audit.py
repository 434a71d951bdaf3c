"""``guard audit``: run every capability on a model and write DIR/report.json.

The audit is a list of steps; each fills one section of the report (the contract in
DESIGN.md) and the report is rewritten atomically after every step, so an interrupted audit
re-run with ``resume=True`` skips the sections already written. Steps share objects (attack
results, the fitted guarded model) through ``AuditContext.shared`` and persist what later
steps need with ``save_artifact`` (safetensors, no pickle).
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from guard.cache import atomic_write_text, load_tensors, save_tensors
from guard.data import Split

__all__ = ["AuditContext", "AuditOptions", "run_audit", "STEPS", "REPORT_VERSION"]

log = logging.getLogger(__name__)

REPORT_VERSION = 1

# (step id, "module:function"). Each function takes an AuditContext and fills its section of
# ctx.report (several attack steps share report["attacks"]). A step that returns False was
# skipped by an option: it is not marked complete, so a later ``--resume`` with the option on
# runs it. Steps whose module is missing are skipped with a warning.
STEPS: list[tuple[str, str]] = [
    ("model", "guard.audit_model:run"),
    ("attacks_gradient", "guard.audit_gradient:run"),  # fgsm, pgd
    ("attacks_patches", "guard.audit_patches:run"),  # patch_gan, universal_patch, random_patch
    ("attacks_features", "guard.audit_features:run"),  # feature_adversary
    ("attacks_fooling", "guard.audit_fooling:run"),  # fooling_gradient, fooling_direct, fooling_cppn
    ("detectors", "guard.audit_detectors:run"),
    ("harden", "guard.audit_harden:run"),  # only with options.harden
    ("export", "guard.audit_export:run"),  # skipped with options.export False
]


@dataclass
class AuditOptions:
    """Knobs of an audit run. ``quick`` shrinks every step for tests and smoke runs."""

    seed: int = 0
    quick: bool = False
    harden: bool = False
    export: bool = True
    repetitions: int = 10
    progress: bool = True
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class AuditContext:
    model: nn.Module
    model_name: str
    train: Split
    test: Split
    data_source: str
    out: Path
    options: AuditOptions
    report: dict[str, Any] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def report_path(self) -> Path:
        return self.out / "report.json"

    def save_report(self) -> None:
        atomic_write_text(self.report_path, json.dumps(self.report, indent=2, sort_keys=False) + "\n")

    def save_artifact(self, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> Path:
        path = self.out / "artifacts" / f"{name}.safetensors"
        save_tensors(path, tensors, meta)
        return path

    def load_artifact(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        path = self.out / "artifacts" / f"{name}.safetensors"
        return load_tensors(path) if path.is_file() else None


def _resolve(spec: str) -> Callable[[AuditContext], bool | None] | None:
    mod_name, _, fn = spec.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as err:
        if err.name == mod_name:
            return None
        raise
    return getattr(module, fn)


def run_audit(
    model: nn.Module,
    train: Split,
    test: Split,
    out: str | Path,
    *,
    model_name: str = "model",
    data_source: str = "user data",
    options: AuditOptions | None = None,
    resume: bool = False,
    steps: list[tuple[str, str]] | None = None,
    fail_fast: bool = False,
) -> dict[str, Any]:
    """Run the audit steps and return the report (also written to ``out/report.json``).

    A step that raises is recorded under ``report["errors"][step]`` (and logged) and the audit
    goes on with the next step; it is not marked complete, so ``resume=True`` retries it.
    ``fail_fast=True`` re-raises instead.
    """
    opts = options or AuditOptions()
    out_path = Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    ctx = AuditContext(model=model.to(opts.device), model_name=model_name, train=train, test=test,
                       data_source=data_source, out=out_path, options=opts)
    if resume and ctx.report_path.is_file():
        try:
            ctx.report = json.loads(ctx.report_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"cannot resume: {str(ctx.report_path)!r} is not valid JSON: {err}") from err
    ctx.report.setdefault("version", REPORT_VERSION)
    done = set(ctx.report.setdefault("_completed_steps", []))
    for section, spec in steps if steps is not None else STEPS:
        if section in done:
            log.info("audit: %s already in the report, skipped (resume)", section)
            continue
        fn = _resolve(spec)
        if fn is None:
            log.warning("audit: step %s (%s) is not available, skipped", section, spec)
            continue
        t0 = time.perf_counter()
        log.info("audit: %s", section)
        try:
            ran = fn(ctx)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:  # one capability failing must not lose the others' results
            log.error("audit: step %s failed: %s: %s", section, type(err).__name__, err, exc_info=log.isEnabledFor(logging.DEBUG))
            ctx.report.setdefault("errors", {})[section] = f"{type(err).__name__}: {err}"
            ctx.save_report()
            if fail_fast:
                raise
            continue
        ctx.report.get("errors", {}).pop(section, None)
        if ran is not False:
            ctx.report.setdefault("timings", {})[section] = round(time.perf_counter() - t0, 3)
            ctx.report["_completed_steps"] = sorted(done | {section})
            done.add(section)
        ctx.save_report()
    return ctx.report
