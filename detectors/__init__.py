"""Detectors: saliency concentration (Captum), kNN rank (FAISS), PPCA in-manifold likelihood,
feature squeezing.

All follow scikit-learn conventions (see ``detectors.base``): fit on clean data, scores where
higher = more suspicious, ``calibrate(clean, fpr)`` -> ``threshold_``, ``predict`` -> flags,
safe ``save`` / ``load`` (safetensors + JSON, integrity-checked).
"""

from guard.detectors.base import Detector, FeatureDetector
from guard.detectors.combined import Combined
from guard.detectors.knn import KNNConsistency, KNNRank
from guard.detectors.ppca import PPCAManifold
from guard.detectors.saliency import SaliencyConcentration
from guard.detectors.squeeze import BitDepthSqueeze

__all__ = [
    "BitDepthSqueeze",
    "Combined",
    "Detector",
    "FeatureDetector",
    "KNNConsistency",
    "KNNRank",
    "PPCAManifold",
    "SaliencyConcentration",
]
