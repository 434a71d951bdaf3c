"""``guard audit``: run every capability on a model and write OUT/report.json.

The steps are listed, in order, in :mod:`guard.audit.steps`; each lives in its own module and
fills one section of the report (keys documented in the README, "report.json"). The runner
(:func:`run_audit`) hands each step the typed results it declares (:mod:`guard.audit.step`).
"""

from guard.audit.runner import run_audit
from guard.audit.step import REPORT_VERSION, AttackSet, AuditContext, AuditOptions, Step
from guard.audit.steps import STEPS, step

__all__ = ["AttackSet", "AuditContext", "AuditOptions", "REPORT_VERSION", "STEPS", "Step", "run_audit", "step"]
