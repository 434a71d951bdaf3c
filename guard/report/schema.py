"""The report.json format version, owned here because both its writer and its reader need it.

``guard.audit`` writes report.json (and re-exports :data:`REPORT_VERSION` as
``guard.audit.step.REPORT_VERSION``); :mod:`guard.report` reads it. The reader sits below the
writer in the import layers, so the number lives with the reader. Bump it when a key is renamed
or changes meaning (adding keys does not need a bump): a page builder then refuses a report
newer than it understands instead of drawing it wrongly.
"""

from __future__ import annotations

__all__ = ["REPORT_VERSION"]

REPORT_VERSION = 1
