"""``guard report``: one self-contained report.html from an audit's report.json and artifacts.

The page (``OUT/report.html``) has one section per audit step that ran: the model and data, a
summary in words, gradient attacks, patches, feature adversaries, fooling images, detectors,
adaptive evaluation, hardening and export; every image is an inline PNG, there is no script
and no reference outside the file. :func:`write_page` builds it; ``guard audit`` calls it at
the end of every run and ``guard report OUT`` calls it again (for an interrupted or resumed
audit, or after an upgrade of guard).

This package reads the audit's output and imports nothing above :mod:`guard.core` (matplotlib
with its Agg canvas, numpy and Pillow besides); :data:`REPORT_VERSION` lives here because the
reader is the one that must refuse a report newer than it understands.
"""

from __future__ import annotations

from guard.report.page import PageResult, build_page, write_page
from guard.report.schema import REPORT_VERSION
from guard.report.source import AuditFolder, ReportInputError

__all__ = ["AuditFolder", "PageResult", "REPORT_VERSION", "ReportInputError", "build_page", "write_page"]
