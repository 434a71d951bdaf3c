"""What an audit step is: a named object that declares what it needs and what it gives.

Each step fills its own section of ``report.json`` and may hand a typed result to later steps:

* :class:`AttackSet` — attack results by name (every attack step gives one; the runner merges
  them, so the detectors step sees all of them);
* :class:`guard.GuardedModel` — the fitted and calibrated detectors (the detectors step);
* :class:`guard.training.RejectClassifier` — the hardened model (the harden step).

A step lists the results it reads in ``needs`` (keyword -> type); the runner passes the
latest result of each type, or ``None`` when no earlier step gave one. A step that was
completed in an earlier, interrupted run is not run again: its ``restore`` rebuilds its result
from the files it wrote into the output folder, so the steps after it see the same inputs as
in an uninterrupted run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from guard.attacks.base import AttackResult
from guard.audit.settings import AuditSettings, Cost, resolve_settings
from guard.core.cache import atomic_write_text, load_tensors, save_tensors
from guard.core.data import Split
from guard.report.schema import REPORT_VERSION, Report

__all__ = ["AttackSet", "AttackStep", "AuditContext", "AuditOptions", "Step", "REPORT_VERSION", "SAVED_EXTRAS"]

#: The tensor extras of an attack result that :meth:`AuditContext.save_attack` keeps: which
#: held-out images it started from, guides and sources (feature adversaries), wanted labels and
#: confidences (fooling images), the model's label on ``x_adv`` (``pred``, ``adv_label``), the
#: distance ratio, and the patches (``patches``: one per image; ``patch``: one universal patch).
#: report.html draws its examples from them (:mod:`guard.report`).
SAVED_EXTRAS = (
    "test_index",
    "guide_index",
    "label",
    "confidence",
    "guide",
    "source",
    "pred",
    "guide_label",
    "adv_label",
    "distance_ratio",
    "patches",
    "patch",
)


@dataclass
class AuditOptions:
    """Knobs of an audit run. ``quick`` shrinks every step for tests and smoke runs.

    ``extra`` holds per-step overrides by key (``{"fooling_threshold": 0.99}``): the keys and
    their defaults are the fields of the settings classes of :mod:`guard.audit.settings`; an
    unknown key raises ValueError, a value of the wrong type TypeError. ``settings``: an
    already resolved :class:`~guard.audit.settings.AuditSettings` (a report's
    ``report["settings"]["steps"]``) used as it is, instead of resolving ``extra`` (which must
    then be empty). ``key_env`` names the variable, never the key itself, so no secret sits in
    the options.
    """

    seed: int = 0
    quick: bool = False
    harden: bool = False
    export: bool = True
    repetitions: int = 10
    progress: bool = True
    device: str = "cpu"
    #: the name of an environment variable holding an HMAC key: the guarded folder, the
    #: hardened model and the ONNX graph are signed with it, and verified with it on resume
    key_env: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    settings: AuditSettings | None = None


@dataclass
class AttackSet:
    """Attack results by attack name (``report["attacks"]`` keys)."""

    results: dict[str, AttackResult] = field(default_factory=dict)

    def merged(self, other: AttackSet) -> AttackSet:
        return AttackSet({**self.results, **other.results})


@dataclass
class AuditContext:
    """What every step sees: the model, the data, the output folder, the options, the report."""

    model: nn.Module
    model_name: str
    train: Split
    test: Split
    data_source: str
    out: Path
    options: AuditOptions
    #: report.json as the steps fill it (its keys: :class:`guard.report.schema.Report`)
    report: Report = field(default_factory=Report)
    #: what the steps' defaults are derived from (:mod:`guard.core.budget`): eps / delta from
    #: the data, ``work_scale`` from the model's cost per image; also ``report["defaults"]``
    defaults: dict[str, Any] = field(default_factory=dict)
    #: the settings :func:`guard.audit.run_audit` resolved once at the start (None: :attr:`settings`
    #: resolves ``options`` on every access, so a step run on its own sees its options as they are)
    resolved: AuditSettings | None = None

    @property
    def cost(self) -> Cost:
        """What the steps' defaults scale with: ``defaults`` (work scale, the data's eps) and the data's size."""
        return Cost.from_defaults(self.defaults, n_test=len(self.test), repetitions=self.options.repetitions)

    @property
    def settings(self) -> AuditSettings:
        """Every step's typed settings (:mod:`guard.audit.settings`)."""
        if self.resolved is not None:
            return self.resolved
        if self.options.settings is not None:
            return self.options.settings
        return resolve_settings(self.options.extra, quick=self.options.quick, seed=self.options.seed, cost=self.cost)

    @property
    def report_path(self) -> Path:
        return self.out / "report.json"

    def save_report(self) -> None:
        atomic_write_text(self.report_path, json.dumps(self.report, indent=2, sort_keys=False) + "\n")

    def artifact_path(self, name: str) -> Path:
        return self.out / "artifacts" / f"{name}.safetensors"

    def save_artifact(self, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> Path:
        path = self.artifact_path(name)
        save_tensors(path, tensors, meta)
        return path

    def load_artifact(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        path = self.artifact_path(name)
        return load_tensors(path) if path.is_file() else None

    # -- attack results: the one format every attack step writes and the resume path reads
    def save_attack(self, name: str, result: AttackResult, meta: dict[str, Any] | None = None) -> None:
        """Save ``x_adv``, ``success``, ``y`` and the tensor extras of :data:`SAVED_EXTRAS` that the result has."""
        tensors = {"x_adv": result.x_adv.detach().float().cpu(), "success": result.success.detach().bool().cpu()}
        for key in SAVED_EXTRAS:
            value = result.extras.get(key)
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().cpu()
        if result.y is not None:
            tensors["y"] = result.y.detach().cpu()
        self.save_artifact("attack_" + name, tensors, {"attack": name, **(meta or {})})

    def load_attack(self, name: str) -> AttackResult | None:
        art = self.load_artifact("attack_" + name)
        if art is None or "x_adv" not in art[0]:
            return None
        t = art[0]
        extras = {k: v for k, v in t.items() if k not in ("x_adv", "success", "y")}
        return AttackResult(t["x_adv"].float(), t["success"].bool(), t.get("y"), extras=extras)


class Step:
    """One audit step. Subclasses set ``name``, ``needs``, ``gives`` and write ``run``.

    Attributes:
        name: the step's id (``report["_completed_steps"]``, ``report["timings"]``).
        needs: keyword -> type of an earlier step's result that ``run`` takes.
        gives: the type of what ``run`` returns (None: nothing for later steps).
    """

    name: ClassVar[str]
    needs: ClassVar[dict[str, type]] = {}
    gives: ClassVar[type | None] = None

    def skip_reason(self, ctx: AuditContext) -> str | None:
        """Why the options leave this step out (None: it runs). A skipped step is not marked
        complete, so a resumed audit with the option on runs it."""
        return None

    def run(self, ctx: AuditContext, **inputs: Any) -> Any:
        raise NotImplementedError

    def restore(self, ctx: AuditContext) -> Any:
        """The result ``run`` gave, rebuilt from the output folder (for ``--resume``)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class AttackStep(Step):
    """A step that runs attacks: it gives an :class:`AttackSet` of ``attack_names`` and rebuilds it
    from the ``attack_<name>`` artifacts on resume."""

    gives = AttackSet
    attack_names: ClassVar[tuple[str, ...]] = ()

    def restore(self, ctx: AuditContext) -> AttackSet:
        return AttackSet({n: r for n in self.attack_names if (r := ctx.load_attack(n)) is not None})
