"""The (n+1)-class "reject" head of Nguyen et al. (2015), and a classifier that predicts -1 for it.

Nguyen, Yosinski, Clune, "Deep Neural Networks are Easily Fooled: High Confidence Predictions
for Unrecognizable Images", CVPR 2015, section 3.3: retrain the network with an extra
"fooling images" class. :func:`grow_head` copies a model and widens its final ``nn.Linear``
from n to n+1 outputs, keeping the n learned rows bit for bit; :class:`RejectClassifier`
wraps the widened model so that ``predict`` gives ``-1`` for the reject class.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from guard.core.features import find_head, get_layer
from guard.core.integrity import load_sealed, resolve_key, save_sealed
from guard.core.models import eval_mode, inference_batch
from guard.core.validation import call_model, check_float, check_images, check_int

__all__ = ["REJECT", "grow_head", "set_submodule", "RejectClassifier", "FORMAT"]

FORMAT = "guard.reject_classifier/2"
LEGACY_FORMATS = ("guard.reject_classifier/1",)  # unsealed; loads only with expected_sha256

#: What :meth:`RejectClassifier.predict` returns for a rejected input.
REJECT = -1


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` (``"fc2"``, ``"classifier.3"``)."""
    parent_name, _, leaf = name.rpartition(".")
    parent = get_layer(model, parent_name) if parent_name else model
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and leaf.isdigit():
        parent[int(leaf)] = module
    else:
        setattr(parent, leaf, module)


