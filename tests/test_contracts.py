"""Contract tests over every registered attack and detector (timm / scikit-learn style).

Registering a class in ``guard.attacks.ATTACKS`` or ``guard.detectors.DETECTORS`` puts it
under these tests; :data:`FAST_ATTACKS` gives each attack a configuration small enough for a
tiny model (a registered attack without one fails ``test_every_attack_has_a_fast_config``).
"""

from __future__ import annotations

import pytest
import torch
from conftest import ModelSnapshot
from integrity_tools import KEY, rewrite_meta

from guard.attacks import ATTACKS, Attack, AttackResult, Fooler, PatchTraining
from guard.attacks.patching import patch_side
from guard.core.integrity import IntegrityError
from guard.core.validation import NotFittedError
from guard.detectors import DETECTORS, Batch, Detector
from guard.guarded import GuardedModel

FAST_ATTACKS: dict[str, dict] = {
    "fgsm": {"eps": 0.1},
    "pgd": {"eps": 0.1, "steps": 5},
    "pgd_l2": {"eps": 1.0, "steps": 5},
    "apgd": {"eps": 0.1, "steps": 5},
    "patch_gan": {"size": 0.05, "training": PatchTraining(steps=4, eval_every=2, batch_size=8)},
    "universal_patch": {"size": 0.05, "training": PatchTraining(steps=4, eval_every=2, batch_size=8)},
    "random_patch": {"size": 0.05},
    "feature_adversary": {"layer": "fc1", "delta": 0.1, "max_iter": 3},
    "fooling_gradient": {"steps": 5, "samples_per_class": 1},
    "fooling_evolution": {"population": 10, "generations": 2, "extra_samples": 4},
}
EPS_ATTACKS = {"fgsm": "linf", "pgd": "linf", "apgd": "linf", "pgd_l2": "l2", "feature_adversary": "linf"}


def test_every_attack_has_a_fast_config():
    assert set(FAST_ATTACKS) == set(ATTACKS)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_contract(name, tiny_model, small_split):
    train, test = small_split
    attack = ATTACKS[name](**FAST_ATTACKS[name])
    snap = ModelSnapshot(tiny_model)
    x = test.x[:12]
    if isinstance(attack, Fooler):
        res = attack(tiny_model, shape=(1, 28, 28), classes=[1, 4])
        assert res.x_adv.shape[1:] == (1, 28, 28) and res.x_adv.dtype == torch.float32
        with torch.no_grad():
            conf = tiny_model(res.x_adv).softmax(1).gather(1, res.extras["label"][:, None]).squeeze(1)
        torch.testing.assert_close(res.extras["confidence"].float(), conf, atol=1e-5, rtol=1e-4)
        assert set(res.extras["label"].tolist()) <= {1, 4}
        assert torch.equal(res.success, res.extras["confidence"] >= attack.threshold)
    else:
        assert isinstance(attack, Attack)
        attack.fit(tiny_model, train.x[:64])
        res = attack(tiny_model, x)
        assert res.x_adv.shape == x.shape and res.x_adv.dtype == x.dtype and res.x_adv.device == x.device
        with torch.no_grad():
            pred = tiny_model(res.x_adv).argmax(1)
            clean = tiny_model(x).argmax(1)
        want = pred == res.target if res.target is not None else pred != clean
        assert torch.equal(res.success.cpu(), want), name
        if name in EPS_ATTACKS:
            d = (res.x_adv - x).flatten(1)
            bound = attack.eps if hasattr(attack, "eps") else attack.delta
            size = d.abs().amax(1) if EPS_ATTACKS[name] == "linf" else d.norm(dim=1)
            assert float(size.max()) <= bound + 1e-5
        else:  # a patch: only a side x side square may change
            side = patch_side(attack.size, x.shape[-2:])
            assert int((res.x_adv != x).flatten(1).sum(1).max()) <= side * side
    assert isinstance(res, AttackResult) and len(res) == res.success.shape[0]
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    snap.assert_unchanged(tiny_model)


@pytest.fixture(scope="module")
def fitted_detectors(tiny_model, small_split):
    train, test = small_split
    g = GuardedModel(tiny_model, defaults=list(DETECTORS)).fit(train)
    assert set(g.detectors) == set(DETECTORS), g.left_out_
    return g


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_detector_contract(name, fitted_detectors, tiny_model, small_split, tmp_path):
    _, test = small_split
    det: Detector = fitted_detectors.detectors[name]
    fresh = type(det)(**det.get_params())
    with pytest.raises(NotFittedError):
        fresh.score(tiny_model, test.x[:4])
    assert fresh.get_params() == det.get_params()  # parameters stored under their own names
    clean = fitted_detectors._forward(test.x[:128])
    scores = det.score_batch(clean)
    assert scores.shape == (128,) and bool(torch.isfinite(scores).all())
    det.calibrate(scores.cpu(), 0.1)
    assert float(det.predict_scores(scores.cpu()).float().mean()) <= 0.1 + 1e-9
    # save / load: the same scores and threshold
    det.save(tmp_path / "d.safetensors")
    back = Detector.load(tmp_path / "d.safetensors")
    assert type(back) is type(det) and back.threshold_ == det.threshold_
    torch.testing.assert_close(back.score_batch(clean), scores)
    # signed: the key round-trips it; a threshold raised in the file and resealed without the key is refused
    det.save(tmp_path / "s.safetensors", key=KEY)
    assert Detector.load(tmp_path / "s.safetensors", key=KEY).threshold_ == det.threshold_
    rewrite_meta(tmp_path / "s.safetensors", lambda m: m["state"].update(threshold_=1e9), reseal=True)
    with pytest.raises(IntegrityError, match="not signed"):
        Detector.load(tmp_path / "s.safetensors", key=KEY)
    # the ONNX head computes the eager score from the same batch
    batch = fitted_detectors._forward(test.x[128:192])
    head = det.export_head().eval()
    got = head(Batch(batch.x, batch.logits, batch.features, tiny_model))
    got = got["score"] if isinstance(got, dict) else got
    torch.testing.assert_close(got.cpu(), det.score_batch(batch).cpu(), atol=1e-5, rtol=1e-4)
