"""guard: attack, detect, harden and deploy PyTorch image classifiers against adversarial inputs.

Everyday use::

    import guard
    model = guard.demo_model()
    train, test = guard.demo_data()
"""

from __future__ import annotations

from guard.data import Split, demo_data, load_data
from guard.demo import demo_model
from guard.features import FeatureExtractor, extract_features, get_layer, layer_names
from guard.models import DemoNet, Normalize, Normalized, load_model
from guard.validation import NotFittedError, check_images

__version__ = "0.1.0"

__all__ = [
    "DemoNet",
    "FeatureExtractor",
    "NotFittedError",
    "Normalize",
    "Normalized",
    "Split",
    "check_images",
    "demo_data",
    "demo_model",
    "extract_features",
    "get_layer",
    "layer_names",
    "load_data",
    "load_model",
    "harden",
    "RejectClassifier",
    "wrap",
    "GuardedModel",
    "evaluate",
    "to_onnx",
    "load_session",
]


def __getattr__(name: str):
    # Lazy: ``training`` imports ``attacks``; ``import guard`` stays light.
    if name in ("harden", "RejectClassifier", "HardenResult"):
        import training

        return getattr(training, name)
    if name in ("wrap", "GuardedModel", "GuardedOutput"):
        # Lazy: guard.guarded imports ``detectors``, which imports guard's submodules.
        from guard import guarded

        return getattr(guarded, name)
    if name == "evaluate":
        from guard.evaluation import evaluate

        return evaluate
    if name in ("to_onnx", "load_session"):
        import export

        return getattr(export, name)
    raise AttributeError(f"module 'guard' has no attribute {name!r}")
