"""Detectors: saliency concentration (Captum), kNN rank (FAISS), PPCA in-manifold likelihood,
kNN label consistency, feature squeezing, PatchCleanser's masking (Xiang et al. 2022; certified
against one patch, not a default: it costs one forward pass per mask), SentiNet's occlusion of the
most salient square (Chou et al. 2020; uncertified, not a default), and the published anchors
Mahalanobis (Lee et al. 2018) and LID (Ma et al. 2018); ``Combined`` turns their scores into one flag.

All follow scikit-learn conventions (see :mod:`guard.detectors.base`): fit on clean data,
scores where higher = more suspicious, ``calibrate(clean, fpr)`` -> ``threshold_``,
``predict`` -> flags, safe ``save`` / ``load`` (safetensors + JSON, integrity-checked). Each
owns its serving score (``score_batch``) and its ONNX head (``export_head``).

:data:`DETECTORS` is the registry ``guard.wrap`` builds its detectors from, by name (and the
contract tests run over): a new detector is one file plus one line here.
"""

from guard.detectors.base import Batch, Detector, FeatureDetector
from guard.detectors.combined import Combined
from guard.detectors.knn import KNNConsistency, KNNRank
from guard.detectors.lid import LIDDetector
from guard.detectors.mahalanobis import MahalanobisDetector
from guard.detectors.masking import MaskingDetector
from guard.detectors.occlusion import SalientOcclusion
from guard.detectors.ppca import PPCAManifold
from guard.detectors.saliency import SaliencyConcentration
from guard.detectors.squeeze import BitDepthSqueeze

#: name -> detector class (``cls.default(layers)`` is how ``guard.wrap`` configures it).
DETECTORS: dict[str, type[Detector]] = {
    "saliency": SaliencyConcentration,
    "knn": KNNRank,
    "ppca": PPCAManifold,
    "knn_consistency": KNNConsistency,
    "squeeze": BitDepthSqueeze,
    "masking": MaskingDetector,
    # SentiNet's occlusion of the most salient square (uncertified; not a default either)
    "occlusion": SalientOcclusion,
    # the published anchors guard is measured against (Lee et al. 2018; Ma et al. 2018)
    "mahalanobis": MahalanobisDetector,
    "lid": LIDDetector,
}

__all__ = [
    "Batch",
    "BitDepthSqueeze",
    "Combined",
    "DETECTORS",
    "Detector",
    "FeatureDetector",
    "KNNConsistency",
    "KNNRank",
    "LIDDetector",
    "MahalanobisDetector",
    "MaskingDetector",
    "PPCAManifold",
    "SaliencyConcentration",
    "SalientOcclusion",
]
