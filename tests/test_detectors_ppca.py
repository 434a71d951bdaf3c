"""PPCAManifold: the log-likelihood is scikit-learn's PCA.score_samples; outliers score higher."""

from __future__ import annotations

import pytest
import torch

from guard.core.validation import NotFittedError
from guard.detectors import PPCAManifold


def _data(n: int = 400, d: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    basis = torch.randn(3, d, generator=torch.Generator().manual_seed(123))  # same manifold for every seed
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    z = torch.randn(n, 3, generator=g)
    return z @ basis + 0.1 * torch.randn(n, d, generator=g) + 5 * y[:, None].float(), y


def test_log_likelihood_equals_sklearn_score_samples() -> None:
    """The low-rank (Woodbury) score equals scikit-learn's full-covariance PPCA likelihood."""
    from sklearn.decomposition import PCA

    x, y = _data()
    det = PPCAManifold("f", n_components=3, reg=1e-9).fit_features({"f": x}, y)
    q, qy = _data(50, seed=1)
    for c in (0, 1):
        got = det.log_likelihood({"f": q}, torch.full((50,), c))
        # an independent sklearn fit of the class, scored with its full d x d precision
        ref = PCA(n_components=3, svd_solver="full").fit(x[y == c].double().numpy())
        want = torch.from_numpy(ref.score_samples(q.double().numpy())).float()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-2)
        torch.testing.assert_close(
            got, torch.from_numpy(det.sklearn_pca(c).score_samples(q.double().numpy())).float(), rtol=1e-4, atol=1e-2
        )
    allc = det.log_likelihood({"f": q})
    torch.testing.assert_close(allc[:, 1], det.log_likelihood({"f": q}, torch.ones(50, dtype=torch.long)))
    logits = torch.nn.functional.one_hot(qy, 2).float()
    torch.testing.assert_close(det.score_features({"f": q}, logits), -det.log_likelihood({"f": q}, qy))


def test_off_manifold_point_scores_higher_and_angle(tmp_path) -> None:
    x, y = _data()
    det = PPCAManifold("f", n_components=3).fit_features({"f": x}, y)
    q, qy = _data(100, seed=2)
    logits = torch.nn.functional.one_hot(qy, 2).float()
    normal = det.score_features({"f": q}, logits)
    off = q + 3.0 * torch.randn(100, 12, generator=torch.Generator().manual_seed(3))
    assert float((det.score_features({"f": off}, logits) > normal.max()).float().mean()) > 0.95
    assert float(det.angular_features({"f": off}, logits).mean()) > float(det.angular_features({"f": q}, logits).mean())
    det.calibrate(normal, fpr=0.05)
    det.save(tmp_path / "p.safetensors")
    back = PPCAManifold.load(tmp_path / "p.safetensors")
    torch.testing.assert_close(back.score_features({"f": q}, logits), normal)


def test_bad_inputs() -> None:
    x, y = _data()
    with pytest.raises(NotFittedError):
        PPCAManifold("f").score_features({"f": x}, torch.zeros(len(x), 2))
    with pytest.raises(ValueError, match="at least 2"):
        PPCAManifold("f").fit_features({"f": x[:0]}, y[:0])
    det = PPCAManifold("f", n_components=2).fit_features({"f": x}, y)
    with pytest.raises(ValueError, match="width 12"):
        det.score_features({"f": x[:, :5]}, torch.zeros(len(x), 2))
    with pytest.raises(ValueError, match="'n_components' parameter"):
        PPCAManifold("f", n_components=0).fit_features({"f": x}, y)


_MEMORY_SCRIPT = """
import re, sys, torch
from guard.detectors import PPCAManifold

def peak_mb():
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024

d, classes, per_class = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(0)
y = torch.arange(classes).repeat_interleave(per_class)
x = torch.randn(classes * per_class, 16, generator=g) @ torch.randn(16, d, generator=g) + 0.1 * torch.randn(classes * per_class, d, generator=g)
q = torch.randn(64, 16, generator=g) @ torch.randn(16, d, generator=g)
before = peak_mb()
det = PPCAManifold("f", n_components=16, min_class_size=per_class).fit_features({"f": x}, y)
s = det.score_features({"f": q}, torch.nn.functional.one_hot(torch.arange(64) % classes, classes).float())
assert s.shape == (64,) and bool(torch.isfinite(s).all())
state = sum(t.numel() * 4 for t in det.state_tensors().values()) / 2**20
print(f"{peak_mb() - before:.0f} {state:.0f}")
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "d,classes,per_class,bound_mb", [(25_088, 10, 40, 400), (1_280, 1_000, 12, 400), (512, 10, 5_000, 90)]
)
def test_memory_is_linear_in_d_and_classes(d, classes, per_class, bound_mb):
    """A ResNet-18 layer4 map (25,088 values) and 1,000 ImageNet classes: state O(C d q), no (B, d, d) tensor.

    The full-covariance form would need 10 x 25,088^2 and 1,000 x 1,280^2 floats (25 GB, 6.5 GB).
    Many rows (50,000 x 512, 98 MB as float32): the fit holds one class in float64 at a time, so
    it grows by less than one float32 copy of the data (a float64 copy of the whole, as before,
    grew by 222 MB; now 21 MB).
    """
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(d), str(classes), str(per_class)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak, state = (float(v) for v in proc.stdout.split())
    assert state <= classes * 16 * d * 4 / 2**20 + classes * (d + 17) * 4 / 2**20 + 1
    assert peak < bound_mb, f"peak memory grew by {peak:.0f} MB (bound {bound_mb} MB)"
