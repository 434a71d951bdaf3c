"""The published anchors, measured in the same run: Mahalanobis (Lee et al. 2018) and LID (Ma et al. 2018)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guard.detectors import LIDDetector, MahalanobisDetector
from guard.detectors.lid import lid_mle
from guard.detectors.mahalanobis import closest_class_distance


def test_closest_class_distance_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    f, means = torch.randn(7, 5, generator=g), torch.randn(3, 5, generator=g)
    a = torch.randn(5, 5, generator=g)
    prec = a @ a.t() + torch.eye(5)
    brute = torch.stack([torch.stack([(r - m) @ prec @ (r - m) for m in means]).min() for r in f])
    torch.testing.assert_close(closest_class_distance(f, means, prec), brute, atol=1e-4, rtol=1e-4)


def test_mahalanobis_fit_is_the_tied_class_covariance_and_flags_an_outlier():
    g = torch.Generator().manual_seed(1)
    y = torch.arange(600) % 3
    centres = torch.tensor([[0.0, 0.0, 0.0], [6.0, 0.0, 0.0], [0.0, 6.0, 0.0]])
    scale = torch.tensor([1.0, 0.5, 0.1])  # an anisotropic shared covariance
    x = centres[y] + torch.randn(600, 3, generator=g) * scale
    det = MahalanobisDetector(["f"]).fit_features({"f": x}, y)
    centred = (x - torch.stack([x[y == c].mean(0) for c in range(3)])[y]).double().numpy()
    np.testing.assert_allclose(
        det.precision0_.numpy(), np.linalg.inv(np.cov(centred.T, bias=True)), rtol=1e-3, atol=1e-3
    )
    # a point 1 unit off a class centre along the narrow axis is far; along the wide axis it is not
    narrow, wide = torch.tensor([[6.0, 0.0, 1.0]]), torch.tensor([[7.0, 0.0, 0.0]])
    logits = torch.zeros(1, 3)
    assert float(det.score_features({"f": narrow}, logits)) > float(det.score_features({"f": wide}, logits)) + 10
    clean = det.score_features({"f": x}, torch.zeros(600, 3))
    assert float(det.score_features({"f": narrow}, logits)) > float(clean.max())
    with pytest.raises(ValueError, match="max_width"):
        MahalanobisDetector(["f"], max_width=2).fit_features({"f": x}, y)


def test_lid_estimates_the_dimension_of_the_data():
    g = torch.Generator().manual_seed(2)
    basis = torch.linalg.qr(torch.randn(20, 20, generator=g))[0]
    for dim in (1, 3):
        z = torch.rand(4000, dim, generator=g)  # uniform on a dim-dimensional cube, embedded in 20-D
        x = z @ basis[:dim]
        det = LIDDetector(["f"], k=20, reference_size=4000).fit_features({"f": x}, torch.zeros(4000, dtype=torch.long))
        fresh = torch.rand(500, dim, generator=g) @ basis[:dim]  # not in the reference set
        lid = det.layer_lids({"f": fresh})[:, 0]
        assert abs(float(lid.median()) - dim) < 0.35 * dim + 0.3, (dim, float(lid.median()))
    # closed form: distances r_i = R (i / k)^(1/m) have the MLE -1 / mean(log(i / k)) * (1/m)^-1
    k, m = 20, 4.0
    r = (torch.arange(1, k + 1) / k).pow(1 / m)[None]
    torch.testing.assert_close(
        lid_mle(r), torch.tensor([-m / float(torch.log(torch.arange(1, k + 1) / k).mean())]), rtol=1e-4, atol=1e-4
    )


def test_lid_flags_an_off_manifold_point():
    g = torch.Generator().manual_seed(3)
    basis2 = torch.randn(2, 10, generator=g)
    x = torch.rand(3000, 2, generator=g) @ basis2
    det = LIDDetector(["f"], k=10).fit_features({"f": x}, torch.zeros(3000, dtype=torch.long))
    fresh = torch.rand(300, 2, generator=g) @ basis2
    clean = det.score_features({"f": fresh}, torch.zeros(300, 2))
    off = fresh[:50] + 0.3 * torch.randn(50, 10, generator=g)
    assert float((det.score_features({"f": off}, torch.zeros(50, 2)) > clean.quantile(0.95)).float().mean()) > 0.8
