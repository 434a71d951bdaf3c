"""report.html: built from report.json and the artifacts, self-contained, and looked at in a real browser.

The fast tests build the page of a hand-made audit folder (every section, artifacts with known
content) and check the HTML itself: sections present only when their key is, captions from
the artifacts, no reference outside the file, every image a PNG that decodes, bad input refused
with a clear message. The slow test runs a small quick audit and opens its page in headless
Chromium (Debian's ``chromium``; skipped, with the reason, where none is installed; .ci/run
installs it): a screenshot that is not blank, the section headings in the DOM, every <img>
decoded by the browser.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from guard.audit import REPORT_VERSION, AuditOptions, Step, run_audit, step
from guard.cli import main
from guard.core.cache import save_tensors
from guard.report import ReportInputError, write_page
from guard.report.browser import find_browser, probe, screenshot
from guard.report.roc import roc_curve

DETECTORS = ("knn", "ppca", "combined")
ATTACKS = (
    "fgsm",
    "pgd",
    "patch_gan",
    "universal_patch",
    "random_patch",
    "feature_adversary",
    "fooling_gradient",
    "fooling_direct",
    "fooling_cppn",
)
TITLES = {
    "model": "Model and data",
    "summary": "Summary",
    "gradient": "Gradient attacks (FGSM, PGD)",
    "patches": "Patches",
    "features": "Feature adversaries",
    "fooling": "Fooling images",
    "detectors": "Detectors",
    "adaptive": "Adaptive evaluation",
    "harden": "Hardening",
    "export": "Export",
}


# ---------------------------------------------------------------- a hand-made audit folder


def _attack_entry(rate: float, **extra) -> dict:
    return {"success_rate": rate, "n": 32, "seconds": 1.0, "params": {"eps": 0.3, "steps": 10}, **extra}


def fake_audit(
    out: Path, *, shape=(1, 28, 28), source="embedded MNIST test split", artifacts=True, sections=None
) -> dict:
    """A complete report (every section) and its artifacts, with images whose content is known."""
    gen = torch.Generator().manual_seed(0)
    c, h, w = shape
    n = 32
    curve = [{"area": a, "mean": m, "std": 0.01} for a, m in ((0.01, 0.05), (0.05, 0.2), (0.1, 0.4))]
    cc = {
        "positions": 9,
        "stride": 9,
        "pairs": 288,
        "fooling_rate": 0.2,
        "patched_takes_canvas_class": 0.1,
        "fooled_takes_canvas_class": 0.3,
        "fooling_rate_per_position": [0.1 * i for i in range(9)],
    }
    attacks = {
        "fgsm": _attack_entry(0.5, linf_max=0.3, strength="full"),
        "pgd": _attack_entry(0.75, linf_max=0.3, strength="full"),
        "patch_gan": _attack_entry(
            0.25,
            area=0.1,
            side=9,
            curve=curve,
            class_comparison=cc,
            diversity={"n_pairs": 10, "ssim_median": 0.1, "psnr_median": 7.0, "identical_pairs": 0},
            summary={"patch_gan_above_both_at_every_area": True, "patch_gan_best_fooling_at_area_le_10pct": 0.25},
        ),
        "universal_patch": _attack_entry(0.3, area=0.1, side=9, curve=curve, class_comparison=cc),
        "random_patch": _attack_entry(0.125, area=0.1, side=9, curve=curve),
        "feature_adversary": _attack_entry(
            0.875,
            layer="fc1",
            delta=0.3,
            guide_label_agreement=0.875,
            distance_ratio={"median": 0.42, "p10": 0.2, "p90": 0.6},
            curves={
                "n": 8,
                "by_layer": {
                    "fc1": {
                        "lbfgs": {
                            "0.1": {"guide_label_agreement": 0.2, "distance_ratio": {"median": 0.8}},
                            "0.3": {"guide_label_agreement": 0.9, "distance_ratio": {"median": 0.4}},
                        }
                    }
                },
            },
        ),
        **{
            name: _attack_entry(
                0.9, classes_fooled=list(range(9)), median_confidence=0.99999, min_confidence=0.9, threshold=0.9999
            )
            for name in ("fooling_gradient", "fooling_direct", "fooling_cppn")
        },
    }
    ok = {a: (torch.arange(n) % 4 != 0) for a in ATTACKS}  # 3 of every 4 images succeed
    scores: dict[str, torch.Tensor] = {f"clean/{d}": torch.rand(200, generator=gen) for d in DETECTORS}
    dets: dict = {d: {} for d in DETECTORS}
    for a in ATTACKS:
        for d in DETECTORS:
            pos = torch.rand(int(ok[a].sum()), generator=gen) + 0.3
            scores[f"{a}/{d}"] = pos
            fpr, tpr, auc = roc_curve(pos.numpy(), scores[f"clean/{d}"].numpy())
            dets[d][a] = {
                "operating_point": {
                    "threshold": 0.9,
                    "tpr": {"rate": 0.625, "k": 15, "n": 24, "ci95": [0.406, 0.812]},
                    "fpr": {"rate": 0.055, "k": 11, "n": 200, "ci95": [0.028, 0.096]},
                },
                "auroc": auc,
                "tpr_at_1fpr": 0.1,
                "tpr_at_5fpr": 0.3,
                "n_pos": pos.numel(),
                "n_neg": 200,
                "tpr_at_threshold": 0.6,
            }
    report = {
        "version": REPORT_VERSION,
        "model": {
            "name": "pkg.mod:build",
            "num_classes": 10,
            "clean_accuracy": 0.98,
            "train_accuracy": 0.99,
            "data": {"source": source, "train": 512, "test": 256},
            "parameters": 1234,
        },
        "options": {"quick": True, "harden": True, "export": True, "seed": 0},
        "defaults": {"kind": "near-binary", "eps": 0.3},
        "timings": {"model": 1.0, "attacks_gradient": 2.0},
        "attacks": attacks,
        "detectors": dets,
        "detectors_info": {
            "detectors": {
                "knn": {"class": "KNNRank", "layers": {"fc1": 64}, "threshold": 0.9},
                "ppca": {"class": "PPCAManifold", "layers": {"fc1": 64}, "threshold": 0.95},
            },
            "combined": {"threshold": 0.97},
            "calibration": {"target_fpr": 0.05, "n_calibration": 200, "n_evaluation": 200},
            "clean_flag_rate": {"knn": 0.05, "ppca": 0.06, "combined": 0.055},
        },
        "adaptive": {
            "eps": 0.3,
            "evasion": 0.094,
            "n": 64,
            "steps": 20,
            "fpr": 0.05,
            "rule": "...",
            "per_eps": [
                {
                    "eps": e,
                    "evasion": v,
                    "oblivious_evasion": 0.0,
                    "flagged": 0.9,
                    "misclassified": 1.0,
                    "n": 64,
                    "seconds": 3.0,
                }
                for e, v in ((0.15, 0.047), (0.3, 0.094), (0.6, 0.94))
            ],
        },
        "harden": {
            "num_classes": 10,
            "baseline": {"round": 0, "clean_accuracy": 0.98, "fooling_classes_ge99_count": 10},
            "rounds": [
                {"round": 1, "clean_accuracy": 0.975, "fooling_classes_ge99_count": 4},
                {"round": 2, "clean_accuracy": 0.974, "fooling_classes_ge99_count": 1},
            ],
            "goals": {"clean_accuracy_drop_le_0.5_points": True},
            "clean_accuracy_drop_points": 0.6,
        },
        "export": {
            "path": "/x/model.onnx",
            "outputs": ["logits", "flag"],
            "opset": 20,
            "file_bytes": 2_000_000,
            "parity": {"logits": {"max_abs": 1e-6, "max_rel": 1e-5, "passed": True}},
            "latency_ms": {"batch_1": {"onnxruntime_cpu_ms": 1.0, "pytorch_eager_ms": 2.0, "ratio": 0.5}, "threads": 1},
        },
        "_completed_steps": ["model"],
    }
    if sections is not None:
        report = {k: v for k, v in report.items() if k in sections or k in ("version", "model", "_completed_steps")}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report))
    if artifacts:
        x = torch.rand(16, c, h, w, generator=gen)
        y = torch.arange(16) % 10
        save_tensors(out / "artifacts" / "examples.safetensors", {"x": x, "y": y, "pred": y.clone()})
        for a in ("fgsm", "pgd", "patch_gan", "universal_patch", "random_patch"):
            t = {
                "x_adv": torch.rand(n, c, h, w, generator=gen),
                "success": ok[a],
                "y": torch.arange(n) % 10,
                "test_index": torch.arange(n),
                "pred": (torch.arange(n) + 3) % 10,
            }
            if a in ("patch_gan", "random_patch"):
                t["patches"] = torch.rand(n, c, 9, 9, generator=gen)
            if a == "universal_patch":
                t["patch"] = torch.rand(c, 9, 9, generator=gen)
            save_tensors(out / "artifacts" / f"attack_{a}.safetensors", t)
        m = 8
        save_tensors(
            out / "artifacts" / "attack_feature_adversary.safetensors",
            {
                "x_adv": torch.rand(m, c, h, w, generator=gen),
                "success": ok["pgd"][:m],
                "y": torch.arange(m),
                "source": torch.rand(m, c, h, w, generator=gen),
                "guide": torch.rand(m, c, h, w, generator=gen),
                "guide_label": (torch.arange(m) + 1) % 10,
                "adv_label": (torch.arange(m) + 1) % 10,
                "distance_ratio": torch.full((m,), 0.25),
                "test_index": torch.arange(m) + 100,
            },
        )
        for a in ("fooling_gradient", "fooling_direct", "fooling_cppn"):
            save_tensors(
                out / "artifacts" / f"attack_{a}.safetensors",
                {
                    "x_adv": torch.rand(20, c, h, w, generator=gen),
                    "success": torch.ones(20, dtype=torch.bool),
                    "label": torch.arange(20) % 10,
                    "confidence": torch.linspace(0.9, 0.999999, 20),
                },
            )
        save_tensors(out / "artifacts" / "detector_scores.safetensors", scores)
    return report


def _h2(html: str) -> list[str]:
    return [re.sub(r"<[^>]+>", "", h) for h in re.findall(r"<h2>(.*?)</h2>", html)]


def _img_srcs(html: str) -> list[str]:
    return re.findall(r'<img\b[^>]*\bsrc="([^"]*)"', html)


def _references(html: str) -> list[str]:
    """Every src / href / CSS url() the page holds."""
    return re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', html) + re.findall(r"url\(([^)]*)\)", html)


def _check_self_contained(html: str) -> None:
    refs = _references(html)
    assert refs, "no references at all: the regex is wrong"
    bad = [r[:60] for r in refs if not (r.startswith("data:image/png;base64,") or re.fullmatch(r"#[A-Za-z0-9_-]+", r))]
    assert not bad, bad
    anchors = set(re.findall(r'\bid="([^"]+)"', html))
    assert all(r[1:] in anchors for r in refs if r.startswith("#")), "a table-of-contents link without its section"
    lowered = html.lower()
    assert "<script" not in lowered and "<link" not in lowered and "@import" not in lowered and "<iframe" not in lowered


def _decode(uri: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    im.load()
    return im


# ---------------------------------------------------------------- fast: the page from a hand-made folder


def test_every_section_from_a_complete_folder(tmp_path):
    fake_audit(tmp_path)
    page = write_page(tmp_path)
    html = page.path.read_text()
    assert (
        page.path == tmp_path / "report.html"
        and page.bytes == len(html.encode())
        and not page.missing
        and not page.failed
    )
    assert _h2(html) == list(TITLES.values())
    assert [s for s in page.sections] == list(TITLES)
    _check_self_contained(html)
    toc = re.findall(r'<nav class="toc".*?</nav>', html, re.S)[0]
    assert re.findall(r'href="#([^"]+)"', toc) == list(TITLES)
    srcs = _img_srcs(html)
    # 16 examples; 2 x (3 x 8) gradient; patches: curve, 20 + 1 + 8 patches, 4 x 8 patched rows, heatmap; 3 x 8 feature + curves;
    # 3 x 10 fooling; ROC, 2 histogram figures; harden plot
    assert len(srcs) == 16 + 48 + (1 + 29 + 32 + 1) + (24 + 1) + 30 + 3 + 1  # = 186
    for uri in srcs:
        assert _decode(uri).size[0] > 0
    # captions come from the artifacts: model labels before -> after, fooling confidences, the distance ratio
    assert "1 → 4" in html and "0 (held)" in html and "ratio 0.25" in html and "seen as 1" in html and "99.999%" in html
    # numbers in words
    assert "98.0% of the 256 held-out images" in html and "PGD-40 75.0%" in html
    assert (
        "pkg.mod:build" in html and "guard audit --model pkg.mod:build --data DATA --quick --harden --out OUT" in html
    )
    # the adaptive section: one row per budget, adaptive evasion beside plain PGD's, and the headline in the summary
    assert "4.7%" in html and "94.0%" in html and "evasion (plain PGD)" in html
    assert "An attacker who knows the detectors (budget 0.3) got 9.4% of 64 images misclassified and unflagged" in html


def test_sections_only_for_the_steps_that_ran(tmp_path):
    fake_audit(tmp_path, sections={"attacks"})
    html = write_page(tmp_path).path.read_text()
    assert _h2(html) == [
        "Model and data",
        "Summary",
        "Gradient attacks (FGSM, PGD)",
        "Patches",
        "Feature adversaries",
        "Fooling images",
    ]
    assert "Detectors" not in _h2(html) and "Export" not in _h2(html)


def test_cifar10_names_and_large_user_images_are_downscaled(tmp_path):
    fake_audit(tmp_path / "c", shape=(3, 32, 32), source="embedded CIFAR-10 test split, JPEG copy")
    html = write_page(tmp_path / "c").path.read_text()
    assert "airplane" in html and "truck" in html and "automobile → deer" in html
    assert all(_decode(u).mode == "RGB" for u in _img_srcs(html) if _decode(u).size == (32, 32))
    fake_audit(tmp_path / "u", shape=(3, 200, 150), source="image folder imgs (seed-0 split 80/20)")
    html = write_page(tmp_path / "u").path.read_text()
    assert "airplane" not in html and "label 3" in html
    sizes = [_decode(u).size for u in _img_srcs(html)]
    assert (96, 128) in sizes and max(
        max(s) for s in sizes if s[0] < 200
    ) <= 128  # 150 x 200 -> 96 x 128; plots are wider


def test_missing_artifacts_leave_a_note_in_each_affected_section(tmp_path, capsys):
    fake_audit(tmp_path)
    (tmp_path / "artifacts" / "attack_pgd.safetensors").unlink()
    (tmp_path / "artifacts" / "detector_scores.safetensors").unlink()
    (tmp_path / "artifacts" / "examples.safetensors").write_bytes(b"not a safetensors file")
    assert main(["report", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "attack_pgd.safetensors is missing" in err and "detector_scores.safetensors is missing" in err
    assert "examples.safetensors is unreadable" in err
    html = (tmp_path / "report.html").read_text()
    assert _h2(html) == list(TITLES.values())
    sections = dict(re.findall(r'<section id="([^"]+)">(.*?)</section>', html, re.S))
    assert "artifacts/attack_pgd.safetensors is missing, so the PGD-40 examples cannot be shown" in sections["gradient"]
    assert "artifacts/detector_scores.safetensors is missing, so the ROC curves" in sections["detectors"]
    assert "artifacts/examples.safetensors cannot be used" in sections["model"]
    assert "AUROC per detector" in sections["detectors"]  # the table still comes from report.json
    assert "FGSM: adversarial images" in sections["gradient"]  # FGSM still shown, without its clean images
    _check_self_contained(html)


def test_missing_newer_or_unreadable_report_exits_2_with_a_clear_message(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "must hold report.json" in capsys.readouterr().err
    with pytest.raises(ReportInputError, match="must hold report.json"):
        write_page(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps({"version": REPORT_VERSION + 1, "model": {}}))
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"report version {REPORT_VERSION + 1}, newer than this guard reads (version <= {REPORT_VERSION})" in err
    (tmp_path / "report.json").write_text("{not json")
    assert main(["report", str(tmp_path)]) == 2
    assert "must be a readable JSON guard report" in capsys.readouterr().err
    (tmp_path / "report.json").write_text(json.dumps({"model": {}}))
    assert main(["report", str(tmp_path)]) == 2
    assert "must have an integer 'version'" in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()


def test_a_section_that_raises_costs_only_itself(tmp_path, monkeypatch):
    import guard.report.page as page_mod

    fake_audit(tmp_path)

    def broken(src):
        raise RuntimeError("boom")

    monkeypatch.setattr(
        page_mod, "SECTIONS", tuple((s, t, broken if s == "patches" else b) for s, t, b in page_mod.SECTIONS)
    )
    page = write_page(tmp_path)
    html = page.path.read_text()
    assert page.failed == {"patches": "RuntimeError: boom"}
    assert "Patches" in _h2(html) and "This section could not be drawn: RuntimeError: boom" in html
    assert len(_h2(html)) == len(TITLES)


def test_run_audit_writes_the_page_and_a_page_failure_never_fails_the_audit(
    tmp_path, tiny_model, small_split, monkeypatch
):
    import guard.audit.runner as runner

    train, test = small_split
    rep = run_audit(tiny_model, train, test, tmp_path / "ok", steps=[step("model")])
    html = (tmp_path / "ok" / "report.html").read_text()
    assert "errors" not in rep and _h2(html)[:2] == ["Model and data", "Summary"]
    assert len(_img_srcs(html)) == 16  # the examples artifact the model step saved
    assert rep["options"]["quick"] is False

    class Failing(Step):
        name = "broken"

        def run(self, ctx):
            raise RuntimeError("step boom")

    def no_page(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(runner, "write_page", no_page)
    rep = run_audit(tiny_model, train, test, tmp_path / "bad", steps=[step("model"), Failing()])
    assert rep["errors"] == {"broken": "RuntimeError: step boom", "report": "OSError: disk full"}
    assert rep["model"]["num_classes"] == 10 and not (tmp_path / "bad" / "report.html").exists()
    assert json.loads((tmp_path / "bad" / "report.json").read_text())["errors"]["report"] == "OSError: disk full"
    monkeypatch.undo()
    rep = run_audit(tiny_model, train, test, tmp_path / "bad", steps=[step("model"), Failing()], resume=True)
    assert rep["errors"] == {"broken": "RuntimeError: step boom"}  # the page's old error is gone once it is built
    assert (tmp_path / "bad" / "report.html").is_file()


def test_roc_matches_scikit_learn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    pos = np.r_[rng.normal(1, 1, 300), [np.inf, np.nan]]
    neg = np.r_[rng.normal(0, 1, 200).round(1), [-np.inf]]  # ties
    fpr, tpr, auc = roc_curve(pos, neg)
    labels = np.r_[np.ones(pos.size), np.zeros(neg.size)]
    both = np.nan_to_num(np.r_[pos, neg], nan=1e9, posinf=1e9, neginf=-1e9)
    assert auc == pytest.approx(roc_auc_score(labels, both), abs=1e-12)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and np.all(np.diff(fpr) >= 0)


# ---------------------------------------------------------------- slow: a real quick audit in a real browser


@pytest.fixture(scope="module")
def quick_audit(tmp_path_factory, tiny_model, small_split):
    """A quick audit of the tiny model on 512 / 256 images (no export): its folder and report."""
    out = tmp_path_factory.mktemp("quick_audit")
    train, test = small_split
    rep = run_audit(
        tiny_model,
        train,
        test,
        out,
        model_name="tiny DemoNet",
        data_source="embedded MNIST test split (test)",
        options=AuditOptions(quick=True, progress=False, export=False),
    )
    return out, rep, test


@pytest.mark.slow
def test_quick_audit_saves_what_the_page_draws(quick_audit):
    """The artifacts the page needs exist and agree with report.json (the ROC from the saved
    scores gives the reported AUROC; the examples are the first held-out images)."""
    from guard.core.cache import load_tensors

    out, rep, test = quick_audit
    assert "errors" not in rep, rep.get("errors")
    ex, _ = load_tensors(out / "artifacts" / "examples.safetensors")
    assert torch.equal(ex["x"], test.x[:16]) and torch.equal(ex["y"], test.y[:16]) and ex["pred"].shape == (16,)
    scores, meta = load_tensors(out / "artifacts" / "detector_scores.safetensors")
    assert meta["max_values"] >= 256
    for det, per in rep["detectors"].items():
        assert scores[f"clean/{det}"].numel() == per["pgd"]["n_neg"]
        for attack, m in per.items():
            pos = scores[f"{attack}/{det}"]
            assert pos.dtype == torch.float32 and pos.numel() == m["n_pos"]
            if m["auroc"] is not None:
                assert roc_curve(pos.numpy(), scores[f"clean/{det}"].numpy())[2] == pytest.approx(m["auroc"], abs=1e-6)
    pgd, _ = load_tensors(out / "artifacts" / "attack_pgd.safetensors")
    # the saved label on x_adv is the one that made it a success (PGD stops at the boundary, so a
    # re-batched forward pass may flip the odd borderline image)
    assert (pgd["success"] == (pgd["pred"] != pgd["y"])).float().mean() >= 0.95
    fa, _ = load_tensors(out / "artifacts" / "attack_feature_adversary.safetensors")
    assert {"source", "guide", "guide_label", "adv_label", "distance_ratio"} <= set(fa)
    assert float((fa["x_adv"] - fa["source"]).abs().max()) <= rep["attacks"]["feature_adversary"]["delta"] + 1e-6
    pg, _ = load_tensors(out / "artifacts" / "attack_patch_gan.safetensors")
    assert pg["patches"].shape[-1] == rep["attacks"]["patch_gan"]["side"]


#: the committed run of the same quick audit (benchmarks/studies/audit_mnist_quick.py, one thread)
QUICK_AUDIT_RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "audit-mnist-quick.json"
QUICK_AUDIT_CONFIG = {
    "model": "DemoNet(width=8, hidden=32), 2 epochs on embedded MNIST train[:2000], lr 3e-3, seed 0",
    "train": "embedded MNIST train[:512]",
    "test": "embedded MNIST test[:256]",
    "options": "AuditOptions(quick=True, progress=False, export=False)",
}
#: A figure may fall below its committed value by this share of its distance from "no detection"
#: (AUROC 0.5, TPR 0). The same audit on two threads (audit-mnist-quick-2threads.json; the suite
#: runs on two) moved the floored figures by at most 0.047 of that distance (kNN's AUROC on the
#: universal patch: 115 successful patches instead of 127); 0.25 lets that through, and a halving
#: of detection (a share of 0.5) fails.
FLOOR_SHARE = 0.25
#: Only figures that rest on enough positives to be stable between runs are floored.
FLOOR_MIN_POS = 30


def _floors(committed: dict) -> list[tuple[str, str, str, float]]:
    """(detector, attack, figure, floor) for every key figure of the committed run."""
    out = []
    for det, per in committed["detectors"].items():
        for attack, ref in per.items():
            if ref.get("auroc") is None or ref["n_pos"] < FLOOR_MIN_POS:
                continue
            if ref["auroc"] >= 0.6:
                out.append((det, attack, "auroc", 0.5 + (1 - FLOOR_SHARE) * (ref["auroc"] - 0.5)))
            if det == "combined" and ref.get("tpr_at_threshold") is not None and ref["tpr_at_threshold"] >= 0.2:
                out.append((det, attack, "tpr_at_threshold", (1 - FLOOR_SHARE) * ref["tpr_at_threshold"]))
    return out


def test_committed_quick_audit_figures_have_their_provenance_and_floors():
    from guard.core.provenance import read_results

    committed = read_results(QUICK_AUDIT_RESULTS)
    assert committed["config"] == QUICK_AUDIT_CONFIG  # the committed run is the audit the slow test runs
    # written by benchmarks/studies/audit_mnist_quick.py (recorded as its flat path of earlier commits, benchmarks/MOVED.json)
    moved = json.loads((QUICK_AUDIT_RESULTS.parents[1] / "MOVED.json").read_text())
    script = next(w for w in committed["command"].split() if w.endswith(".py") or w.startswith("benchmarks."))
    assert (
        moved.get(script, {}).get("module", script) == "benchmarks.studies.audit_mnist_quick"
        and committed["threads"] == 1
    )
    floors = _floors(committed)
    # the combined flag's operating point on the gradient attacks is among the floored figures
    assert {("combined", a, "tpr_at_threshold") for a in ("fgsm", "pgd")} <= {f[:3] for f in floors}
    # a halving of detection falls below every floor, and the two-thread run of the same audit is above them all
    two = read_results(QUICK_AUDIT_RESULTS.with_name("audit-mnist-quick-2threads.json"))
    assert two["config"] == QUICK_AUDIT_CONFIG and two["threads"] == 2
    for det, attack, fig, floor in floors:
        ref = committed["detectors"][det][attack][fig]
        halved = 0.5 + (ref - 0.5) / 2 if fig == "auroc" else ref / 2
        assert halved < floor <= two["detectors"][det][attack][fig], (det, attack, fig, ref, floor)


@pytest.mark.slow
def test_quick_audit_detects_at_least_the_committed_figures(quick_audit):
    """The suite's quick audit detects no less than the committed run of it, within FLOOR_SHARE
    (issue 34: no test noticed MNIST detection halving)."""
    from guard.core.provenance import read_results

    _, rep, _ = quick_audit
    committed = read_results(QUICK_AUDIT_RESULTS)
    below = []
    for det, attack, fig, floor in _floors(committed):
        got = rep["detectors"][det][attack][fig]
        if got is None or got < floor:
            below.append(
                f"{det}/{attack} {fig} {got} < floor {floor:.3f} (committed {committed['detectors'][det][attack][fig]:.3f})"
            )
    assert not below, "detection fell below the committed quick MNIST audit:\n" + "\n".join(below)


@pytest.mark.slow
def test_quick_audit_page_in_headless_chromium(quick_audit, tmp_path):
    browser = find_browser()
    if browser is None:
        pytest.skip(
            "no headless Chromium (apt-get install -y chromium, or set GUARD_CHROMIUM): the page was not looked at"
        )
    out, rep, _ = quick_audit
    page = out / "report.html"
    html = page.read_text()
    _check_self_contained(html)
    expected = [
        TITLES[k] for k in ("model", "summary", "gradient", "patches", "features", "fooling", "detectors", "adaptive")
    ] + ["Robust accuracy"]
    assert "adaptive" in rep["_completed_steps"] and "export" not in rep["_completed_steps"]
    seen = probe(page, browser=browser)
    # the DOM the browser built has every section heading, in order, and nothing of the steps that did not run
    assert [re.sub(r"<[^>]+>", "", h) for h in re.findall(r"<h2>(.*?)</h2>", seen.dom)] == expected
    # every <img> decoded: the browser knows its natural width
    n_img = len(_img_srcs(html))
    assert n_img > 100 and len(seen.natural_widths) == n_img and min(seen.natural_widths) > 0
    assert seen.scroll_height > 3000
    shot = screenshot(page, tmp_path / "shot.png", width=1200, height=1600, browser=browser)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (1600, 1200)
    assert pixels.var() > 200, "the screenshot is (nearly) blank"
    assert (pixels < 100).mean() > 0.01 and (pixels > 240).mean() > 0.3  # dark text and images on a light page


def test_adaptive_section_of_another_shape_is_drawn_generically(tmp_path):
    fake_audit(tmp_path, sections={"adaptive"})
    rep = json.loads((tmp_path / "report.json").read_text())
    rep["adaptive"] = {"knn": {"pgd_adaptive": {"auroc": 0.61, "tpr_at_1fpr": 0.02, "tpr_at_5fpr": 0.1}}}
    (tmp_path / "report.json").write_text(json.dumps(rep))
    html = write_page(tmp_path).path.read_text()
    assert "Adaptive evaluation" in _h2(html) and "pgd_adaptive" in html and "0.61" in html
    rep["adaptive"] = {
        "eps": 8 / 255,
        "evasion": None,
        "n": 0,
        "steps": 10,
        "fpr": 0.05,
        "per_eps": [],
        "note": "the model classifies none of the 16 given images correctly; nothing to attack",
    }
    (tmp_path / "report.json").write_text(json.dumps(rep))
    assert "none of the 16 given images" in write_page(tmp_path).path.read_text()


def test_operating_point_table_comes_first_with_intervals(tmp_path):
    """The detectors section leads with the realised FPR / TPR at the threshold, each with its interval and n."""
    fake_audit(tmp_path)
    html = write_page(tmp_path).path.read_text()
    sec = dict(re.findall(r'<section id="([^"]+)">(.*?)</section>', html, re.S))["detectors"]
    assert sec.index("clean images flagged (FPR)") < sec.index("AUROC per detector")
    assert "5.5% [2.8–9.6%] of 200" in sec and "62.5% [40.6–81.2%] of 24" in sec
    assert "PGD-40 (full)" in sec  # the row says its strength
