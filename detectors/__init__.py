"""Detectors: saliency concentration (Captum), kNN rank (FAISS), PPCA in-manifold likelihood."""

__all__: list[str] = []
