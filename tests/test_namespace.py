"""One installed namespace (guard.*), one direction of imports, no import cycles.

The wheel is built once per session (``pip wheel --no-deps --no-build-isolation``) and
unpacked: what a user's ``pip install`` puts on disk. The import-linter contracts in
pyproject.toml run on that tree (grimp reads the installed layout, where guard.attacks lives
under guard/).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = [
    "guard",
    "guard.core",
    "guard.attacks",
    "guard.detectors",
    "guard.training",
    "guard.export",
    "guard.audit",
    "guard.report",
    "guard.cli",
]


@pytest.fixture(scope="session")
def wheel_tree(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheels = list(out.glob("guard-*.whl"))
    assert len(wheels) == 1, wheels
    tree = out / "tree"
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extractall(tree)
    return tree


def _run(code: str, cwd: Path, env_path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if env_path is not None:
        env["PYTHONPATH"] = env_path
    else:
        env.pop("PYTHONPATH", None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_wheel_installs_only_the_guard_namespace(wheel_tree):
    top = {p.name for p in wheel_tree.iterdir() if not p.name.endswith(".dist-info")}
    assert top == {"guard"}
    for sub in ("attacks", "detectors", "training", "export", "core", "audit", "report", "report/sections"):
        assert (wheel_tree / "guard" / sub / "__init__.py").is_file(), sub
    assert (wheel_tree / "guard" / "_data" / "mnist" / "LICENSE.txt").is_file()


@pytest.mark.parametrize("module", SUBPACKAGES)
def test_each_subpackage_imports_on_its_own_in_a_fresh_interpreter(wheel_tree, tmp_path, module):
    proc = _run(
        f"""
        import importlib, pathlib
        m = importlib.import_module({module!r})
        assert pathlib.Path(m.__file__).resolve().is_relative_to(pathlib.Path({str(wheel_tree)!r}).resolve()), m.__file__
    """,
        tmp_path,
        str(wheel_tree),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_import_linter_contracts_hold(wheel_tree, tmp_path):
    """The layers contract (one direction), the acyclic-siblings contract (no cycles) and the
    report contract (guard.report imports only guard.core of guard), on the wheel."""
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(wheel_tree)}
    proc = subprocess.run(
        [str(lint), "--no-cache", "--config", str(ROOT / "pyproject.toml")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "3 kept, 0 broken" in proc.stdout


def test_import_linter_catches_a_cycle(wheel_tree, tmp_path):
    """The contract is not vacuous: a core module importing the facade breaks it."""
    import shutil

    tree = tmp_path / "tree"
    shutil.copytree(wheel_tree, tree)
    bad = tree / "guard" / "core" / "data.py"
    bad.write_text(bad.read_text() + "\nfrom guard.detectors import KNNRank  # noqa\n")
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run(
        [str(lint), "--no-cache", "--config", str(ROOT / "pyproject.toml")],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "guard.core is not allowed to import guard.detectors" in proc.stdout


@pytest.mark.parametrize("target", ["guard.attacks", "guard.evaluation"])
def test_import_linter_keeps_the_report_off_the_facade(wheel_tree, tmp_path, target):
    """The report contract is not vacuous: guard.report importing an attack or the facade breaks it
    (the layers contract alone would allow guard.evaluation, which sits below guard.report)."""
    import shutil

    tree = tmp_path / "tree"
    shutil.copytree(wheel_tree, tree)
    bad = tree / "guard" / "report" / "text.py"
    bad.write_text(bad.read_text() + f"\nimport {target}  # noqa\n")
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run(
        [str(lint), "--no-cache", "--config", str(ROOT / "pyproject.toml")],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and f"guard.report is not allowed to import {target}" in proc.stdout, proc.stdout[
        -3000:
    ]
    assert f"guard.report.text -> {target}" in proc.stdout


def test_users_own_training_export_attacks_detectors_do_not_shadow_guard(tmp_path, tiny_model):
    """A script directory with training.py, export/, attacks.py and detectors.py: guard still works."""
    from guard.core.cache import save_tensors

    (tmp_path / "training.py").write_text("raise RuntimeError('the user training.py was imported')\n")
    (tmp_path / "attacks.py").write_text("raise RuntimeError('the user attacks.py was imported')\n")
    (tmp_path / "detectors.py").write_text("raise RuntimeError('the user detectors.py was imported')\n")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "__init__.py").write_text("raise RuntimeError('the user export/ was imported')\n")
    save_tensors(tmp_path / "tiny.safetensors", tiny_model.state_dict())
    proc = _run(
        """
        import sys
        sys.path.insert(0, "")  # as when a script in this directory runs
        import torch
        import guard
        from guard.core.cache import load_tensors
        from guard.core.models import DemoNet
        model = DemoNet(width=8, hidden=32)
        model.load_state_dict(load_tensors("tiny.safetensors")[0])
        train, test = guard.demo_data()
        res = guard.harden(model, guard.Split(train.x[:200], train.y[:200]), test=guard.Split(test.x[:100], test.y[:100]),
                           config=guard.training.HardenConfig.quick(), progress=False)
        assert res.model.num_classes == 10
        rep = guard.to_onnx(model, "m.onnx", test.x[:2])
        assert rep.output_names[:2] == ["logits", "pred"]
        adv = guard.attacks.PGD(eps=0.1, steps=2)(model, test.x[:4])
        det = guard.detectors.KNNRank("fc1", k=3).fit(model, train.x[:50])
        assert det.score(model, adv.x_adv).shape == (4,)
        assert "training" not in sys.modules and "export" not in sys.modules
        print("ok")
    """,
        tmp_path,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
