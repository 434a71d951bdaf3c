"""Module and function sizes of the package, at a commit and at the working tree (issue 35's "show").

For every Python file of the installed namespace (guard/, attacks/, detectors/, training/,
export/): its lines, and per function (methods included) its length in lines and its number of
parameters (``self``/``cls`` not counted). Counts what the issue sets limits on: functions longer
than 80 lines, functions with more than 12 parameters, lines wider than 120 columns, and the
largest of each. Writes ``benchmarks/results/code_sizes.json`` through
:func:`guard.core.provenance.write_results`:

    .venv/bin/python tools/code_sizes.py --before 32503c9
"""

from __future__ import annotations

import argparse
import ast
import io
import subprocess
import tarfile
from pathlib import Path

from guard.core.provenance import write_results

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("guard", "attacks", "detectors", "training", "export")
LONG, MANY, WIDE = 80, 12, 120


def _files_at(commit: str | None) -> dict[str, str]:
    """{path: source} of the package's .py files at ``commit`` (None: the working tree)."""
    if commit is None:
        return {str(p.relative_to(ROOT)): p.read_text() for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}
    blob = subprocess.run(["git", "archive", commit, *PACKAGES], cwd=ROOT, capture_output=True, check=True).stdout
    out = {}
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        for m in tar.getmembers():
            if m.isfile() and m.name.endswith(".py"):
                out[m.name] = tar.extractfile(m).read().decode()
    return out


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
    return len([n for n in names if n not in ("self", "cls")])


def measure(files: dict[str, str]) -> dict:
    funcs, wide = [], 0
    for path, src in files.items():
        wide += sum(1 for line in src.splitlines() if len(line) > WIDE)
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funcs.append(
                    {
                        "where": f"{path}:{node.lineno} {node.name}",
                        "lines": node.end_lineno - node.lineno + 1,
                        "params": _params(node),
                    }
                )
    longest = sorted(funcs, key=lambda f: -f["lines"])[:10]
    most = sorted(funcs, key=lambda f: -f["params"])[:10]
    sizes = sorted(len(s.splitlines()) for s in files.values())
    return {
        "files": len(files),
        "lines": sum(sizes),
        "largest_file_lines": sizes[-1],
        "functions": len(funcs),
        f"functions_over_{LONG}_lines": sum(f["lines"] > LONG for f in funcs),
        f"functions_over_{MANY}_params": sum(f["params"] > MANY for f in funcs),
        f"lines_over_{WIDE}_columns": wide,
        "longest_functions": longest,
        "most_parameters": most,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="32503c9", help="the commit to compare with")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "code_sizes.json"))
    args = ap.parse_args()
    figures = {
        "before": {"commit": args.before, **measure(_files_at(args.before))},
        "after": measure(_files_at(None)),
        "limits": {"function_lines": LONG, "parameters": MANY, "columns": WIDE},
    }
    write_results(args.out, figures)
    for k in (
        "files",
        "lines",
        "functions",
        f"functions_over_{LONG}_lines",
        f"functions_over_{MANY}_params",
        f"lines_over_{WIDE}_columns",
    ):
        print(f"{k}: {figures['before'][k]} -> {figures['after'][k]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
