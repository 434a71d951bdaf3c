"""The results tables in BENCHMARKS.md (and README.md) equal what their committed results files give,
and every table the tool knows is in one of them."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "results_tables.py"
_spec = importlib.util.spec_from_file_location("results_tables", TOOL)
_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tool)
DOCS = _tool.DOCS  # the documents the tool renders into, read from the tool itself


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_every_table_matches_its_results_file():
    r = _run("--check")
    assert r.returncode == 0, r.stderr


def test_every_known_table_is_placed_once():
    names = _run("--list").stdout.split()
    assert len(names) >= 6
    placed = re.findall(r"<!-- results:([\w.-]+) -->", "".join((ROOT / d).read_text() for d in DOCS))
    assert sorted(placed) == sorted(names), (
        "a table of tools/results_tables.py is missing from the documents, or placed twice"
    )


def test_a_figure_typed_by_hand_fails_the_check(tmp_path):
    text = (ROOT / "README.md").read_text() + "\n" + (ROOT / "BENCHMARKS.md").read_text()
    m = re.search(r"<!-- results:([\w.-]+) -->\n.*?<!-- /results:\1 -->", text, re.S)
    assert m, "README.md / BENCHMARKS.md hold no generated results table"
    block = m.group(0)
    tampered = re.sub(r"(\d)(\.\d)", lambda d: str((int(d.group(1)) + 1) % 10) + d.group(2), block, count=1)
    assert tampered != block
    doc = tmp_path / "doc.md"
    doc.write_text("# doc\n\n" + tampered + "\n")
    r = _run("--check", "--docs", str(doc))
    assert r.returncode == 1 and "differ" in r.stderr
    assert _run("--write", "--docs", str(doc)).returncode == 0
    assert block in doc.read_text()
