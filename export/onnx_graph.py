"""ExportHead: the classifier and its detector heads as one traceable ``nn.Module``.

One forward pass gives every serving output, written only with ops that ONNX has (MatMul,
TopK, Gather, Softmax, Gemm, ConvTranspose, AveragePool, Resize), so that ``torch.onnx.export``
turns the whole guard into one graph. Each head reproduces a detector of ``detectors/`` from
its fitted state:

- ``logits`` / ``pred``; ``reject_prob``: softmax probability of the reject class of a
  hardened model (Nguyen et al. 2015, "Deep neural networks are easily fooled": the extra
  "fooling" class), whose flag is ``pred == reject_index``.
- kNN (``KNNRank``, Sabour et al. 2016 "Adversarial manipulation of deep representations"):
  MatMul against the stored bank + TopK, exact, so it equals FAISS' flat index (cosine: bank
  rows normalised, distance ``1 - q.b``; l2: ``sqrt(|q|^2 - 2 q.b + |b|^2)``); the mean of the
  k distances, then the rank among the predicted class's stored training scores.
  ``KNNConsistency`` (Deep k-NN) gathers the neighbours' labels from the same TopK indices.
- ``ppca_loglik``: the Gaussian log-likelihood of the predicted class from the stored means,
  precisions and log-determinants (probabilistic PCA, Tipping & Bishop 1999, as sklearn's
  ``PCA.score_samples``).
- ``saliency_score``: the share of the attribution map inside the best ``window x window``
  square, for Captum ``Saliency`` (|d logit / d x|) or ``LayerGradCam`` (Selvaraju et al. 2017).
- ``combined_score``: ``detectors.combined.Combined``'s conformal max; ``flags`` / ``flag``:
  the calibrated decisions.

Gradients in a forward graph: ONNX has no autograd, so the gradient of the top logit is written
as an explicit vector-Jacobian product of the layers between the input (or the CAM layer) and
the logits. It is exact (it equals ``torch.autograd.grad``, and Captum's maps bit for bit on the
demo) when those layers form a chain of ``Normalize``, ``Conv2d`` (zero padding),
``MaxPool2d`` (stride = kernel, no padding; the gradient goes to the first max of each window,
as PyTorch's kernel does), ``ReLU``, ``LeakyReLU``, ``Flatten``, ``Linear``, ``Dropout`` (eval),
``Identity``, ``BatchNorm1d`` (eval) and global average pooling. That covers the demo LeNet
(normalize -> conv/ReLU/pool x2 -> flatten -> fc1 -> ReLU -> fc2) for both methods, and
GAP-headed CNNs (ResNet/VGG style: Grad-CAM at the last conv block, where the head is
GAP -> Linear and Grad-CAM is CAM, Zhou et al. 2016). Models with skip connections, BatchNorm2d
or attention between the input and the CAM layer support only "gradcam" at a layer after them;
:func:`head_chain` checks on an example that the chain reproduces the logits and refuses
(naming the layer) what it cannot differentiate, rather than exporting a wrong map.
Integrated gradients are not exported.

Written by hand because no library exports kNN/PPCA/saliency detectors to ONNX.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from guard.core.features import get_layer

from guard.core.models import eval_mode
from guard.core.models import Normalize

__all__ = [
    "ExportHead",
    "KNNHead",
    "KNNRankHead",
    "KNNConsistencyHead",
    "CombinedHead",
    "PPCAHead",
    "SaliencyHead",
    "head_chain",
    "SUPPORTED_CHAIN_MODULES",
]

SUPPORTED_CHAIN_MODULES: tuple[type[nn.Module], ...] = (
    nn.Flatten, nn.Linear, nn.ReLU, nn.LeakyReLU, nn.Dropout, nn.Identity, nn.BatchNorm1d, nn.AdaptiveAvgPool2d,
    nn.Conv2d, nn.MaxPool2d, Normalize,
)


@contextmanager
def _capture(model: nn.Module, layers: Sequence[str], store: dict[str, torch.Tensor]) -> Iterator[None]:
    """Forward hooks that put each named layer's output in ``store`` (removed on exit)."""
    handles = []
    for name in dict.fromkeys(layers):
        def hook(_m: nn.Module, _i: object, out: torch.Tensor, name: str = name) -> None:
            store[name] = out
        handles.append(get_layer(model, name).register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class KNNHead(nn.Module):
    """Exact k-nearest-neighbour distances against a stored feature bank (MatMul + TopK).

    Args:
        bank: (M, D) training features; for ``metric="cosine"`` already L2-normalised.
        k: neighbours kept.
        metric: ``"cosine"`` (distance ``1 - q.b`` with q normalised, clamped at 0) or
            ``"l2"`` (Euclidean: the square root of ``faiss.IndexFlatL2``'s squared distance).
    """

    def __init__(self, bank: torch.Tensor, k: int, metric: str = "cosine") -> None:
        super().__init__()
        if metric not in ("cosine", "l2"):
            raise ValueError(f"metric must be 'cosine' or 'l2'; got {metric!r}.")
        if bank.dim() != 2 or bank.shape[0] < 1:
            raise ValueError(f"bank must be a non-empty (M, D) tensor; got shape {tuple(bank.shape)}.")
        if not 1 <= int(k) <= bank.shape[0]:
            raise ValueError(f"k must be an int in [1, {bank.shape[0]}] (the bank size); got {k}.")
        self.k, self.metric = int(k), metric
        bank = bank.detach().float()
        self.register_buffer("bank_t", bank.t().contiguous())  # (D, M): one MatMul, no transpose at run time
        self.register_buffer("bank_sqnorm", (bank * bank).sum(1))

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, k) distances to the k nearest bank rows, ascending, and their (N, k) row indices."""
        q = feats.flatten(1).float()
        if self.metric == "cosine":
            q = F.normalize(q, dim=1)
            sims, idx = torch.topk(q @ self.bank_t, self.k, dim=1, largest=True, sorted=True)
            return (1.0 - sims).clamp_min(0.0), idx
        d = (q * q).sum(1, keepdim=True) - 2.0 * (q @ self.bank_t) + self.bank_sqnorm
        dist, idx = torch.topk(d, self.k, dim=1, largest=False, sorted=True)
        return dist.clamp_min(0.0).sqrt(), idx


class PPCAHead(nn.Module):
    """Gaussian log-likelihood of features under a per-class mean/precision/log-determinant.

    ``log p(f | c) = -0.5 (D log 2 pi + logdet(Sigma_c) + (f - mu_c)^T P_c (f - mu_c))`` with
    ``P_c = Sigma_c^-1``: the probabilistic-PCA likelihood that scikit-learn's
    ``PCA.score_samples`` computes, with the precision stored rather than recomputed.

    Args:
        means: (C, D) or (D,) (one Gaussian for all classes).
        precisions: (C, D, D) or (D, D).
        logdets: (C,) or scalar: log-determinant of each covariance.
    """

    def __init__(self, means: torch.Tensor, precisions: torch.Tensor, logdets: torch.Tensor) -> None:
        super().__init__()
        means, precisions, logdets = means.detach().float(), precisions.detach().float(), torch.as_tensor(logdets).detach().float()
        if means.dim() == 1:
            means, precisions, logdets = means[None], precisions[None], logdets.reshape(1)
        c, d = means.shape
        if precisions.shape != (c, d, d) or logdets.shape != (c,):
            raise ValueError(f"PPCA state must be means (C, D), precisions (C, D, D), logdets (C,); got "
                             f"{tuple(means.shape)}, {tuple(precisions.shape)}, {tuple(logdets.shape)}.")
        self.register_buffer("means", means)
        self.register_buffer("precisions", precisions)
        self.register_buffer("consts", -0.5 * (d * math.log(2 * math.pi) + logdets))

    def forward(self, feats: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """(N,) log-likelihood of each row under the Gaussian of its class ``cls`` (N,)."""
        f = feats.flatten(1).float()
        cls = cls.long().clamp(0, self.means.shape[0] - 1)  # as the detector: a reject class maps to the last
        diff = f[None] - self.means[:, None, :]  # (C, N, D)
        maha = (torch.matmul(diff, self.precisions) * diff).sum(-1)  # (C, N)
        ll = self.consts[:, None] - 0.5 * maha
        return ll.gather(0, cls[None].long()).squeeze(0)


def head_chain(model: nn.Module, layer: str | None, example: torch.Tensor) -> list[nn.Module]:
    """The leaf modules that map ``layer``'s output (None: the input) to the logits, checked.

    Records the leaf modules called after ``layer`` during one forward pass, refuses a module
    whose vector-Jacobian product is not written here (naming it), and checks that running the
    chain reproduces the logits (so a forward with a skip connection or a functional op between
    modules is refused instead of exported wrong). A Flatten is inserted where a Linear meets a
    4-D tensor (``torch.flatten`` in forward, as in ResNet).
    """
    target = get_layer(model, layer) if layer is not None else None
    names = {m: n for n, m in model.named_modules()}
    order: list[nn.Module] = []
    state = {"after": target is None}
    handles = []

    def on_layer(_m: nn.Module, _i: object, _o: object) -> None:
        state["after"] = True
        order.clear()

    def on_leaf(m: nn.Module, _i: object, _o: object) -> None:
        if state["after"]:
            order.append(m)

    target_modules = set(target.modules()) if target is not None else set()
    if target is not None:
        handles.append(target.register_forward_hook(on_layer))
    for m in model.modules():
        if not list(m.children()) and m not in target_modules:
            handles.append(m.register_forward_hook(on_leaf))
    store: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad(), eval_mode(model), _capture(model, [layer] if layer else [], store):
            logits = model(example)
    finally:
        for h in handles:
            h.remove()
    where = f"the CAM layer {layer!r}" if layer else "the input"
    for m in order:
        _check_supported(m, names.get(m, "?"), where)
    start = store[layer] if layer else example
    with torch.no_grad():
        out = _run_chain(order, start)[0]
    if out.shape != logits.shape or not torch.allclose(out, logits, rtol=1e-5, atol=1e-5):
        raise ValueError(
            f"saliency head: the modules after {where} ({[names.get(m, '?') for m in order]}) do not reproduce the "
            "model's logits when run in order, so its forward has ops between them (a skip connection or a functional "
            "op); the exported saliency needs a plain chain. Use method='gradcam' with a later layer, or export "
            "without the saliency head (saliency=False).")
    return order


def _check_supported(m: nn.Module, name: str, where: str) -> None:
    ok = isinstance(m, SUPPORTED_CHAIN_MODULES)
    if isinstance(m, nn.AdaptiveAvgPool2d):
        ok = tuple(nn.modules.utils._pair(m.output_size)) == (1, 1)
    elif isinstance(m, nn.Conv2d):
        ok = m.padding_mode == "zeros" and not isinstance(m.padding, str)
    elif isinstance(m, nn.MaxPool2d):
        k, st = nn.modules.utils._pair(m.kernel_size), nn.modules.utils._pair(m.stride or m.kernel_size)
        ok = k == st and nn.modules.utils._pair(m.padding) == (0, 0) and nn.modules.utils._pair(m.dilation) == (1, 1) and not m.ceil_mode
    if not ok:
        raise ValueError(
            f"saliency head: layer {name!r} ({m!r}) follows {where}; the exported saliency supports only chains of "
            f"{', '.join(t.__name__ for t in SUPPORTED_CHAIN_MODULES)} (max-pooling with stride = kernel, no padding; "
            "global average pooling only) after it. Choose another layer or export with saliency=False.")


def _run_chain(chain: Sequence[nn.Module], a: torch.Tensor) -> tuple[torch.Tensor, list[tuple[nn.Module, torch.Tensor, torch.Tensor]]]:
    """Run the chain (eval semantics) and keep (module, input, output) for the VJP."""
    saved = []
    h = a
    for m in chain:
        if isinstance(m, nn.Linear) and h.dim() > 2:
            saved.append((nn.Flatten(), h, h.flatten(1)))
            h = h.flatten(1)
        if isinstance(m, nn.Dropout):
            out = h  # eval mode
        elif isinstance(m, nn.BatchNorm1d):
            out = F.batch_norm(h, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
        else:
            out = m(h)
        saved.append((m, h, out))
        h = out
    return h, saved


def _vjp(saved: list[tuple[nn.Module, torch.Tensor, torch.Tensor]], g: torch.Tensor) -> torch.Tensor:
    """Gradient of ``sum(g * chain(a))`` w.r.t. ``a``, written as forward ops (what autograd would do)."""
    for m, inp, out in reversed(saved):
        if isinstance(m, nn.Linear):
            g = g @ m.weight
        elif isinstance(m, nn.ReLU):
            g = g * (out > 0).to(g.dtype)
        elif isinstance(m, nn.LeakyReLU):
            g = g * torch.where(inp > 0, torch.ones_like(inp), torch.full_like(inp, m.negative_slope))
        elif isinstance(m, nn.Flatten):
            g = g.reshape(inp.shape)
        elif isinstance(m, nn.BatchNorm1d):
            scale = torch.rsqrt(m.running_var + m.eps)
            if m.weight is not None:
                scale = scale * m.weight
            g = g * scale
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            h, w = inp.shape[-2], inp.shape[-1]
            g = (g / (h * w)).expand_as(inp)
        elif isinstance(m, Normalize):
            g = g / m.std
        elif isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            sh, sw = m.stride
            ph, pw = m.padding  # type: ignore[misc]
            dh, dw = m.dilation
            oph = inp.shape[-2] - ((out.shape[-2] - 1) * sh - 2 * ph + dh * (kh - 1) + 1)
            opw = inp.shape[-1] - ((out.shape[-1] - 1) * sw - 2 * pw + dw * (kw - 1) + 1)
            g = F.conv_transpose2d(g, m.weight, None, m.stride, m.padding, (oph, opw), m.groups, m.dilation)
        elif isinstance(m, nn.MaxPool2d):
            g = _maxpool_vjp(m, inp, out, g)
        # Dropout (eval) and Identity: the gradient passes unchanged
    return g


MAXPOOL_VJP = "slices"  # or "reshape": both exact; slices measured 2.2x faster in onnxruntime (benchmarks: 290 vs 654 ms)


def _maxpool_vjp(m: nn.MaxPool2d, inp: torch.Tensor, out: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Route ``g`` to the first position (row-major in its window) holding the window's max.

    As autograd does: flat image regions make ties common. "slices": one strided slice per
    window offset and elementwise ops; "reshape": Equal + CumSum on a window view. A MaxPool
    with indices + ScatterElements was slower still in onnxruntime (measured on the demo).
    """
    kh, kw = nn.modules.utils._pair(m.kernel_size)
    n, c, ho, wo = out.shape
    if MAXPOOL_VJP == "slices":
        taken = torch.zeros_like(out)
        parts = []
        for i in range(kh):
            for j in range(kw):
                eq = (inp[..., i: i + ho * kh: kh, j: j + wo * kw: kw] == out).to(g.dtype)
                first = eq * (1.0 - taken)
                taken = taken + first
                parts.append(g * first)
        gw = torch.stack(parts, -1).reshape(n, c, ho, wo, kh, kw).permute(0, 1, 2, 4, 3, 5).reshape(n, c, ho * kh, wo * kw)
    else:
        win = inp[..., : ho * kh, : wo * kw].reshape(n, c, ho, kh, wo, kw)
        eq = (win == out[:, :, :, None, :, None]).to(g.dtype)
        first_in_row = eq * (torch.cumsum(eq, dim=5) == 1).to(g.dtype)  # first max along the row
        row_has = first_in_row.sum(5, keepdim=True)  # 0 or 1
        rows_before = torch.cumsum(row_has, dim=3) - row_has  # rows above holding a max
        first = first_in_row * (rows_before == 0).to(g.dtype)
        gw = (first * g[:, :, :, None, :, None]).reshape(n, c, ho * kh, wo * kw)
    ph, pw = inp.shape[-2] - ho * kh, inp.shape[-1] - wo * kw
    return F.pad(gw, (0, pw, 0, ph)) if (ph or pw) else gw


