"""Look at a page the way a person would: headless Chromium, a DOM dump and a screenshot.

Used by the tests (tests/test_report.py) and by ``tools/screenshot_report.py``; nothing in
guard's normal use needs a browser. The flags matter on a closed network: without
``--disable-background-networking`` and its companions Chromium's start-up connections are
refused and it can stall. Every run gets a fresh ``--user-data-dir``, so runs share no state.

The page itself has no script. To read what only a browser knows (has every ``<img>`` decoded,
how tall is the page) :func:`probe` loads a *copy* of it with a small script appended that,
on ``load``, writes those facts into ``data-`` attributes, and reads them from the DOM dump.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BROWSERS", "find_browser", "dump_dom", "screenshot", "probe", "Probe"]

#: executables tried in order (after $GUARD_CHROMIUM): Debian's chromium and its usual other names
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome", "headless_shell")

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--hide-scrollbars",
    "--mute-audio",
)

_PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = document.images;
  for (var i = 0; i < imgs.length; i++) {
    imgs[i].setAttribute('data-natural-width', String(imgs[i].naturalWidth));
    imgs[i].setAttribute('data-complete', String(imgs[i].complete));
  }
  var secs = document.querySelectorAll('section[id]');
  for (var j = 0; j < secs.length; j++) {
    secs[j].setAttribute('data-top', String(Math.round(secs[j].getBoundingClientRect().top + window.scrollY)));
  }
  document.body.setAttribute('data-scroll-height', String(document.documentElement.scrollHeight));
  document.body.setAttribute('data-probed', 'yes');
});
</script>"""


def find_browser() -> str | None:
    """The Chromium executable: ``$GUARD_CHROMIUM`` if set, else the first of :data:`BROWSERS` on PATH."""
    env = os.environ.get("GUARD_CHROMIUM")
    if env:
        return env if Path(env).is_file() or shutil.which(env) else None
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(browser: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="guard-chromium-") as profile:
        cmd = [browser, *FLAGS, f"--user-data-dir={profile}", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{browser} exited with {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def dump_dom(
    page: str | Path,
    *,
    browser: str | None = None,
    width: int = 1200,
    height: int = 2000,
    budget_ms: int = 5000,
    timeout: float = 120,
) -> str:
    """The DOM of ``page`` after loading it in a ``width`` x ``height`` window (``--virtual-time-budget``:
    scripts and image decoding run)."""
    exe = browser or find_browser()
    if exe is None:
        raise RuntimeError(f"no Chromium found (set GUARD_CHROMIUM or install one of {', '.join(BROWSERS)}).")
    url = Path(page).resolve().as_uri()
    return _run(
        exe,
        [f"--window-size={int(width)},{int(height)}", f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
        timeout,
    ).stdout


def screenshot(
    page: str | Path,
    png: str | Path,
    *,
    width: int = 1200,
    height: int = 2000,
    browser: str | None = None,
    budget_ms: int = 5000,
    timeout: float = 180,
) -> Path:
    """A ``width`` x ``height`` screenshot of ``page`` (the top of it when it is taller)."""
    exe = browser or find_browser()
    if exe is None:
        raise RuntimeError(f"no Chromium found (set GUARD_CHROMIUM or install one of {', '.join(BROWSERS)}).")
    out = Path(png).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    _run(
        exe,
        [
            f"--window-size={int(width)},{int(height)}",
            f"--virtual-time-budget={budget_ms}",
            f"--screenshot={out}",
            Path(page).resolve().as_uri(),
        ],
        timeout,
    )
    if not out.is_file():
        raise RuntimeError(f"{exe} wrote no screenshot to {str(out)!r}.")
    return out


@dataclass
class Probe:
    """What the browser saw: the DOM (of the probed copy), each image's natural width, the page
    height and where each ``<section id=...>`` starts (CSS pixels from the top)."""

    dom: str
    natural_widths: list[int]
    scroll_height: int
    section_tops: dict[str, int]


def probe(
    page: str | Path, *, browser: str | None = None, width: int = 1200, budget_ms: int = 5000, timeout: float = 120
) -> Probe:
    """Load a copy of ``page`` with the probe script (in a window ``width`` CSS pixels wide) and read
    the image widths and the page height."""
    html = Path(page).read_text(encoding="utf-8")
    cut = html.rfind("</body>")
    probed = html[:cut] + _PROBE + html[cut:] if cut >= 0 else html + _PROBE
    with tempfile.TemporaryDirectory(prefix="guard-probe-") as tmp:
        copy = Path(tmp) / "probe.html"
        copy.write_text(probed, encoding="utf-8")
        dom = dump_dom(copy, browser=browser, width=width, budget_ms=budget_ms, timeout=timeout)
    if 'data-probed="yes"' not in dom:
        raise RuntimeError("the probe script did not run (no load event within the virtual time budget).")
    widths = [int(m) for m in re.findall(r'<img\b[^>]*\bdata-natural-width="(\d+)"', dom)]
    height = re.search(r'data-scroll-height="(\d+)"', dom)
    tops = {
        m.group(1): int(m.group(2)) for m in re.finditer(r'<section\b[^>]*\bid="([^"]+)"[^>]*\bdata-top="(\d+)"', dom)
    }
    return Probe(dom, widths, int(height.group(1)) if height else 0, tops)
