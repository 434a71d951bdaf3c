"""``guard audit``: run every capability on a model and write OUT/report.json.

The steps are listed, in order, in :mod:`guard.audit.steps`; each lives in its own module and
fills one section of the report (keys documented in the README, "report.json"). The runner
(:func:`run_audit`) hands each step the typed results it declares (:mod:`guard.audit.step`) and
the typed settings resolved from ``AuditOptions.extra`` (:mod:`guard.audit.settings`).
"""

from guard.audit.runner import run_audit
from guard.audit.settings import AuditSettings, resolve_settings
from guard.audit.step import REPORT_VERSION, AttackSet, AuditContext, AuditOptions, Step
from guard.audit.steps import STEPS, step

__all__ = [
    "AttackSet",
    "AuditContext",
    "AuditOptions",
    "AuditSettings",
    "REPORT_VERSION",
    "STEPS",
    "Step",
    "resolve_settings",
    "run_audit",
    "step",
]
