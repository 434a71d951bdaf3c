"""``run_audit``: run the steps in order and write OUT/report.json after each one.

The data path reads top to bottom: every step of :data:`guard.audit.steps.STEPS` gets the
context and the typed results it declares in ``needs``; what it returns (``gives``) is handed
to the steps after it. The report is rewritten atomically after every step, so an interrupted
audit re-run with ``resume=True`` skips the steps already done and rebuilds their results from
the output folder (:meth:`Step.restore`). At the end the page OUT/report.html is built from the
report and the artifacts (:mod:`guard.report`); a page that cannot be built is recorded under
``report["errors"]["report"]`` and never costs the audit its results.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from guard.audit.settings import resolve_settings
from guard.audit.step import REPORT_VERSION, AttackSet, AuditContext, AuditOptions, Step
from guard.core.budget import data_defaults, macs_per_image, work_scale
from guard.core.cache import remove_stale_temps
from guard.core.data import Split
from guard.core.registry import check_report_names
from guard.core.validation import check_device
from guard.report import write_page
from guard.report.schema import Report

__all__ = ["run_audit"]

log = logging.getLogger(__name__)


def _check_steps(steps: Sequence[Step]) -> list[Step]:
    seen: set[str] = set()
    out = []
    for s in steps:
        if not isinstance(s, Step):
            raise TypeError(f"steps must be guard.audit.Step instances; got {type(s).__name__}.")
        if s.name in seen:
            raise ValueError(f"steps lists the step {s.name!r} twice.")
        seen.add(s.name)
        out.append(s)
    return out


def _keep(results: dict[type, Any], value: Any) -> None:
    if value is None:
        return
    key = type(value)
    if isinstance(value, AttackSet) and AttackSet in results:
        results[AttackSet] = results[AttackSet].merged(value)
        return
    for known in list(results):  # a subclass result (e.g. a GuardedModel subclass) fills its base slot
        if isinstance(value, known):
            key = known
    results[key] = value


def _names(report: dict[str, Any]) -> tuple[set[str], set[tuple[str, str]]]:
    attacks = set(report.get("attacks") or {})
    dets = {
        (d, a) for d, per in (report.get("detectors") or {}).items() for a in (per if isinstance(per, dict) else {})
    }
    return attacks, dets | {(d, "") for d in (report.get("detectors") or {})}


def _new_names(report: dict[str, Any], known: tuple[set[str], set[tuple[str, str]]]) -> dict[str, Any]:
    """The attack and detector names of ``report`` that are not in ``known`` (an earlier :func:`_names`), as a report."""
    attacks, dets = _names(report)
    out: dict[str, Any] = {"attacks": {a: {} for a in attacks - known[0]}, "detectors": {}}
    for d, a in dets - known[1]:
        out["detectors"].setdefault(d, {})
        if a:
            out["detectors"][d][a] = {}
    return out


def _lookup(results: dict[type, Any], want: type) -> Any:
    for key, value in results.items():
        if issubclass(key, want):
            return value
    return None


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
    steps: Sequence[Step] | None = None,
    fail_fast: bool = False,
) -> Report:
    """Run the audit steps and return the report (also written to ``out/report.json``).

    Args:
        model: the classifier (images in [0, 1] -> logits).
        train, test: clean data; detectors and patch attacks learn on ``train`` only.
        out: the output folder (created).
        model_name, data_source: recorded in the report's ``model`` section.
        options: :class:`AuditOptions`.
        resume: keep the steps already in ``out/report.json`` (their results are reloaded).
        steps: the steps to run (default :data:`guard.audit.steps.STEPS`).
        fail_fast: re-raise a step's (or the page's) exception instead of recording it.

    ``options.extra`` is resolved into typed settings (:mod:`guard.audit.settings`) before any
    step runs: an unknown key raises ValueError, a value of the wrong type TypeError. The
    resolved settings, with the seed, quick, threads and the other options, are written to
    ``report["settings"]``; ``AuditOptions(settings=AuditSettings.from_dict(report["settings"]["steps"]))``
    with the same options runs the same audit again.

    A step that raises is recorded under ``report["errors"][step]`` (and logged) and the audit
    goes on with the next step; so does a step that writes an attack or detector name that
    :mod:`guard.core.registry` does not know; it is not marked complete, so ``resume=True`` retries it. The
    last thing written is ``out/report.html`` (:func:`guard.report.write_page`); if that fails
    the error goes to ``report["errors"]["report"]`` and the report is returned all the same.
    """
    if steps is None:
        from guard.audit.steps import STEPS

        steps = STEPS
    steps = _check_steps(steps)
    opts = options or AuditOptions()
    check_device(opts.device, "options.device")
    if opts.settings is not None and opts.extra:
        raise ValueError(
            f"options.settings (already resolved) and options.extra cannot both be given; got extra keys {sorted(opts.extra)}."
        )
    out_path = Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_path)  # what a killed run was writing; the audit owns its output folder
    ctx = AuditContext(
        model=model.to(opts.device),
        model_name=model_name,
        train=train,
        test=test,
        data_source=data_source,
        out=out_path,
        options=opts,
    )
    if resume and ctx.report_path.is_file():
        _load_report(ctx)
    _record_settings(ctx, resume)
    _run_steps(ctx, steps, fail_fast)
    ctx.report.get("errors", {}).pop("report", None)  # an earlier run's page error; the page is built again below
    if not ctx.report.get("errors"):
        ctx.report.pop("errors", None)
    if not ctx.report.get("skipped"):
        ctx.report.pop("skipped", None)
    ctx.save_report()
    _write_page(ctx, fail_fast)
    return ctx.report


def _run_steps(ctx: AuditContext, steps: list[Step], fail_fast: bool) -> None:
    """Run the steps in order, each on the results of those before it; the report is saved after each.

    Steps in ``report["_completed_steps"]`` are not run again: their results are restored.
    """
    done = set(ctx.report.setdefault("_completed_steps", []))
    results: dict[type, Any] = {}
    for step in steps:
        if step.name in done:
            log.info("audit: %s already in the report, skipped (resume)", step.name)
            _keep(results, step.restore(ctx))
            continue
        reason = step.skip_reason(ctx)
        if reason is not None:
            log.info("audit: %s skipped: %s", step.name, reason)
            ctx.report.setdefault("skipped", {})[step.name] = reason
            ctx.save_report()
            continue
        ctx.report.get("skipped", {}).pop(step.name, None)
        if _run_step(ctx, step, results, fail_fast):
            done.add(step.name)
            ctx.report["_completed_steps"] = [s.name for s in steps if s.name in done]
            ctx.save_report()


def _load_report(ctx: AuditContext) -> None:
    """Read the report an earlier run wrote into ``ctx.report``; it must be a guard report of this version."""
    try:
        ctx.report = json.loads(ctx.report_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"cannot resume: {str(ctx.report_path)!r} is not valid JSON: {err}") from err
    if not isinstance(ctx.report, dict) or ctx.report.get("version", REPORT_VERSION) != REPORT_VERSION:
        raise ValueError(f"cannot resume: {str(ctx.report_path)!r} is not a version-{REPORT_VERSION} guard report.")


def _record_settings(ctx: AuditContext, resume: bool) -> None:
    """Resolve the step settings into ``ctx`` and write the options, data defaults and settings to the report."""
    opts = ctx.options
    ctx.report.setdefault("version", REPORT_VERSION)
    ctx.report["options"] = {
        "seed": opts.seed,
        "quick": opts.quick,
        "harden": opts.harden,
        "export": opts.export,
        "repetitions": opts.repetitions,
        "device": opts.device,
    }
    macs = macs_per_image(ctx.model, ctx.test.x[:1]) if not isinstance(ctx.model, torch.jit.ScriptModule) else 0.0
    ctx.defaults = {**data_defaults(ctx.train.x), "macs_per_image": macs, "work_scale": work_scale(macs)}
    ctx.report["defaults"] = dict(ctx.defaults)
    ctx.resolved = (
        opts.settings
        if opts.settings is not None
        else resolve_settings(opts.extra, quick=opts.quick, seed=opts.seed, cost=ctx.cost)
    )
    settings = {**ctx.report["options"], "threads": torch.get_num_threads(), "steps": ctx.resolved.to_dict()}
    if resume and ctx.report.get("settings", settings) != settings:
        log.warning("audit: resuming with other settings than the report's; the steps already done keep theirs")
    ctx.report["settings"] = settings


def _run_step(ctx: AuditContext, step: Step, results: dict[type, Any], fail_fast: bool) -> bool:
    """Run one step on the results it needs; True when it completed (its result kept, its timing recorded).

    A step that raises is logged and recorded under ``report["errors"]`` (re-raised with ``fail_fast``).
    """
    inputs = {key: _lookup(results, typ) for key, typ in step.needs.items()}
    t0 = time.perf_counter()
    log.info("audit: %s", step.name)
    try:
        known = _names(ctx.report)
        value = step.run(ctx, **inputs)
        check_report_names(_new_names(ctx.report, known))  # every name this step wrote is one of the registry's
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # one capability failing must not lose the others' results
        log.error(
            "audit: step %s failed: %s: %s",
            step.name,
            type(err).__name__,
            err,
            exc_info=log.isEnabledFor(logging.DEBUG),
        )
        ctx.report.setdefault("errors", {})[step.name] = f"{type(err).__name__}: {err}"
        ctx.save_report()
        if fail_fast:
            raise
        return False
    if step.gives is not None and value is not None and not isinstance(value, step.gives):
        raise TypeError(
            f"audit step {step.name!r} must give a {step.gives.__name__}; it gave a {type(value).__name__}."
        )
    _keep(results, value)
    ctx.report.get("errors", {}).pop(step.name, None)
    ctx.report.setdefault("timings", {})[step.name] = round(time.perf_counter() - t0, 3)
    return True


def _write_page(ctx: AuditContext, fail_fast: bool) -> None:
    """OUT/report.html; a failure is logged and recorded under report["errors"]["report"], never raised (unless fail_fast)."""
    try:
        page = write_page(ctx.out, ctx.report)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # the page is a view of the results: it must not cost them
        log.error(
            "audit: report.html not written: %s: %s", type(err).__name__, err, exc_info=log.isEnabledFor(logging.DEBUG)
        )
        ctx.report.setdefault("errors", {})["report"] = f"{type(err).__name__}: {err}"
        ctx.save_report()
        if fail_fast:
            raise
        return
    log.info("audit: wrote %s (%d bytes)", page.path, page.bytes)
