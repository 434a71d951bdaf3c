"""A screenshot of an audit's report.html, small enough to commit under docs/.

    .venv/bin/python tools/screenshot_report.py OUT docs/report-mnist.png --sections model,summary,gradient
    .venv/bin/python tools/screenshot_report.py OUT docs/report-mnist-detectors.png --sections detectors
    .venv/bin/python tools/screenshot_report.py OUT docs/report-cifar10.png     # after guard audit --demo cifar10 --out OUT

Rebuilds ``OUT/report.html`` from ``OUT/report.json`` and the artifacts (what ``guard report OUT``
does), loads it in headless Chromium (:mod:`guard.report.browser`; Debian: ``apt-get install -y
chromium``, or set ``GUARD_CHROMIUM``), measures the page, takes one screenshot of the whole page
``--width`` CSS pixels wide, keeps the ``--sections`` asked for (from the top of the first to the
end of the last; the page header is kept when the first is the page's first section; default:
the whole page), scales it to ``--out-width`` pixels and stores it as a palette PNG
(``--colors``): a long page stays at a few hundred KB. Prints the page size, the time to build the
page and the time Chromium took; exits 1 if the browser could not decode an image of the page.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from guard.report import write_page
from guard.report.browser import find_browser, probe, screenshot

MAX_HEIGHT = 30000  # taller pages are cut here (and say so)


def _crop_rows(tops: dict[str, int], wanted: list[str], height: int) -> tuple[int, int]:
    """(top, bottom) in CSS pixels of the sections ``wanted`` (the header too when the first comes first)."""
    order = sorted(tops, key=tops.get)
    unknown = [s for s in wanted if s not in tops]
    if unknown:
        raise SystemExit(
            f"screenshot_report: --sections must name sections of the page ({', '.join(order)}); got {', '.join(unknown)}"
        )
    first, last = min(wanted, key=order.index), max(wanted, key=order.index)
    top = 0 if first == order[0] else tops[first]
    after = order.index(last) + 1
    bottom = tops[order[after]] if after < len(order) else height
    return top, bottom


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the audit folder (guard audit --out OUT)")
    p.add_argument("png", help="the screenshot to write")
    p.add_argument(
        "--sections",
        default="",
        help="comma-separated section ids to keep (model, summary, gradient, patches, "
        "features, fooling, detectors, adaptive, harden, export); default: the whole page",
    )
    p.add_argument("--width", type=int, default=1100, help="browser window width in CSS pixels (default 1100)")
    p.add_argument("--out-width", type=int, default=760, help="width of the stored PNG in pixels (default 760)")
    p.add_argument("--colors", type=int, default=64, help="palette size of the stored PNG (default 64)")
    p.add_argument("--no-rebuild", action="store_true", help="use OUT/report.html as it is")
    args = p.parse_args(argv)

    browser = find_browser()
    if browser is None:
        print(
            "screenshot_report: no Chromium found: apt-get install -y chromium (or set GUARD_CHROMIUM)", file=sys.stderr
        )
        return 2
    page_path = Path(args.out) / "report.html"
    if not args.no_rebuild:
        page = write_page(args.out)
        print(f"page: {page.path} {page.bytes:,} bytes, built in {page.seconds:.2f} s")
        for name, why in page.missing.items():
            print(f"  artifact {name}: {why}")
    t0 = time.perf_counter()
    seen = probe(page_path, browser=browser, width=args.width)
    t_probe = time.perf_counter() - t0
    bad = [w for w in seen.natural_widths if w <= 0]
    height = min(seen.scroll_height or 2000, MAX_HEIGHT)
    with tempfile.TemporaryDirectory() as tmp:
        t1 = time.perf_counter()
        raw = screenshot(page_path, Path(tmp) / "raw.png", width=args.width, height=height, browser=browser)
        t_shot = time.perf_counter() - t1
        im = Image.open(raw).convert("RGB")
        im.load()
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    if wanted:
        top, bottom = _crop_rows(seen.section_tops, wanted, height)
        scale_px = im.height / height  # device pixels per CSS pixel
        im = im.crop((0, round(top * scale_px), im.width, min(im.height, round(bottom * scale_px))))
    scale = args.out_width / im.width
    im = im.resize((args.out_width, max(1, round(im.height * scale))), Image.Resampling.LANCZOS)
    im = im.quantize(colors=args.colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    target = Path(args.png)
    target.parent.mkdir(parents=True, exist_ok=True)
    im.save(target, optimize=True)
    print(
        f"chromium: probe {t_probe:.1f} s, screenshot {t_shot:.1f} s; page height {seen.scroll_height} px, "
        f"{len(seen.natural_widths)} images, {len(bad)} not decoded"
    )
    if seen.scroll_height > MAX_HEIGHT:
        print(f"  the page is taller than {MAX_HEIGHT} px: the screenshot shows its top part")
    print(f"wrote {target} ({target.stat().st_size:,} bytes, {im.width}x{im.height})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