def _window_share(attr: torch.Tensor, window: int) -> torch.Tensor:
    """As detectors.saliency.window_share: largest share of the map's mass in a window square."""
    a = attr.clamp_min(0).unsqueeze(1)
    w = min(window, a.shape[-1], a.shape[-2])
    pooled = F.avg_pool2d(a, w, stride=1) * (w * w)
    total = a.flatten(1).sum(1).clamp_min(1e-12)
    return pooled.flatten(1).amax(1) / total


def _topk_share(attr: torch.Tensor, frac: float) -> torch.Tensor:
    a = attr.clamp_min(0).flatten(1)
    k = max(1, int(round(frac * a.shape[1])))
    return torch.topk(a, k, dim=1).values.sum(1) / a.sum(1).clamp_min(1e-12)


class SaliencyHead(nn.Module):
    """Saliency (|d logit/d x|) or Grad-CAM of the top logit, and its concentration, in forward ops.

    Reproduces ``detectors.saliency.SaliencyConcentration`` for ``method="saliency"``
    (Captum ``Saliency(abs=True)``, channels summed) and ``method="gradcam"`` (Captum
    ``LayerGradCam(relu_attributions=True)`` upsampled bilinearly to the input), with
    ``reduce="window"`` (largest share of the map in a ``window x window`` square) or
    ``"topk"`` (share in the top ``topk`` fraction of pixels).

    Args:
        chain: the modules after the CAM layer, or after the input for "saliency"
            (from :func:`head_chain`).
        method: "saliency" or "gradcam".
        window, reduce, topk: as in ``SaliencyConcentration``.
        input_hw: (H, W) of the input, to upsample Grad-CAM maps to.
    """

    def __init__(self, chain: Sequence[nn.Module], *, method: str = "saliency", window: int = 8, reduce: str = "window",
                 topk: float = 0.05, input_hw: tuple[int, int] = (28, 28)) -> None:
        super().__init__()
        if method not in ("saliency", "gradcam"):
            raise ValueError(f"method must be 'saliency' or 'gradcam' for export; got {method!r}.")
        if reduce not in ("window", "topk"):
            raise ValueError(f"reduce must be 'window' or 'topk'; got {reduce!r}.")
        # the chain's modules belong to the model (the ExportHead registers them there): not
        # registered here, so that train()/eval() on this head never switches the model's Dropout
        self.chain: list[nn.Module] = list(chain)
        self.method, self.window, self.reduce, self.topk = method, int(window), reduce, float(topk)
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))

    def run(self, a: torch.Tensor) -> tuple[torch.Tensor, list[tuple[nn.Module, torch.Tensor, torch.Tensor]]]:
        """The chain's forward from ``a``: (logits, saved activations for the VJP)."""
        return _run_chain(self.chain, a)

    def attribution(self, a: torch.Tensor, cls: torch.Tensor, run: tuple[torch.Tensor, list] | None = None) -> torch.Tensor:
        """(N, H, W) non-negative attribution map of class ``cls`` at ``a`` (the input or CAM layer)."""
        logits, saved = run if run is not None else _run_chain(self.chain, a)
        g = F.one_hot(cls.long(), logits.shape[1]).to(a.dtype)
        grad = _vjp(saved, g)
        if self.method == "saliency":
            return grad.abs().sum(1)
        cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True))
        return F.interpolate(cam, self.input_hw, mode="bilinear").clamp_min(0).sum(1)

    def forward(self, a: torch.Tensor, cls: torch.Tensor, run: tuple[torch.Tensor, list] | None = None) -> torch.Tensor:
        attr = self.attribution(a, cls, run)
        return _window_share(attr, self.window) if self.reduce == "window" else _topk_share(attr, self.topk)


