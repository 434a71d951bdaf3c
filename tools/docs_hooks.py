"""mkdocs hook: lay out the installed namespace of guard for mkdocstrings' static analysis.

``pyproject.toml`` installs the top-level folders ``attacks/``, ``detectors/``, ``training/`` and
``export/`` as ``guard.attacks`` ... (setuptools ``package-dir``). Griffe, which mkdocstrings uses
to read the code without importing it, maps only top-level packages of an editable install, so it
cannot find ``guard.attacks`` in the source tree. Before the build this hook writes
``build/docs-src/guard``: a copy of the Python files of ``guard/`` with the four folders under
their installed names, and ``mkdocs.yml`` points mkdocstrings' ``paths`` there (a copy, not links:
griffe resolves a linked ``__init__.py`` back to ``guard/`` and then lists that folder).
Static analysis, not import: building the site runs none of guard's code (``guard/__main__.py``
would start the CLI) and needs neither torch nor a GPU.

In that copy the docstrings' Sphinx roles (``:func:`~guard.wrap```) become mkdocs-autorefs
cross-references around inline code (`` `wrap` `` linked to ``guard.wrap``'s entry in the API
pages), optional so that a target no page renders stays plain code; ``tests/test_docstring_refs.py``
checks that each of them names a real object.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from mkdocs.plugins import event_priority

ROOT = Path(__file__).resolve().parents[1]
#: installed subpackage name -> folder in the repository (as pyproject.toml's package-dir)
PACKAGE_DIRS = {"attacks": "attacks", "detectors": "detectors", "training": "training", "export": "export"}
TREE = ROOT / "build" / "docs-src"
ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj|const):`(?P<body>[^`]+)`")


def _as_code(m: re.Match[str], module: str = "") -> str:
    """A Sphinx role as an optional cross-reference of mkdocs-autorefs around inline code.

    ``:func:`~a.b``` -> ``b`` linked to ``a.b``, ``:class:`text <a.b>``` -> ``text`` linked to
    ``a.b``, ``:mod:`a.b``` -> ``a.b`` linked to itself. ``optional``: a target the API pages do not
    render (a private helper, an object of another library) stays plain code instead of failing the
    strict build. A name without its package is looked up in ``module``, the docstring's own.
    """
    body = m["body"].strip()
    labelled = re.match(r"(.*?)\s*<([^<>]+)>$", body)
    if labelled:
        label, target = labelled.group(1), labelled.group(2).strip()
    else:
        target = body.lstrip("~").lstrip(".!")
        label = target.split(".")[-1] if body.startswith("~") else target
    target = target.lstrip("~").lstrip(".!").removesuffix("()")
    if module and not target.startswith(("guard.", "torch", "numpy", "np.", "scipy", "sklearn", "faiss", "onnx")):
        target = f"{module}.{target}"  # a name given relative to the docstring's module
    return f"<autoref identifier={target} optional><code>{label}</code></autoref>"


def build_tree(root: Path = ROOT, tree: Path = TREE) -> Path:
    """Copy the Python files of the installed layout to ``tree/guard`` and return ``tree``."""
    pkg = tree / "guard"
    if pkg.exists():
        shutil.rmtree(pkg)
    only_py = shutil.ignore_patterns("__pycache__", "_data", "*.pyc")
    shutil.copytree(root / "guard", pkg, ignore=only_py)
    for name, folder in PACKAGE_DIRS.items():
        shutil.copytree(root / folder, pkg / name, ignore=only_py)
    for py in pkg.rglob("*.py"):
        text = py.read_text()
        module = ".".join(py.relative_to(tree).with_suffix("").parts).removesuffix(".__init__")
        new = ROLE.sub(lambda m, module=module: _as_code(m, module), text)
        if new != text:
            py.write_text(new)
    return tree


@event_priority(100)  # before mkdocstrings' own on_config, which resolves `paths` (a missing folder is dropped)
def on_config(config: Any, **kwargs: Any) -> Any:
    build_tree()
    return config
