"""Assemble report.html: header, table of contents, the sections, and write it atomically.

A section whose builder raises does not cost the page: it is replaced by a note with the error
(and logged), and the other sections are drawn. What the page could not show (missing or
damaged artifacts, failed sections) is returned in :class:`PageResult` so that callers can say so.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from guard.core.cache import atomic_write_text
from guard.report.html import STYLE, esc, note
from guard.report.schema import Report
from guard.report.sections import SECTIONS, Section
from guard.report.source import AuditFolder
from guard.report.text import audit_command

__all__ = ["PageResult", "build_page", "render", "write_page"]

log = logging.getLogger(__name__)


@dataclass
class PageResult:
    """What :func:`write_page` wrote and what the page could not show."""

    path: Path
    bytes: int
    seconds: float
    sections: list[str]
    #: artifact name -> why it could not be read
    missing: dict[str, str] = field(default_factory=dict)
    #: section anchor -> the error its builder raised
    failed: dict[str, str] = field(default_factory=dict)


def _sections(src: AuditFolder) -> tuple[list[Section], dict[str, str]]:
    out, failed = [], {}
    for sid, title, build in SECTIONS:
        try:
            s = build(src)
        except Exception as err:  # one broken section must not cost the page
            log.error(
                "report: section %s failed: %s: %s",
                sid,
                type(err).__name__,
                err,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
            failed[sid] = f"{type(err).__name__}: {err}"
            s = Section(sid, title, note(f"This section could not be drawn: {type(err).__name__}: {err}", "error"))
        if s is not None:
            out.append(s)
    return out, failed


def render(src: AuditFolder) -> tuple[str, list[Section], dict[str, str]]:
    """The page's HTML for the audit folder ``src``, its sections and the failed ones."""
    sections, failed = _sections(src)
    r = src.report
    model = (r.get("model") or {}).get("name", "a model") if isinstance(r.get("model"), dict) else "a model"
    toc = "".join(f'<li><a href="#{esc(s.id)}">{esc(s.title)}</a></li>' for s in sections)
    missing = "".join(
        f"<li><code>artifacts/{esc(n)}.safetensors</code> ({esc('missing' if why == 'missing' else why)})</li>"
        for n, why in src.missing.items()
    )
    head = (
        f"<header><h1>guard audit: {esc(model)}</h1>"
        f'<p class="lead">Written from <code>report.json</code> and <code>artifacts/</code> in this folder (OUT). '
        f"The audit: <code>{esc(audit_command(r))}</code>; this page again: <code>guard report OUT</code>.</p></header>"
    )
    if missing:
        head += (
            f'<p class="note">Some artifacts could not be read, so parts of the page are missing:</p><ul>{missing}</ul>'
        )
    body = "".join(f'<section id="{esc(s.id)}"><h2>{esc(s.title)}</h2>{s.body}</section>' for s in sections)
    if not sections:
        body = note("report.json has no section this page can draw yet (no audit step has finished).", "info")
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>guard audit: {esc(model)}</title><style>{STYLE}</style></head><body><main>{head}"
        f'<nav class="toc" aria-label="Contents"><strong>Contents</strong><ol>{toc}</ol></nav>{body}'
        f"<footer>guard report, report.json version {esc(r.get('version'))}. Self-contained: every image is inline; no "
        "scripts, no network.</footer></main></body></html>\n"
    )
    return page, sections, failed


def build_page(out: str | Path, report: Report | None = None) -> str:
    """The HTML of ``out``'s page (``report``: the report in memory, else ``out/report.json``)."""
    src = AuditFolder.from_report(out, report) if report is not None else AuditFolder.open(out)
    return render(src)[0]


def write_page(out: str | Path, report: Report | None = None, path: str | Path | None = None) -> PageResult:
    """Build ``out``'s page and write it to ``path`` (default ``out/report.html``).

    Raises :class:`guard.report.ReportInputError` when ``out/report.json`` is missing, unreadable
    or newer than this guard reads; missing artifacts only leave their part of the page out.
    """
    t0 = time.perf_counter()
    src = AuditFolder.from_report(out, report) if report is not None else AuditFolder.open(out)
    html, sections, failed = render(src)
    target = Path(path) if path is not None else Path(out) / "report.html"
    atomic_write_text(target, html)
    seconds = time.perf_counter() - t0
    log.info("report: wrote %s (%d bytes, %.1f s)", target, len(html.encode()), seconds)
    return PageResult(target, len(html.encode("utf-8")), seconds, [s.id for s in sections], dict(src.missing), failed)
