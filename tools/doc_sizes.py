"""Sizes of README.md and BENCHMARKS.md before and after issue 35, written to benchmarks/results/docs_sizes.json.

"Before" is each file at a base commit (``git show BASE:FILE``; default 32503c9, the commit the
restructuring started from), "after" is the file in the working tree. For each: bytes, lines and
Markdown headings (lines starting with ``#`` outside code fences), plus the sizes of the files the
old content moved to. Written through :func:`guard.core.provenance.write_results` (commit, machine,
command).

    .venv/bin/python tools/doc_sizes.py                 # base 32503c9
    .venv/bin/python tools/doc_sizes.py --base REV --out benchmarks/results/docs_sizes.json
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path
from typing import Any

from guard.core.provenance import write_results

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "BENCHMARKS.md")
#: where the old content went (issue 35): sizes after only
DESTINATIONS = ("docs/history/benchmarks-history.md", "docs/history/readme-before-issue-35.md")


def measure(text: str) -> dict[str, int]:
    """Bytes, lines and headings of a Markdown text (a ``#`` line inside a code fence is not a heading)."""
    headings, fenced = 0, False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#") and line.lstrip("#").startswith(" "):
            headings += 1
    return {"bytes": len(text.encode()), "lines": text.count("\n"), "headings": headings}


def sizes(base: str) -> dict[str, Any]:
    out: dict[str, Any] = {"base": base, "files": {}}
    for doc in DOCS:
        before = subprocess.run(
            ["git", "show", f"{base}:{doc}"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        after = (ROOT / doc).read_text()
        out["files"][doc] = {"before": measure(before), "after": measure(after)}
    out["destinations"] = {d: measure((ROOT / d).read_text()) for d in DESTINATIONS if (ROOT / d).exists()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="32503c9", help="the commit to compare with (default: 32503c9)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "docs_sizes.json"))
    args = p.parse_args(argv)
    rec = write_results(args.out, sizes(args.base))
    for doc, v in rec["files"].items():
        print(
            f"{doc}: {v['before']['bytes']:,} -> {v['after']['bytes']:,} bytes, "
            f"{v['before']['headings']} -> {v['after']['headings']} headings"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