class KNNRankHead(nn.Module):
    """Mean kNN distance and Sabour's rank within the predicted class, as ``detectors.knn.KNNRank``.

    ``rank = #(ref_c <= d) / count_c + relu(d - max ref_c) / spread_c`` for predicted class c
    (clamped to the classes of the bank, as the detector does), ``d`` the mean of the k
    smallest distances.
    """

    def __init__(self, k: int, ref: torch.Tensor, counts: torch.Tensor, spread: torch.Tensor, score: str = "rank") -> None:
        super().__init__()
        if score not in ("rank", "distance"):
            raise ValueError(f"score must be 'rank' or 'distance'; got {score!r}.")
        self.k, self.score = int(k), score
        counts = counts.long()
        self.register_buffer("ref", ref.detach().float())
        self.register_buffer("counts", counts.clamp_min(1).float())
        self.register_buffer("top", ref.float().gather(1, (counts - 1).clamp_min(0)[:, None]).squeeze(1))
        self.register_buffer("spread", spread.detach().float())

    def forward(self, dist: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean distance (N,), score (N,)) from the sorted distances ``dist`` (N, >= k)."""
        d = dist[:, : self.k].mean(1)
        if self.score == "distance":
            return d, d
        c = pred.long().clamp(0, self.ref.shape[0] - 1)
        below = (self.ref[c] <= d[:, None]).to(d.dtype).sum(1) / self.counts[c]
        return d, below + (d - self.top[c]).clamp_min(0.0) / self.spread[c]


class KNNConsistencyHead(nn.Module):
    """Share of the k nearest neighbours (over several layers) whose label differs from the prediction.

    As ``detectors.knn.KNNConsistency`` (Papernot & McDaniel 2018, Deep k-NN): the neighbour
    indices come from the TopK of each layer's bank; a tie in similarity may order indices
    differently than FAISS (a label can differ only between exactly equidistant rows).
    """

    def __init__(self, k: int, labels: torch.Tensor) -> None:
        super().__init__()
        self.k = int(k)
        self.register_buffer("labels", labels.detach().long())

    def forward(self, idx: Sequence[torch.Tensor], pred: torch.Tensor) -> torch.Tensor:
        per_layer = [(self.labels[i[:, : self.k]] != pred.long()[:, None]).float().mean(1) for i in idx]
        return torch.stack(per_layer, 1).mean(1)


class CombinedHead(nn.Module):
    """As ``detectors.combined.Combined``: max over detectors of -log10 of the clean p-value + tail.

    ``p_k = (1 + #{clean_k >= s_k}) / (n_k + 1)`` against the stored sorted clean scores
    (conformal p-value), plus ``relu(s_k - max clean_k) / scale_k``; NaN scores count as +inf
    (fail closed).
    """

    def __init__(self, ref: torch.Tensor, counts: torch.Tensor, top: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("ref", ref.detach().float())
        self.register_buffer("pad", (ref.shape[1] - counts.long()).float())
        self.register_buffer("denom", counts.float() + 1.0)
        self.register_buffer("top", top.detach().float())
        self.register_buffer("scale", scale.detach().float())

    def forward(self, scores: Sequence[torch.Tensor]) -> torch.Tensor:
        cols = []
        for i, s in enumerate(scores):
            s = torch.where(torch.isnan(s), torch.full_like(s, float("inf")), s)
            ge = (self.ref[i][None, :] >= s[:, None]).to(s.dtype).sum(1) - self.pad[i]
            p = (1.0 + ge) / self.denom[i]
            cols.append(-torch.log10(p) + (s - self.top[i]).clamp_min(0.0) / self.scale[i])
        return torch.stack(cols, 1).amax(1)


class ExportHead(nn.Module):
    """The model and its detector heads as one module returning a tuple of named outputs.

    Args:
        model: the classifier (images in [0, 1] -> logits); used in eval mode, not modified.
        reject_index: index of the reject class of a hardened model (None: not hardened).
        banks: key -> (layer, KNNHead): one MatMul + TopK per stored bank, shared by the kNN
            rank parts and the kNN consistency layers that use the same bank.
        knn: list of (bank key, KNNRankHead): the KNNRank parts; ``knn_score`` is their max.
        knn_consistency: (bank keys, KNNConsistencyHead).
        ppca: (layer, PPCAHead).
        saliency: (layer or None for the input, SaliencyHead).
        squeeze_bits: feature squeezing (``detectors.squeeze.BitDepthSqueeze``, Xu et al. 2018):
            a second forward pass on ``round(x (2^b - 1)) / (2^b - 1)``; the score is the L1
            distance between the two softmaxes.
        thresholds: detector kind -> calibrated threshold; a flag is ``not score <= threshold``
            (so a NaN score flags, fail closed), as ``Detector.predict_scores``. A hardened
            model's "reject" flag is ``pred == reject_index`` (what its ``predict`` maps to -1).
        combined: (kinds, CombinedHead): the combined score of the named scores.
        flag_from: the flag names whose OR is the ``flag`` output (default: "combined" and
            "reject" where present, else every flag).

    ``output_names`` lists the outputs in order: ``logits``, ``pred``, then as available
    ``reject_prob``, ``knn_topk`` (N, P, k) distances ascending per rank part, ``knn_distance``
    (N, P), ``knn_score``, ``knn_consistency_score``, ``ppca_loglik``, ``ppca_score``,
    ``saliency_score``, ``squeeze_score``, ``combined_score``, ``flags`` (N, F) bool in the order of
    ``flag_names``, and ``flag`` (N,) bool.
    """

    KINDS = ("reject", "knn", "knn_consistency", "ppca", "saliency", "squeeze", "combined")

    def __init__(
        self,
        model: nn.Module,
        *,
        reject_index: int | None = None,
        banks: dict[str, tuple[str, KNNHead]] | None = None,
        knn: Sequence[tuple[str, KNNRankHead]] = (),
        knn_consistency: tuple[Sequence[str], KNNConsistencyHead] | None = None,
        ppca: tuple[str, PPCAHead] | None = None,
        saliency: tuple[str | None, SaliencyHead] | None = None,
        squeeze_bits: int | None = None,
        thresholds: dict[str, float] | None = None,
        combined: tuple[Sequence[str], CombinedHead] | None = None,
        flag_from: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.reject_index = reject_index
        banks = dict(banks or {})
        self.bank_layers = {k: v[0] for k, v in banks.items()}
        self.banks = nn.ModuleDict({k: v[1] for k, v in banks.items()})
        self.knn_keys = [k for k, _ in knn]
        self.knn = nn.ModuleList([h for _, h in knn])
        self.cons_keys = list(knn_consistency[0]) if knn_consistency else []
        self.cons = knn_consistency[1] if knn_consistency else None
        for key in self.knn_keys + self.cons_keys:
            if key not in self.banks:
                raise ValueError(f"bank {key!r} is used but not given; banks: {sorted(self.banks)}.")
        self.ppca_layer = ppca[0] if ppca else None
        self.ppca = ppca[1] if ppca else None
        self.saliency_layer = saliency[0] if saliency else None
        self.saliency = saliency[1] if saliency else None
        self.squeeze_bits = squeeze_bits
        self.combined_names = list(combined[0]) if combined else []
        self.combined = combined[1] if combined else None
        self.feature_prefix = ""  # "model." once the backbone is wrapped (float16)
        names = ["logits", "pred"]
        if reject_index is not None:
            names.append("reject_prob")
        if len(self.knn):
            names += ["knn_topk", "knn_distance", "knn_score"]
        if self.cons is not None:
            names.append("knn_consistency_score")
        if self.ppca is not None:
            names += ["ppca_loglik", "ppca_score"]
        if self.saliency is not None:
            names.append("saliency_score")
        if squeeze_bits is not None:
            names.append("squeeze_score")
        if combined is not None:
            names.append("combined_score")
        thresholds = {k: float(v) for k, v in (thresholds or {}).items() if k != "reject"}
        self.flag_names = [n for n in self.KINDS if n in thresholds or (n == "reject" and reject_index is not None)]
        self.thresholds = thresholds
        if flag_from is None:
            flag_from = [n for n in ("combined", "reject") if n in self.flag_names] or list(self.flag_names)
        unknown = [n for n in flag_from if n not in self.flag_names]
        if unknown:
            raise ValueError(f"flag_from names {unknown} have no threshold; flags are {self.flag_names}.")
        self.flag_from = list(flag_from)
        if self.flag_names:
            names += ["flags", "flag"]
        self.output_names = names

    def layers(self) -> list[str]:
        named = [*self.bank_layers.values(), self.ppca_layer, self.saliency_layer]
        return list(dict.fromkeys(n for n in named if n is not None))

    def share_forward(self, example: torch.Tensor) -> bool:
        """Reuse the input-saliency chain's forward pass for the logits and features.

        Finds, on ``example``, which saved activation of the chain equals each needed layer's
        output (and that the chain's logits equal the model's); afterwards one forward pass
        serves the model, the feature heads and the saliency VJP. Returns False (and changes
        nothing) when that does not hold exactly.
        """
        if self.saliency is None or self.saliency_layer is not None or self.feature_prefix:
            return False
        raw: dict[str, torch.Tensor] = {}
        with torch.no_grad(), eval_mode(self.model), _capture(self.model, self.layers(), raw):
            logits = self.model(example)
            chain_logits, saved = self.saliency.run(example)
        if not torch.equal(chain_logits, logits):
            return False
        where: dict[str, int] = {}
        for name in self.layers():
            hit = [j for j, (_, _, o) in enumerate(saved) if o.shape == raw[name].shape and torch.equal(o, raw[name])]
            if not hit:
                return False
            where[name] = hit[0]
        self.shared_features = where
        return True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        run = None
        if getattr(self, "shared_features", None) is not None:
            run = self.saliency.run(x.float())  # type: ignore[union-attr]
            logits = run[0].float()
            store = {n: run[1][j][2].float() for n, j in self.shared_features.items()}
        else:
            raw: dict[str, torch.Tensor] = {}
            with _capture(self.model, [self.feature_prefix + n for n in self.layers()], raw):
                logits = self.model(x).float()
            store = {n: raw[self.feature_prefix + n].float() for n in self.layers()}
        pred = logits.argmax(1)
        out: dict[str, torch.Tensor] = {"logits": logits, "pred": pred}
        scores: dict[str, torch.Tensor] = {}
        if self.reject_index is not None:
            out["reject_prob"] = scores["reject"] = torch.softmax(logits, 1)[:, self.reject_index]
        near = {key: self.banks[key](store[layer]) for key, layer in self.bank_layers.items()}
        if len(self.knn):
            parts = [h(near[key][0], pred) for key, h in zip(self.knn_keys, self.knn)]
            k = min(h.k for h in self.knn)
            out["knn_topk"] = torch.stack([near[key][0][:, :k] for key in self.knn_keys], 1)
            out["knn_distance"] = torch.stack([p[0] for p in parts], 1)
            out["knn_score"] = scores["knn"] = torch.stack([p[1] for p in parts], 1).amax(1)
        if self.cons is not None:
            out["knn_consistency_score"] = scores["knn_consistency"] = self.cons([near[key][1] for key in self.cons_keys], pred)
        if self.ppca is not None:
            ll = self.ppca(store[self.ppca_layer], pred)
            out["ppca_loglik"] = ll
            out["ppca_score"] = scores["ppca"] = -ll
        if self.saliency is not None:
            a = x.float() if self.saliency_layer is None else store[self.saliency_layer]
            out["saliency_score"] = scores["saliency"] = self.saliency(a, pred, run)
        if self.squeeze_bits is not None:
            levels = float(2 ** self.squeeze_bits - 1)
            sq = self.model(torch.round(x * levels) / levels).float()
            out["squeeze_score"] = scores["squeeze"] = (torch.softmax(logits, 1) - torch.softmax(sq, 1)).abs().sum(1)
        if self.combined_names:
            out["combined_score"] = scores["combined"] = self.combined([scores[n] for n in self.combined_names])
        if self.flag_names:
            flags = torch.stack([pred == self.reject_index if n == "reject" else ~(scores[n] <= self.thresholds[n])
                                 for n in self.flag_names], 1)
            out["flags"] = flags
            idx = [self.flag_names.index(n) for n in self.flag_from]
            out["flag"] = flags[:, idx].any(1) if idx else torch.zeros_like(pred, dtype=torch.bool)
        return tuple(out[n] for n in self.output_names)
