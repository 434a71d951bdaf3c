"""Detectors: saliency concentration (Captum), kNN rank (FAISS), PPCA in-manifold likelihood,
feature squeezing.

All follow scikit-learn conventions (see ``detectors.base``): fit on clean data, scores where
higher = more suspicious, ``calibrate(clean, fpr)`` -> ``threshold_``, ``predict`` -> flags,
safe ``save`` / ``load`` (safetensors + JSON, integrity-checked).
"""

from detectors.base import Detector, FeatureDetector
from detectors.combined import Combined
from detectors.knn import KNNConsistency, KNNRank
from detectors.ppca import PPCAManifold
from detectors.saliency import SaliencyConcentration
from detectors.squeeze import BitDepthSqueeze

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
