"""Every cross-reference in guard's docstrings and doc comments names an object that exists.

The references are Sphinx roles (``:func:`guard.wrap```, ``:class:`~guard.attacks.PGD```, ...) and
mkdocstrings' ``[text][guard.x.y]``. A reference resolves as Sphinx's Python domain would look it
up: as written (an importable module, then attributes), in the namespace of the module that holds
it, or on the class it is written in (and that class's bases). ``~`` and a leading ``.`` are
dropped, ``text <target>`` uses the target, and other libraries' names (``torch.nn.Module``,
``sklearn.decomposition.PCA``) resolve by importing them. A ``:mod:`` reference must name a module
and a ``:class:`` one a class. Each reference is looked for in the source of every module of the
installed namespace (the packages listed in pyproject.toml), so comments (``#:``) count too.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import pkgutil
import re
import sys
import sysconfig
import textwrap
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
ROLE = re.compile(r":(?:py:)?(?P<role>func|class|meth|mod|data|attr|exc|obj|const):`(?P<body>[^`]+)`")
MKDOCSTRINGS = re.compile(r"\]\[(?P<body>guard(?:\.\w+)+)\]")
#: running guard/__main__.py starts the command line
SKIP_MODULES = {"guard.__main__"}
_MISSING = object()


@dataclass(frozen=True)
class Ref:
    module: str
    line: int
    role: str
    target: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line}: :{self.role}:`{self.target}`"


def namespace_modules() -> list[str]:
    """Every module of the installed ``guard`` namespace (pyproject.toml's packages and their modules)."""
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    names: set[str] = set()
    for pkg in packages:
        names.add(pkg)
        mod = importlib.import_module(pkg)
        for info in pkgutil.iter_modules(mod.__path__, pkg + "."):
            if not info.ispkg:
                names.add(info.name)
    return sorted(names - SKIP_MODULES)


def _target(body: str) -> str:
    m = re.search(r"<([^<>]+)>\s*$", body)
    t = (m.group(1) if m else body).strip()
    t = t.lstrip("~!").lstrip(".")
    return t[:-2] if t.endswith("()") else t


def _instance_attributes(cls: type) -> set[str]:
    """The names a class's own methods assign on ``self``."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return set()
    return {
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute)
        and isinstance(n.ctx, ast.Store)
        and isinstance(n.value, ast.Name)
        and n.value.id == "self"
    }


def _getattr_chain(obj: Any, parts: list[str]) -> Any:
    for p in parts:
        nxt = getattr(obj, p, _MISSING)
        if nxt is _MISSING and isinstance(obj, types.ModuleType):
            try:  # a submodule not imported by its package yet
                nxt = importlib.import_module(f"{obj.__name__}.{p}")
            except ImportError:
                nxt = _MISSING
        if nxt is _MISSING and isinstance(obj, type):
            # a dataclass field, an annotated class attribute without a default, or an instance
            # attribute the class's methods assign (``self.report = ...``)
            if any(p in getattr(k, "__annotations__", {}) or p in _instance_attributes(k) for k in obj.__mro__):
                return True
        if nxt is _MISSING:
            return _MISSING
        obj = nxt
    return obj


def _outside_namespace(top: str) -> bool:
    """True for a top-level name that only imports because the repository's root is on sys.path
    (``attacks``, ``benchmarks``, ``tools``: ``attacks/`` installs as ``guard.attacks``)."""
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    where = [spec.origin] if spec and spec.origin else list(spec.submodule_search_locations or []) if spec else []
    installed = [Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")]  # a venv inside the checkout

    def local(w: str) -> bool:
        path = Path(w).resolve()
        return path.is_relative_to(ROOT) and not any(path.is_relative_to(i) for i in installed)

    return top != "guard" and any(local(w) for w in where if w)


def _absolute(name: str) -> Any:
    parts = name.split(".")
    if _outside_namespace(parts[0]):
        return _MISSING
    for i in range(len(parts), 0, -1):
        try:
            mod = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        except Exception:  # an import that fails for another reason does not resolve either
            return _MISSING
        return _getattr_chain(mod, parts[i:])
    return _MISSING


def resolve(target: str, module: types.ModuleType, classes: list[type]) -> Any:
    """The object ``target`` names from inside ``module`` (and the classes it is written in), or _MISSING."""
    parts = target.split(".")
    for cls in reversed(classes):  # innermost class first, then its bases through getattr
        obj = _getattr_chain(cls, parts)
        if obj is not _MISSING:
            return obj
    obj = _getattr_chain(module, parts)
    if obj is not _MISSING:
        return obj
    return _absolute(target)


def _class_spans(tree: ast.AST) -> list[tuple[int, int, list[str]]]:
    """(first line, last line, dotted class path) of every class in a module's syntax tree."""
    spans: list[tuple[int, int, list[str]]] = []

    def walk(node: ast.AST, path: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                spans.append((child.lineno, child.end_lineno or child.lineno, [*path, child.name]))
                walk(child, [*path, child.name])
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                walk(child, path)  # a class defined in a function is not reachable by name; its methods' context is

    walk(tree, [])
    return spans


def _kind_ok(role: str, obj: Any) -> bool:
    if role == "mod":
        return isinstance(obj, types.ModuleType)
    if role in ("class", "exc"):
        return isinstance(obj, type) or hasattr(obj, "__origin__")  # a class, or a generic alias of one
    return True


def broken_refs(module: types.ModuleType) -> tuple[list[Ref], int]:
    """The references in ``module``'s source that do not resolve, and how many references it holds."""
    source = inspect.getsource(module)
    spans = _class_spans(ast.parse(source))
    broken: list[Ref] = []
    count = 0
    matches = [(m, m.group("role")) for m in ROLE.finditer(source)] + [
        (m, "obj") for m in MKDOCSTRINGS.finditer(source)
    ]
    for m, role in matches:
        count += 1
        line = source.count("\n", 0, m.start()) + 1
        inside = [s for s in spans if s[0] <= line <= s[1]]
        classes: list[type] = []
        if inside:
            path = max(inside, key=lambda s: len(s[2]))[2]
            obj: Any = module
            for name in path:
                obj = getattr(obj, name, None)
                if isinstance(obj, type):
                    classes.append(obj)
        target = _target(m.group("body"))
        obj = resolve(target, module, classes)
        if obj is _MISSING or not _kind_ok(role, obj):
            broken.append(Ref(module.__name__, line, role, target))
    return broken, count


@pytest.mark.slow  # imports every module of the package (about 20 s on two busy cores)
def test_every_docstring_reference_resolves():
    broken: list[Ref] = []
    total = 0
    for name in namespace_modules():
        b, n = broken_refs(importlib.import_module(name))
        broken += b
        total += n
    assert total > 100, f"only {total} references found: the scan is not reading the package"
    assert not broken, f"{len(broken)} docstring references do not resolve:\n" + "\n".join(map(str, broken))


def test_the_namespace_walk_reaches_every_installed_package():
    mods = namespace_modules()
    for expected in (
        "guard.attacks.cppn_refine",
        "guard.detectors.knn",
        "guard.training.harden",
        "guard.export.session",
        "guard.core.data",
        "guard.audit.runner",
        "guard.report.page",
        "guard.cli",
    ):
        assert expected in mods


PLANTED = '''"""A module with references that resolve and some that do not.

Good: :func:`helper`, :class:`Thing`, :meth:`Thing.run`, :func:`~torch.nn.functional.relu`,
:mod:`guard.core.data`, :class:`the guarded model <guard.GuardedModel>`, :func:`guard.wrap()`.
Bad: :func:`attacks.cppn_refine.refine`, :class:`guard.NoSuchThing`, :mod:`guard.wrap`,
[the thing][guard.core.no_such_module].
"""


def helper():
    """Calls nothing."""


class Thing:
    """Has :meth:`run` and :attr:`size` (relative to the class); :meth:`walk` does not exist."""

    size: int = 1

    def run(self):
        """Uses :meth:`helper_of_thing`, which does not exist, and :func:`helper`, which does;
        sets :attr:`Thing.last`."""
        self.last = 1


#: a doc comment naming :data:`MISSING_CONSTANT`
VALUE = 1
'''


def test_a_planted_bad_reference_fails(tmp_path):
    path = tmp_path / "planted_refs.py"
    path.write_text(PLANTED)
    spec = importlib.util.spec_from_file_location("planted_refs", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["planted_refs"] = module  # inspect.getsource finds the file through sys.modules
    try:
        spec.loader.exec_module(module)
        broken, count = broken_refs(module)
    finally:
        del sys.modules["planted_refs"]
    assert count == 18
    assert sorted(r.target for r in broken) == sorted(
        [
            "attacks.cppn_refine.refine",
            "guard.NoSuchThing",
            "guard.wrap",
            "guard.core.no_such_module",
            "walk",
            "helper_of_thing",
            "MISSING_CONSTANT",
        ]
    )