def grow_head(
    model: nn.Module, *, num_classes: int | None = None, head: str | None = None, seed: int = 0
) -> tuple[nn.Module, str]:
    """A deep copy of ``model`` whose classifier head has one more output (the reject class).

    Args:
        model: the classifier; never modified.
        num_classes: the number of classes the head must have now (checked when given).
        head: dotted name of the head ``nn.Linear``; default: the last ``nn.Linear``.
        seed: seeds the new row's small random weights.

    Returns:
        ``(new_model, head_name)``. Rows ``0..n-1`` of the new head equal the old head's; row
        ``n`` has small random weights and the lowest old bias, so the copy predicts exactly
        what the original predicted until it is trained.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("model is a TorchScript module; harden needs an editable nn.Module (its head is replaced).")
    name, old = find_head(model, head)
    n = int(old.out_features)
    if num_classes is not None:
        num_classes = check_int(num_classes, "num_classes", "harden", low=2)
        if num_classes != n:
            raise ValueError(
                f"num_classes={num_classes} does not match the head {name!r}, which has {n} outputs "
                "(pass head='module.path' if this is not the classifier head)."
            )
    new_model = copy.deepcopy(model)
    _, old_copy = find_head(new_model, name)
    p = old_copy.weight
    new = nn.Linear(old_copy.in_features, n + 1, bias=old_copy.bias is not None, device=p.device, dtype=p.dtype)
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        new.weight[:n].copy_(old_copy.weight)
        scale = float(old_copy.weight.std()) * 0.1 if old_copy.weight.numel() > 1 else 0.01
        new.weight[n].copy_((torch.randn(old_copy.in_features, generator=gen) * scale).to(p))
        if new.bias is not None and old_copy.bias is not None:
            new.bias[:n].copy_(old_copy.bias)
            new.bias[n] = old_copy.bias.min() - 1.0
    new.train(old_copy.training)
    set_submodule(new_model, name, new)
    return new_model, name


class RejectClassifier(nn.Module):
    """A classifier with an extra reject class: ``forward`` gives n+1 logits, ``predict`` -1 for reject.

    The reject logit can be shifted by a calibrated ``reject_offset`` (:meth:`calibrate_rejection`:
    at most a chosen share of clean images rejected), part of ``forward`` and so of everything that
    reads it: attacks, the robust evaluation, the ONNX export, :meth:`save`.

    Attributes:
        model: the widened network (its layer names are the original model's under ``model.``).
        num_classes: n, the number of real classes.
        reject_index: n, the index of the reject logit.
        head: the dotted name of the head inside ``model``.
        reject_offset: added to the reject logit in ``forward`` (0 unless calibrated).
    """

    def __init__(self, model: nn.Module, num_classes: int, head: str, *, reject_offset: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.num_classes = check_int(num_classes, "num_classes", "RejectClassifier", low=1)
        self.head = head
        out = find_head(model, head)[1].out_features
        if out != self.num_classes + 1:
            raise ValueError(
                f"the head {head!r} must have num_classes + 1 = {self.num_classes + 1} outputs; got {out}."
            )
        self.reject_offset = reject_offset  # metadata of the saved file, not a weight

    @property
    def reject_index(self) -> int:
        return self.num_classes

    @property
    def reject_offset(self) -> float:
        return self._offset

    @reject_offset.setter
    def reject_offset(self, value: float) -> None:
        # a Python float: forward branches on it (a tracer could not branch on a tensor's value) and
        # adds it as a constant, on whatever device and dtype the logits have
        self._offset = check_float(value, "reject_offset", "RejectClassifier")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if self._offset == 0.0:  # bit for bit the network's logits: hardening and uncalibrated models
            return out
        n = self.num_classes
        return torch.cat([out[:, :n], out[:, n:] + self._offset], dim=1)

    @torch.no_grad()
    def calibrate_rejection(self, x: torch.Tensor, *, rate: float = 0.05, batch_size: int = 1000) -> RejectClassifier:
        """Shift the reject logit so that a share ``rate`` of the clean images ``x`` is rejected (in place).

        The operating point of the reject class, set as guard's detectors set theirs: on clean
        held-out images that neither trained the model nor will be reported. The margin
        ``z_reject - max_k z_k`` (k real) of every image of ``x`` is computed without an offset; the
        offset becomes minus a cut halfway between the ``floor(rate * N)``-th and the next largest
        margin, so that exactly that many images are rejected (fewer where margins tie). It lowers
        the reject logit when the model rejects more than ``rate`` and raises it when it rejects
        less. An attacker sees the shifted model (it is in ``forward``). Returns ``self``.

        Raises:
            ValueError: ``rate`` outside [0, 1); ``x`` empty, not images in [0, 1], or NaN.
        """
        rate = check_float(rate, "rate", "RejectClassifier.calibrate_rejection", low=0.0, high=1.0, high_open=True)
        check_images(x, "x")  # also refuses an empty batch
        device = next((p.device for p in self.parameters()), x.device)
        batch_size = inference_batch(x, batch_size)
        margins = []
        with eval_mode(self):
            for i in range(0, x.shape[0], batch_size):  # the network's logits: no offset, old or new
                z = call_model(self.model, x[i : i + batch_size].to(device)).float()
                margins.append((z[:, self.num_classes] - z[:, : self.num_classes].max(1).values).cpu())
        m = torch.cat(margins).double().sort(descending=True).values
        k = int(rate * m.numel())  # images allowed above the threshold
        # halfway between the k-th and the (k+1)-th largest margin, so that a last-bit difference
        # (float32 sums, onnxruntime) does not move an image across it; above the largest for k = 0
        cut = (m[k - 1] + m[k]) / 2 if k > 0 else m[0] + 1e-3 * (1.0 + m[0].abs())
        self.reject_offset = -float(cut)
        return self

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor, *, batch_size: int = 1000) -> torch.Tensor:
        """Softmax over the n+1 outputs, (N, n+1), eval mode (restored), batched."""
        check_images(x, "x")
        device = next((p.device for p in self.parameters()), x.device)
        batch_size = inference_batch(x, batch_size)
        outs = []
        with eval_mode(self):
            for i in range(0, x.shape[0], batch_size):
                outs.append(call_model(self, x[i : i + batch_size].to(device)).softmax(1))
        return torch.cat(outs)

    def reject_probability(self, x: torch.Tensor) -> torch.Tensor:
        """P(reject | x), (N,)."""
        return self.probabilities(x)[:, self.reject_index]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Labels in ``0..n-1``, or :data:`REJECT` (-1) where the reject class wins."""
        pred = self.probabilities(x).argmax(1)
        return torch.where(pred == self.reject_index, torch.full_like(pred, REJECT), pred)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str], *, key: bytes | None = None, key_env: str | None = None) -> str:
        """Write the widened network's weights (safetensors) and the class count and head (JSON), sealed.

        No pickle: the architecture is not stored, so :meth:`load` takes the original model.
        The seal (:mod:`guard.core.integrity`) covers the weights and the metadata; with
        ``key``/``key_env`` it is an HMAC-SHA256. Returns the file's SHA-256 (also written to
        ``PATH.sha256``) for ``load(..., expected_sha256=...)``.
        """
        meta = {"format": FORMAT, "num_classes": self.num_classes, "head": self.head}
        if self.reject_offset != 0.0:
            meta["reject_offset"] = self.reject_offset
        return save_sealed(
            path, {k: v.detach().cpu() for k, v in self.model.state_dict().items()}, meta, key=resolve_key(key, key_env)
        )

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        model: nn.Module,
        *,
        key: bytes | None = None,
        key_env: str | None = None,
        expected_sha256: str | None = None,
    ) -> RejectClassifier:
        """Load what :meth:`save` wrote, around ``model`` (the classifier before hardening, n outputs).

        ``model`` is not modified: a copy grows the head and takes the saved weights.
        ``key``/``key_env``: the key it was signed with; ``expected_sha256``: the digest
        :meth:`save` returned. Raises ValueError for a file that is not a saved
        RejectClassifier, was altered, or does not fit ``model``.
        """
        tensors, meta = load_sealed(
            path,
            key=resolve_key(key, key_env),
            expected_sha256=expected_sha256,
            what="RejectClassifier file",
            legacy_formats=LEGACY_FORMATS,
            formats=(FORMAT,),
        )
        if meta.get("format") != FORMAT and meta.get("format") not in LEGACY_FORMATS:
            raise ValueError(
                f"{os.fspath(path)!r} is not a saved RejectClassifier (format {meta.get('format')!r}; expected {FORMAT!r})."
            )
        net, head = grow_head(model, num_classes=int(meta["num_classes"]), head=meta["head"])
        try:
            net.load_state_dict(tensors)
        except RuntimeError as err:
            raise ValueError(
                f"{os.fspath(path)!r} does not fit the model given ({type(model).__name__}): {err}"
            ) from err
        # a sealed file's metadata is checked like an argument (a finite float)
        return cls(net, int(meta["num_classes"]), head, reject_offset=meta.get("reject_offset", 0.0)).eval()
