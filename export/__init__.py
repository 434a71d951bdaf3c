"""Export: the guarded/hardened model and its detector heads as one ONNX graph."""

__all__: list[str] = []
