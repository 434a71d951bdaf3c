"""Every benchmark writes its figures through guard.core.provenance.write_results (issue 35, issue 34 point 4).

Each module of benchmarks.{peers,scale,studies,imagenet} must import, call ``write_results`` (read
from its syntax tree: directly, or through a function of another benchmarks module that does, as
the ImageNet steps call ``feature_fooling.record``), and say in its docstring which file it writes
and the ``python -m`` command that writes it. The few modules that only render a results file
already written (or build a model, or load data) are named below and must say so. Two runs end to
end: a benchmark at tiny sizes into tmp_path, and the ImageNet pipelines' merging writer.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import pkgutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import benchmarks
from guard.core.provenance import read_results

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("peers", "scale", "studies", "imagenet")
#: modules of those packages that are not benchmarks: renderers of a results file, a model, the data
NOT_BENCHMARKS = {
    "benchmarks.studies.audit_tables": "renders a report.json",
    "benchmarks.studies.detection_table": "renders a report.json",
    "benchmarks.imagenet.feature_fooling_tables": "renders imagenet_feature_fooling.json",
    "benchmarks.imagenet.efficientnet": "builds the model",
    "benchmarks.imagenet.sample": "loads the data",
    "benchmarks.imagenet.certified": "computes the ImageNet rows that benchmarks.studies.certified_patches writes",
}


def _modules() -> list[str]:
    names = []
    for kind in KINDS:
        pkg = importlib.import_module(f"benchmarks.{kind}")
        names += [f"benchmarks.{kind}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]
    return sorted(names)


MODULES = _modules()
BENCHMARKS = [m for m in MODULES if m not in NOT_BENCHMARKS]


def _tree(module: str) -> ast.Module:
    return ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())


def _called_names(node: ast.AST) -> set[str]:
    """Names of every function called inside ``node`` (``f(...)`` and ``x.f(...)``)."""
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Call):
            f = n.func
            if isinstance(f, ast.Name):
                out.add(f.id)
            elif isinstance(f, ast.Attribute):
                out.add(f.attr)
    return out


def _writers(module: str) -> set[str]:
    """Functions defined at the top level of ``module`` that call write_results, directly or through each other."""
    calls = {n.name: _called_names(n) for n in _tree(module).body if isinstance(n, ast.FunctionDef)}
    found = {"write_results"}
    while True:
        more = {f for f, called in calls.items() if called & found} - found
        if not more:
            return found - {"write_results"}
        found |= more


def _writes_results(module: str) -> bool:
    tree = _tree(module)
    called = _called_names(tree)
    if "write_results" in called:
        return True
    for n in ast.walk(tree):  # or through a function imported from another benchmarks module that calls it
        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("benchmarks."):
            if any(a.name in called and a.name in _writers(n.module) for a in n.names):
                return True
    return False


def test_the_module_list_is_the_whole_package():
    """The walk finds the known benchmarks, and every named non-benchmark still exists (a stale list would hide one)."""
    assert {
        "benchmarks.peers.pgd_vs_torchattacks",
        "benchmarks.scale.knn_bank",
        "benchmarks.studies.combiner_study",
        "benchmarks.imagenet.patch",
    } <= set(BENCHMARKS)
    assert set(NOT_BENCHMARKS) <= set(MODULES)
    assert len(BENCHMARKS) >= 36


@pytest.mark.parametrize("module", BENCHMARKS)
def test_every_benchmark_imports_and_writes_through_write_results(module):
    mod = importlib.import_module(module)
    assert callable(getattr(mod, "main", None)), f"{module} has no main()"
    assert _writes_results(module), f"{module} never calls guard.core.provenance.write_results"
    doc = mod.__doc__ or ""
    assert "benchmarks/results/" in doc, f"{module}'s docstring does not say which results file it writes"
    assert f"python -m {module}" in doc, f"{module}'s docstring does not give its command (python -m {module})"
    assert "sys.path" not in (ROOT / (module.replace(".", "/") + ".py")).read_text(), f"{module} edits sys.path"


@pytest.mark.parametrize("module", sorted(NOT_BENCHMARKS))
def test_the_non_benchmarks_say_what_they_are(module):
    mod = importlib.import_module(module)
    assert not _writes_results(module)
    if "renders" in NOT_BENCHMARKS[module]:
        assert "Not a benchmark" in (mod.__doc__ or ""), f"{module}'s docstring does not say why it only prints"


def test_the_ast_check_sees_a_missing_write():
    """The check itself: a module that only prints fails it; one that calls write_results passes."""
    printing = ast.parse("def main():\n    print(1)\n")
    writing = ast.parse("from guard.core.provenance import write_results\ndef main():\n    write_results('x', {})\n")
    assert "write_results" not in _called_names(printing)
    assert "write_results" in _called_names(writing)
    assert _writes_results("benchmarks.imagenet.fooling")  # through feature_fooling.record
    assert not _writes_results("benchmarks.studies.audit_tables")


def test_a_benchmark_run_end_to_end_writes_provenance_and_its_figures(tmp_path):
    """cppn_vs_per_pixel's rendering part at a population of 4, as a user runs it (python -m from the root)."""
    out = tmp_path / "cppn.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.peers.cppn_vs_per_pixel",
        "--population",
        "4",
        "--generations",
        "0",
        "--reps",
        "1",
        "--per-pixel",
        "2",
        "--out",
        str(out),
    ]
    done = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    res = read_results(out)  # raises without a provenance record
    assert {"commit", "command", "provenance"} <= set(res)
    assert res["command"].startswith(Path(sys.executable).name + " -m benchmarks.peers.cppn_vs_per_pixel")
    assert "--population 4" in res["command"]
    assert {"cores", "torch", "torch_threads"} <= set(res["provenance"]["machine"])
    assert res["provenance"]["machine"]["torch_threads"] == 1
    assert res["population"] == 4 and res["per_pixel_genomes"] == 2 and res["threads"] == 1 and res["evolution"] is None
    # the per-pixel reference agrees with guard's render, and the ratio is the two timings' quotient
    assert res["max_abs_difference_vs_per_pixel"] < 1e-4
    ratio = res["guard_render_28px_images_per_second"] / res["per_pixel_python_28px_images_per_second"]
    assert res["ratio_guard_render_over_per_pixel"] == pytest.approx(ratio, rel=0.05)


def test_the_imagenet_steps_merge_into_one_results_file(tmp_path):
    """feature_fooling.record (all ImageNet steps write through it): two steps merge, each keeps its command and commit."""
    from benchmarks.imagenet.feature_fooling import record

    path = tmp_path / "ff.json"
    t0, c0 = time.perf_counter(), time.process_time()
    record("first", t0, c0, {"fooling": {"cppn": {"median_conf": 0.5}}}, path)
    record("second", t0, c0, {"fooling": {"direct": {"median_conf": 0.25}}, "split": {"pool": 200}}, path)
    res = read_results(path)
    assert res["fooling"] == {"cppn": {"median_conf": 0.5}, "direct": {"median_conf": 0.25}}
    assert res["split"] == {"pool": 200}
    assert set(res["steps"]) == {"first", "second"}
    assert all({"command", "commit", "wall_s", "peak_rss_mib"} <= set(s) for s in res["steps"].values())
    assert res["command"] == "; ".join(s["command"] for s in res["steps"].values())
    assert json.loads(path.read_text())["provenance"]["commit"] == res["commit"]


def test_benchmarks_is_a_package_run_from_the_root():
    assert Path(benchmarks.__file__).resolve().parent == ROOT / "benchmarks"
