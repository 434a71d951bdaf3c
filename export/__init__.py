"""Export: the guarded/hardened model and its detector heads as one ONNX graph, served by onnxruntime.

Example::

    from guard.export import to_onnx, load_session
    report = to_onnx(guarded, "model.onnx", test.x[:8])
    sess = load_session("model.onnx", device="cpu")
    out = sess.run(test.x[:4])          # {"logits": ..., "knn_score": ..., "flag": ...}
"""

from guard.export.graph import ExportHead, build_export_head
from guard.export.parity import ParityReport, check_parity, compare_with_guarded
from guard.export.session import GuardSession, ProviderError, SessionReport, load_session
from guard.export.to_onnx import ExportError, ExportReport, to_onnx

__all__ = [
    "ExportError",
    "ExportHead",
    "build_export_head",
    "ExportReport",
    "GuardSession",
    "ParityReport",
    "ProviderError",
    "SessionReport",
    "check_parity",
    "compare_with_guarded",
    "load_session",
    "to_onnx",
]
