"""HTML pieces of the page: escaping, tables, figures with captions and commands, image strips.

Plain HTML and one inline stylesheet; no JavaScript and no reference to anything outside the
file (images are ``data:`` URIs, links are in-page anchors), so the page opens from disk, in
a mail attachment or on a machine without network. Every function returns an HTML string;
text arguments are escaped here, arguments of type :class:`Raw` are inserted as they are.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "Raw",
    "StripRow",
    "esc",
    "table",
    "figure",
    "img",
    "strip_table",
    "tile",
    "tile_rows",
    "note",
    "command",
    "STYLE",
]


class Raw(str):
    """HTML that is inserted as it is (already escaped or built by this module)."""


def esc(value: object) -> str:
    return value if isinstance(value, Raw) else html.escape(str(value), quote=True)


def table(
    header: Sequence[object] | None,
    rows: Iterable[Sequence[object]],
    *,
    cls: str = "data",
    first_is_header: bool = True,
) -> Raw:
    """A table; cells are escaped unless :class:`Raw` (a cell may be ``(content, style)``).

    ``header=None``: a key-value table (no header row, values left-aligned)."""
    head = "" if header is None else "<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead>"
    out = [f'<table class="{cls}{" kv" if header is None else ""}">{head}<tbody>']
    for row in rows:
        cells = []
        for j, cell in enumerate(row):
            style = ""
            if isinstance(cell, tuple):
                cell, style = cell
            tag = "th" if first_is_header and j == 0 else "td"
            attr = f' style="{esc(style)}"' if style else ""
            cells.append(f"<{tag}{attr}>{esc(cell)}</{tag}>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return Raw("".join(out))


def command(audit: str, keys: Sequence[str] = (), artifacts: Sequence[str] = ()) -> Raw:
    """Where a figure comes from: the audit command, the report.json keys and artifacts it reads."""
    parts = [f"<code>{esc(audit)}</code>"]
    if keys:
        parts.append("report.json " + ", ".join(f"<code>{esc(k)}</code>" for k in keys))
    if artifacts:
        parts.append(", ".join(f"<code>artifacts/{esc(a)}.safetensors</code>" for a in artifacts))
    return Raw('<p class="cmd">from ' + " &middot; ".join(parts) + "</p>")


def figure(body: str, caption: str, cmd: str = "") -> Raw:
    """A figure: its content, a caption that says what to look at, and where it comes from."""
    return Raw(f'<figure class="fig">{body}<figcaption>{esc(caption)}</figcaption>{cmd}</figure>')


def img(uri: str, alt: str, width: int | None = None, height: int | None = None, *, cls: str = "") -> Raw:
    size = (f' width="{int(width)}"' if width else "") + (f' height="{int(height)}"' if height else "")
    klass = f' class="{esc(cls)}"' if cls else ""
    return Raw(f'<img src="{esc(uri)}" alt="{esc(alt)}"{size}{klass}>')


def tile(uri: str, alt: str, caption: str = "", *, width: int, height: int, bad: bool = False) -> Raw:
    """One small image with a text caption under it (``bad``: highlighted, e.g. the model was fooled)."""
    cap = f"<span>{esc(caption)}</span>" if caption else ""
    return Raw(f'<div class="tile{" hit" if bad else ""}">{img(uri, alt, width, height, cls="px")}{cap}</div>')


@dataclass
class StripRow:
    """One row of :func:`strip_table`: a heading and its tiles."""

    heading: str
    tiles: list[Raw]


def strip_table(rows: Sequence[StripRow]) -> Raw:
    """Rows of image tiles under one another, column k of every row about the same image."""
    out = ['<table class="strips"><tbody>']
    for row in rows:
        out.append(f"<tr><th>{esc(row.heading)}</th>" + "".join(f"<td>{t}</td>" for t in row.tiles) + "</tr>")
    out.append("</tbody></table>")
    return Raw('<div class="scroll">' + "".join(out) + "</div>")


def tile_rows(rows: Sequence[StripRow]) -> Raw:
    """Rows of tiles that wrap onto further lines (for many small images, e.g. patches)."""
    return Raw(
        "".join(
            f'<div class="tilerow"><div class="rowhead">{esc(r.heading)}</div><div class="tiles">{"".join(r.tiles)}</div></div>'
            for r in rows
        )
    )


def note(text: str, kind: str = "missing") -> Raw:
    """A boxed remark: ``missing`` (data this section could not show), ``error``, ``info``."""
    return Raw(f'<p class="note {esc(kind)}">{esc(text)}</p>')


STYLE = """
:root { --fg:#1d2430; --muted:#5b6573; --line:#d9dee5; --accent:#2456a6; --bad:#b3261e; --okbg:#e8f3ea; }
* { box-sizing: border-box; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--fg);
       margin: 0; background: #f6f7f9; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 28px 60px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 21px; margin: 36px 0 8px; padding-top: 10px;
     border-top: 2px solid var(--line); } h3 { font-size: 16px; margin: 20px 0 6px; }
p.lead { color: var(--muted); margin-top: 0; }
nav.toc { background: #f0f3f8; border: 1px solid var(--line); padding: 10px 16px; margin: 16px 0; }
nav.toc ol { margin: 4px 0; padding-left: 22px; columns: 2; } nav.toc a { color: var(--accent); text-decoration: none; }
table.data { border-collapse: collapse; margin: 8px 0 12px; font-size: 13.5px; }
table.data th, table.data td { border: 1px solid var(--line); padding: 3px 8px; text-align: right; vertical-align: top; }
table.data thead th { background: #eef1f5; text-align: center; } table.data tbody th { text-align: left; background: #fafbfc; }
table.data.kv td { text-align: left; }
table.data td small { display: block; color: var(--muted); font-size: 11.5px; }
figure.fig { margin: 14px 0 22px; } figure.fig > img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--fg); font-size: 13.5px; margin-top: 4px; max-width: 900px; }
p.cmd { font-size: 12px; color: var(--muted); margin: 3px 0 0; } code { font: 12px ui-monospace, "DejaVu Sans Mono", monospace;
        background: #f1f3f6; padding: 0 3px; border-radius: 3px; }
pre { background: #f1f3f6; padding: 8px 10px; overflow-x: auto; font-size: 12px; }
.scroll { overflow-x: auto; }
table.strips { border-collapse: collapse; } table.strips th { text-align: right; font-size: 12.5px; font-weight: 600;
        padding-right: 8px; color: var(--muted); white-space: nowrap; } table.strips td { padding: 2px; vertical-align: top; }
.tile { display: inline-block; text-align: center; font-size: 11px; line-height: 1.25; color: var(--muted); margin: 1px; }
.tile span { display: block; max-width: 100px; overflow-wrap: anywhere; } .tile.hit span { color: var(--bad); font-weight: 600; }
.tiles { display: flex; flex-wrap: wrap; gap: 2px; } .tilerow { display: flex; gap: 8px; margin: 4px 0; }
.rowhead { flex: 0 0 130px; text-align: right; font-size: 12.5px; font-weight: 600; color: var(--muted); padding-top: 4px; }
img.px { image-rendering: pixelated; border: 1px solid var(--line); background: #000; display: block; margin: 0 auto; }
p.note { border-left: 4px solid #c9a227; background: #fdf8e6; padding: 6px 10px; font-size: 13.5px; }
p.note.error { border-color: var(--bad); background: #fbeceb; } p.note.info { border-color: var(--accent); background: #eef3fb; }
ul.summary li { margin: 3px 0; }
footer { color: var(--muted); font-size: 12px; margin-top: 40px; border-top: 1px solid var(--line); padding-top: 8px; }
"""
