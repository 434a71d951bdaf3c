"""Audit step ``model``: the report's model section (clean accuracy on the held-out split).

Also saves the artifact ``examples``: the first :data:`N_EXAMPLES` held-out images (``x``), their
labels (``y``) and the model's labels of them (``pred``). The attack steps start from the same
first held-out images (their ``test_index``), so report.html shows each clean image next to
its adversarial versions.
"""

from __future__ import annotations

import torch

from guard.audit.step import AuditContext, Step
from guard.core.models import accuracy, predict_labels

__all__ = ["ModelStep", "N_EXAMPLES"]

N_EXAMPLES = 16


class ModelStep(Step):
    """``report["model"]``: name, number of classes, clean and training accuracy, data sizes."""

    name = "model"

    def run(self, ctx: AuditContext) -> None:
        with torch.no_grad():
            probe = ctx.model(ctx.test.x[:2].to(ctx.options.device))
        meta = getattr(ctx.model, "guard_meta", {})
        ctx.report["model"] = {
            "name": ctx.model_name,
            "num_classes": int(probe.shape[1]),
            "clean_accuracy": accuracy(ctx.model, ctx.test.x, ctx.test.y),
            "train_accuracy": accuracy(ctx.model, ctx.train.x[:2000], ctx.train.y[:2000]),
            "train_accuracy_n": min(len(ctx.train), 2000),
            "data": {"source": ctx.data_source, "train": len(ctx.train), "test": len(ctx.test)},
            "parameters": sum(p.numel() for p in ctx.model.parameters()),
            "cache": {k: meta[k] for k in ("cache_path", "cache_hit", "key") if k in meta},
        }
        x, y = ctx.test.x[:N_EXAMPLES], ctx.test.y[:N_EXAMPLES]
        ctx.save_artifact(
            "examples",
            {"x": x.float(), "y": y.long(), "pred": predict_labels(ctx.model, x.to(ctx.options.device)).cpu()},
            {"what": f"the first {int(x.shape[0])} held-out images, their labels and the model's labels"},
        )
