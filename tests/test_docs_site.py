"""The documentation site builds with warnings as errors, and its key pages hold what they should.

``mkdocs build --strict`` fails on a broken link or anchor, a page left out of the nav, or an
object mkdocstrings cannot collect (a renamed class the API reference still names).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_site_builds_strict_with_guides_and_api(tmp_path):
    for mod in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(mod, reason=f"{mod} is not installed (pip install -e '.[docs]')")
    site = tmp_path / "site"
    # as on a fresh clone: the hook must lay out build/docs-src before mkdocstrings resolves its paths
    shutil.rmtree(ROOT / "build" / "docs-src", ignore_errors=True)
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    def page(rel: str) -> str:
        f = site / rel / "index.html" if rel else site / "index.html"
        assert f.is_file(), f"{f} was not built"
        return f.read_text()

    assert "defends PyTorch image classifiers" in page("")
    for guide in ("wrap-your-model", "read-report", "harden", "deploy-onnx", "limits", "patches"):
        page(f"guides/{guide}")
    assert "Tramèr" in page("guides/limits")
    assert '"detectors_info"' in page("reference/report-json")
    # the API reference was generated from the docstrings, not left empty: one object per package
    for rel, anchor in (
        ("api/guard", "guard.wrap"),
        ("api/attacks", "guard.attacks.PatchGAN"),
        ("api/detectors", "guard.detectors.KNNRank"),
        ("api/training", "guard.training.HardenConfig"),
        ("api/export", "guard.export.to_onnx.to_onnx"),
        ("api/export", "guard.export.load_session"),
        ("api/core", "guard.core.validation.check_images"),
        ("api/audit-report", "guard.report.write_page"),
    ):
        assert f'id="{anchor}"' in page(rel), f"{anchor} is not documented on {rel}"
    # the docstrings' Sphinx roles are links to the objects' entries, never left as role markup
    api = page("api/guard")
    assert ":class:`" not in api and ":func:`" not in api and "<autoref" not in api
    assert api.count("autorefs-internal") >= 20, "the roles in the facade's docstrings did not become links"
    # BENCHMARKS.md is on the site as it is, and the history beside it
    assert "benchmarks/results/" in page("reference/benchmarks")
    assert page("history/benchmarks-history")


def test_the_build_is_strict():
    """Warnings are errors in the config itself, not only in this test's command line."""
    text = (ROOT / "mkdocs.yml").read_text()
    assert "\nstrict: true\n" in text
    assert "not_found: warn" in text and "anchors: warn" in text
