"""README.md is the short user guide: its two commands, its size, and code that matches the API.

The Python in README.md and the guides under docs/guides is not run here (the harden example
takes minutes); instead every block must compile and every ``guard.…`` name it uses, and every
``from guard… import …``, must exist, so a renamed function breaks this test, not a reader.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: CI (.ci/run) runs the second one; a newcomer copies the first
COMMANDS = (
    "# guard\n\n```bash\n"
    "python3 -m venv .venv && .venv/bin/pip install -e '.[cpu]' && .venv/bin/guard audit --demo --out out\n"
    "python3 -m venv .venv && .venv/bin/pip install -e '.[cpu,test,imagenet,docs]' && .venv/bin/pip install --no-deps torchattacks==3.5.1 && .venv/bin/pytest -n auto\n```\n"
)
DOCS = [README, *sorted((ROOT / "docs" / "guides").glob("*.md")), ROOT / "docs" / "index.md"]


def test_readme_starts_with_the_two_commands_and_stays_short():
    text = README.read_text()
    assert text.startswith(COMMANDS)
    assert len(text.encode()) <= 12_000, f"README.md is {len(text.encode())} bytes; the user guide's limit is 12 KB"


def test_benchmarks_stays_within_its_size():
    size = len((ROOT / "BENCHMARKS.md").read_bytes())
    assert size <= 30_000, f"BENCHMARKS.md is {size} bytes; the limit is 30 KB (history goes to docs/history)"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def _guard_names(tree: ast.AST) -> set[str]:
    """Dotted names rooted at ``guard`` (``guard.training.HardenConfig.online``) and ``from guard.x import y``."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "guard":
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Attribute):
            parts: list[str] = []
            cur: ast.AST = node
            while isinstance(cur, ast.Attribute):
                parts.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id == "guard":
                names.add(".".join(["guard", *reversed(parts)]))
    return names


def _exists(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for p in parts[i:]:
            if not hasattr(obj, p):
                return False
            obj = getattr(obj, p)
        return True
    return False


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_examples_compile_and_name_real_objects(doc):
    blocks = _python_blocks(doc.read_text())
    missing = []
    for block in blocks:
        tree = ast.parse(block)  # a SyntaxError fails the test
        missing += [n for n in sorted(_guard_names(tree)) if not _exists(n)]
    assert not missing, f"{doc.name} uses names guard does not have: {missing}"


def test_the_name_check_catches_a_renamed_function():
    tree = ast.parse(
        "import guard\nfrom guard.attacks import PGD, NoSuchAttack\nguard.wrap(m)\nguard.training.NoConfig()\n"
    )
    names = _guard_names(tree)
    assert {"guard.attacks.PGD", "guard.attacks.NoSuchAttack", "guard.wrap", "guard.training.NoConfig"} <= names
    assert [n for n in sorted(names) if not _exists(n)] == ["guard.attacks.NoSuchAttack", "guard.training.NoConfig"]


def test_readme_links_point_to_files_that_exist():
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text()):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


def test_audit_help_points_to_the_report_json_reference(capsys):
    from guard.cli import main

    with pytest.raises(SystemExit):
        main(["audit", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    m = re.search(r"documented in (\S+\.md)", out)
    assert m, "guard audit --help no longer says where report.json's keys are documented"
    ref = (ROOT / m.group(1)).read_text()
    for key in ('"attacks"', '"detectors"', '"detectors_info"', '"adaptive"', '"defaults"', '"errors"'):
        assert key in ref, f"{m.group(1)} does not document report.json's {key}"
