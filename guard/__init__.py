"""guard: attack, detect, harden and deploy PyTorch image classifiers against adversarial inputs.

Everyday use::

    import guard
    model = guard.demo_model()
    train, test = guard.demo_data()
    guarded = guard.wrap(model).fit(train).calibrate(test.x[:1000], fpr=0.05)

The parts live in one namespace: ``guard.attacks``, ``guard.detectors``, ``guard.training``,
``guard.export`` and the shared foundation ``guard.core``. This module only re-exports the
names people use every day; heavy third-party libraries (FAISS, Captum, onnxruntime, pyribs)
are imported when first used.
"""

from __future__ import annotations

from guard._version import __version__
from guard.core.data import Split, demo_data, load_data, split_folder
from guard.core.features import FeatureExtractor, extract_features, get_layer, layer_names
from guard.core.models import DemoNet, Normalize, Normalized, load_model
from guard.core.validation import NotFittedError, check_images
from guard.demo import demo_model
from guard.evaluation import evaluate
from guard.export import load_session, to_onnx
from guard.guarded import DEFAULT_DETECTORS, GuardedModel, GuardedOutput, wrap
from guard.robust import RobustBudget, evaluate_robust, robust_sweep
from guard.training import ConsistentRejection, HardenResult, RejectClassifier, harden

__all__ = [
    "__version__",
    "DemoNet",
    "FeatureExtractor",
    "DEFAULT_DETECTORS",
    "GuardedModel",
    "GuardedOutput",
    "HardenResult",
    "NotFittedError",
    "Normalize",
    "Normalized",
    "RejectClassifier",
    "ConsistentRejection",
    "Split",
    "check_images",
    "demo_data",
    "demo_model",
    "evaluate",
    "evaluate_robust",
    "robust_sweep",
    "RobustBudget",
    "extract_features",
    "get_layer",
    "harden",
    "layer_names",
    "load_data",
    "load_model",
    "load_session",
    "split_folder",
    "to_onnx",
    "wrap",
]
