"""Nearest-neighbour search over a feature bank (FAISS): exact, IVF-Flat or IVF-PQ, CPU or GPU, shared.

:class:`BankIndex` is what the kNN detectors (:mod:`guard.detectors.knn`) search at serving
time. Three things here are about production size (issue 15):

* **One copy of a bank.** Exact search calls :func:`faiss.knn` on the bank itself instead of
  copying it into an ``IndexFlat`` (the same FAISS kernel, without the second copy), and
  :func:`shared_index` hands every detector that asks for an index over an equal bank with the
  same settings the same :class:`BankIndex` (and, with other settings, the same bank tensor).
  ``KNNRank`` and ``KNNConsistency`` on the same layers, or a ResNet's pooled ``layer4`` and its
  ``fc:input`` (equal vectors), then hold one bank and one index, not two of each. The pool
  holds weak references: an index lives as long as a detector uses it.
* **Approximate search above a size**, with recall measured on real features
  (``benchmarks/scale/knn_bank.py``; BENCHMARKS.md "Production scale (issue 15)").
* **GPU.** ``device="cuda"`` searches on the GPU (``faiss.knn_gpu`` for exact search,
  ``faiss.index_cpu_to_gpu`` for IVF) when FAISS was built with GPU support (the ``[gpu]``
  extra) and sees a device; strict as the ONNX session is: a GPU asked for and not there raises
  :class:`FaissDeviceError`, ``device="auto"`` takes the GPU when there is one and records which
  it used (:attr:`BankIndex.device_used`).
"""

from __future__ import annotations

import math
import threading
import weakref
from typing import Any

import numpy as np
import torch

__all__ = [
    "BankIndex",
    "FaissDeviceError",
    "shared_index",
    "shared_bank",
    "cat_shared",
    "build_index",
    "knn_search",
    "exact_distances",
    "ivf_nlist",
    "pq_subquantizers",
    "faiss_gpus",
    "INDEX_KINDS",
    "LARGE_BANK_INDEX",
    "SEARCH_DEVICES",
]

#: Index kinds of :class:`BankIndex` ("auto": exact below ``ivf_min_bank`` rows, then :data:`LARGE_BANK_INDEX`).
INDEX_KINDS = ("auto", "flat", "ivf_flat", "ivf_pq")
#: The approximate index of a large bank (chosen in BENCHMARKS.md, "Production scale (issue 15)").
LARGE_BANK_INDEX = "ivf_flat"
#: A search of at most this many queries is remembered for the next identical one (:meth:`BankIndex.search`).
MEMO_ROWS = 4096
#: Where a :class:`BankIndex` searches: "auto" (the GPU when FAISS sees one, else the CPU), "cpu", "cuda".
SEARCH_DEVICES = ("auto", "cpu", "cuda")


class FaissDeviceError(RuntimeError):
    """``device="cuda"`` was asked of a FAISS search that cannot run on a GPU here."""


def faiss_gpus() -> int:
    """GPUs this FAISS build can use (0 for faiss-cpu, or a GPU build without a visible device)."""
    import faiss

    try:
        return int(faiss.get_num_gpus()) if hasattr(faiss, "StandardGpuResources") else 0
    except Exception:  # noqa: BLE001 - a GPU build without a driver raises here: no GPU
        return 0


_GPU_RES: list[Any] = []
_GPU_LOCK = threading.Lock()


def _gpu_resources() -> Any:
    """One ``StandardGpuResources`` (scratch memory, streams) for every index of the process."""
    import faiss

    with _GPU_LOCK:
        if not _GPU_RES:
            _GPU_RES.append(faiss.StandardGpuResources())
        return _GPU_RES[0]


def ivf_nlist(m: int) -> int:
    """Inverted lists for an IVF index over ``m`` rows: ``4 * sqrt(m)``, at most m / 39.

    The low end of FAISS's guide (4 to 16 sqrt(m)). Measured on a 1M x 512 bank of real-shaped
    features (``benchmarks/scale/knn_bank.py``, BENCHMARKS.md "Production scale (issue 15)"), with
    ``nprobe=16``: 4,000 lists answer 91x as many queries per second as scikit-learn's brute
    force at recall@10 0.955; 2,000 lists (the rule before) 47x at 0.951. The price is the
    build: 145 s instead of 55 s of coarse k-means on one core.
    """
    return max(1, min(int(4 * math.sqrt(m)), m // 39))  # FAISS wants >= 39 training points per list


def pq_subquantizers(d: int) -> int:
    """PQ sub-quantizers for width ``d``: the largest divisor of d that is at most ``max(1, d // 4)`` (4 dims each).

    At 8 dims each (d / 8) an IVF-PQ search kept only 0.87 of the true 10 neighbours on real
    512-d features even after an exact re-rank of 10 k candidates (``benchmarks/scale/knn_bank.py``,
    part 1), hence 4; on the 1M-row bank even that kept 0.66, so IVF-PQ is not the default.
    """
    return max(m for m in range(1, max(1, d // 4) + 1) if d % m == 0)


def _metric_type(metric: str) -> int:
    import faiss

    return faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2


def build_index(
    bank: torch.Tensor,
    metric: str,
    *,
    ivf_min_bank: int = 200_000,
    nprobe: int = 16,
    seed: int = 0,
    kind: str = "ivf_flat",
    nlist: int | None = None,
) -> Any:
    """A FAISS index over ``bank`` rows (already normalised for cosine).

    Exact flat search up to ``ivf_min_bank`` rows (an ``IndexFlat``, a copy of the bank: for
    one-off searches; :class:`BankIndex` searches exactly without the copy); above that an IVF
    index (``kind``: "ivf_flat" or "ivf_pq") with ``nlist`` lists (default :func:`ivf_nlist`), its coarse k-means
    (10 iterations) trained on 39 points per list (at least 9,984 for PQ's 256 codes); "ivf_pq"
    stores 8-bit codes of :func:`pq_subquantizers` sub-vectors, each codebook trained on at most
    64 points per code, and no raw rows (:class:`BankIndex` re-ranks its candidates exactly from
    the bank).
    """
    import faiss

    d = int(bank.shape[1])
    data = np.ascontiguousarray(bank.numpy(), dtype=np.float32)
    flat = faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
    if bank.shape[0] < ivf_min_bank or kind == "flat":
        for i in range(0, data.shape[0], 65536):
            flat.add(data[i : i + 65536])
        return flat
    nlist = ivf_nlist(int(bank.shape[0])) if nlist is None else max(1, min(int(nlist), int(bank.shape[0]) // 39))
    mt = _metric_type(metric)
    if kind == "ivf_pq":
        index = faiss.IndexIVFPQ(flat, d, nlist, pq_subquantizers(d), 8, mt)
        index.pq.cp.max_points_per_centroid = 64
        index.pq.cp.niter = 10
        index.pq.cp.seed = seed
        n_train = min(bank.shape[0], max(39 * nlist, 256 * 39))
    elif kind == "ivf_flat":
        index = faiss.IndexIVFFlat(flat, d, nlist, mt)
        n_train = min(bank.shape[0], 39 * nlist)
    else:
        raise ValueError(f"kind must be one of {INDEX_KINDS[1:]}; got {kind!r}.")
    index.cp.niter = 10
    index.cp.seed = seed  # the k-means seed (FAISS's default is fixed too; stated here)
    rng = np.random.default_rng(seed)
    index.train(data[np.sort(rng.choice(bank.shape[0], n_train, replace=False))])
    for i in range(0, data.shape[0], 65536):
        index.add(data[i : i + 65536])
    index.nprobe = nprobe  # (faiss's python wrapper keeps the quantizer alive with the index)
    return index


def _to_distances(sims: np.ndarray, idx: np.ndarray, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    sims_t = torch.from_numpy(np.ascontiguousarray(sims))
    dist = (1.0 - sims_t).clamp_min(0.0) if metric == "cosine" else sims_t.clamp_min(0.0).sqrt()
    return dist, torch.from_numpy(np.ascontiguousarray(idx)).long()


def knn_search(index: Any, queries: torch.Tensor, k: int, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances Tensor[N, k] (cosine: ``1 - cos``; l2: Euclidean) and indices Tensor[N, k]."""
    q = np.ascontiguousarray(queries.numpy(), dtype=np.float32)
    sims, idx = index.search(q, k)
    return _to_distances(sims, idx, metric)


def exact_distances(bank: torch.Tensor, queries: torch.Tensor, idx: torch.Tensor, metric: str) -> torch.Tensor:
    """Exact distances (N, k') of ``queries`` (N, D) to the bank rows ``idx`` (N, k') (-1: none, +inf)."""
    rows = bank[idx.clamp_min(0)]
    if metric == "cosine":
        dist = (1.0 - torch.einsum("nkd,nd->nk", rows, queries)).clamp_min(0.0)
    else:
        dist = ((rows - queries[:, None, :]) ** 2).sum(-1).clamp_min(0.0).sqrt()
    return torch.where(idx < 0, torch.full_like(dist, float("inf")), dist)


# -- the pool: one bank tensor and one index per distinct bank -----------------------------------

_POOL_LOCK = threading.Lock()
_BANKS: weakref.WeakValueDictionary[tuple, torch.Tensor] = weakref.WeakValueDictionary()
_INDEXES: weakref.WeakValueDictionary[tuple, BankIndex] = weakref.WeakValueDictionary()


def _fingerprint(bank: torch.Tensor) -> tuple:
    """A cheap key (shape, dtype, sums over a strided sample of 4,096 values); equality is then checked in full."""
    flat = bank.reshape(-1)
    step = max(1, flat.numel() // 4096)
    s = flat[::step][:4096].double()
    return (
        tuple(bank.shape),
        str(bank.dtype),
        float(s.sum()),
        float((s * s).sum()),
        float(flat[-1]) if flat.numel() else 0.0,
    )


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))


def shared_bank(bank: torch.Tensor) -> torch.Tensor:
    """``bank`` itself, or an equal bank tensor some detector already holds (then ``bank`` can be freed)."""
    if bank.requires_grad or not bank.is_contiguous():  # (detach() makes a new tensor object: only when needed)
        bank = bank.detach().contiguous()
    key = _fingerprint(bank)
    with _POOL_LOCK:
        hit = _BANKS.get(key)
        if hit is not None and _same(hit, bank):
            return hit
        _BANKS[key] = bank
        return bank


_CATS: list[tuple[tuple[Any, ...], Any]] = []


def cat_shared(chunks: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(chunks)``, made once for the same chunk objects (a second builder or layer holding
    the same pooled chunks gets the same bank tensor instead of a second copy), then pooled."""
    if len(chunks) == 1:
        return shared_bank(chunks[0])
    with _POOL_LOCK:
        for entry in list(_CATS):
            refs, res = entry
            out = res()
            alive = [w() for w in refs]
            if out is None or any(a is None for a in alive):
                _CATS.remove(entry)
                continue
            if len(alive) == len(chunks) and all(a is c for a, c in zip(alive, chunks)):
                return out
    out = shared_bank(torch.cat(chunks))
    with _POOL_LOCK:
        _CATS.append((tuple(weakref.ref(c) for c in chunks), weakref.ref(out)))
    return out


def shared_index(
    bank: torch.Tensor,
    metric: str,
    *,
    kind: str = "auto",
    ivf_min_bank: int = 200_000,
    nprobe: int = 16,
    rerank: int = 10,
    seed: int = 0,
    device: str = "auto",
    serialized: torch.Tensor | None = None,
) -> BankIndex:
    """The :class:`BankIndex` over an equal bank with the same settings if one is alive, else a new one.

    The bank tensor itself is shared too (:func:`shared_bank`): use ``index.bank`` afterwards,
    not the tensor passed in. A ``serialized`` index is only read when no equal index is alive
    (an equal bank and the same settings train the same index).
    """
    bank = shared_bank(bank)
    key = (_fingerprint(bank), id(bank), metric, kind, int(ivf_min_bank), int(nprobe), int(rerank), int(seed), device)
    with _POOL_LOCK:
        hit = _INDEXES.get(key)
        if hit is not None and hit.bank is bank:
            return hit
    index = BankIndex(
        bank,
        metric,
        kind=kind,
        ivf_min_bank=ivf_min_bank,
        nprobe=nprobe,
        rerank=rerank,
        seed=seed,
        device=device,
        serialized=serialized,
    )
    with _POOL_LOCK:
        return _INDEXES.setdefault(key, index)


class BankIndex:
    """Nearest neighbours in a feature bank: FAISS exact search up to a size, approximate above it.

    Args:
        bank: (M, D) rows, unit rows for cosine (the detector keeps it: the exported graph
            and the exact re-rank read it; exact search reads it in place, without a copy).
        metric: "cosine" or "l2".
        kind: "flat" (exact), "ivf_flat", "ivf_pq", or "auto": exact below ``ivf_min_bank``
            rows, else :data:`LARGE_BANK_INDEX`.
        ivf_min_bank, nprobe, seed, nlist: as :func:`build_index`.
        rerank: an "ivf_pq" search asks FAISS for ``rerank * k`` candidates by their PQ codes
            and keeps the k nearest by exact distance to the bank rows (FAISS's
            ``IndexRefineFlat`` does the same with a second copy of the bank; this reads the
            bank the detector already holds).
        device: "auto" (the GPU when FAISS sees one), "cpu" or "cuda" (raises
            :class:`FaissDeviceError` when FAISS has no GPU here: faiss-cpu, no device, or an
            index the GPU cannot hold).
        serialized: a FAISS index written by :meth:`serialize` (uint8 tensor), loaded instead of
            training again.

    The recall of the approximate kinds against exact search, on real features, is measured by
    ``benchmarks/scale/knn_bank.py`` (BENCHMARKS.md, "Production scale (issue 15)").
    """

    def __init__(
        self,
        bank: torch.Tensor,
        metric: str,
        *,
        kind: str = "auto",
        ivf_min_bank: int = 200_000,
        nprobe: int = 16,
        rerank: int = 10,
        seed: int = 0,
        device: str = "auto",
        serialized: torch.Tensor | None = None,
        nlist: int | None = None,
    ) -> None:
        import faiss

        if kind not in INDEX_KINDS:
            raise ValueError(f"kind must be one of {INDEX_KINDS}; got {kind!r}.")
        if device not in SEARCH_DEVICES:
            raise ValueError(f"device must be one of {SEARCH_DEVICES}; got {device!r}.")
        if bank.requires_grad or bank.dtype != torch.float32 or not bank.is_contiguous() or bank.device.type != "cpu":
            bank = bank.detach().float().contiguous().cpu()
        self.bank, self.metric, self.rerank = bank, metric, int(rerank)
        self._rows = bank.numpy()  # a view: exact search reads the bank in place
        self.kind = kind if kind != "auto" else ("flat" if bank.shape[0] < ivf_min_bank else LARGE_BANK_INDEX)
        self.index: Any = None
        if serialized is not None and self.kind != "flat":
            self.index = faiss.deserialize_index(np.ascontiguousarray(serialized.numpy(), dtype=np.uint8))
            if self.index.ntotal != bank.shape[0] or self.index.d != bank.shape[1]:
                raise ValueError(
                    f"the saved FAISS index holds {self.index.ntotal} rows of width {self.index.d}; the bank "
                    f"{tuple(bank.shape)}."
                )
            self.index.nprobe = nprobe
            self.kind = (
                "ivf_pq"
                if isinstance(self.index, faiss.IndexIVFPQ)
                else "ivf_flat"
                if isinstance(self.index, faiss.IndexIVFFlat)
                else "flat"
            )
        elif self.kind != "flat":
            self.index = build_index(
                bank, metric, ivf_min_bank=0, nprobe=nprobe, seed=seed, kind=self.kind, nlist=nlist
            )
        self.device_requested = device
        self.device_used = "cpu"
        self.notes: list[str] = []
        self._gpu_index: Any = None
        self._memo: tuple[torch.Tensor, tuple, torch.Tensor, torch.Tensor] | None = None
        gpus = faiss_gpus()
        if device == "cuda" and gpus == 0:
            raise FaissDeviceError(
                "device='cuda' was asked of the kNN search but this FAISS build sees no GPU "
                "(faiss-cpu, or no CUDA device visible); install the 'gpu' extra on a machine with an "
                "NVIDIA GPU, or pass device='auto' or 'cpu'."
            )
        if device != "cpu" and gpus > 0:
            self._to_gpu(faiss, strict=device == "cuda")

    def _to_gpu(self, faiss: Any, strict: bool) -> None:
        if self.index is None:  # exact search: faiss.knn_gpu over the host bank, per call
            self.device_used = "cuda"
            return
        try:
            self._gpu_index = faiss.index_cpu_to_gpu(_gpu_resources(), 0, self.index)
            self._gpu_index.nprobe = self.index.nprobe
            self.device_used = "cuda"
        except Exception as err:  # noqa: BLE001 - e.g. IVF-PQ sub-quantizer counts the GPU kernels lack
            msg = f"the {self.kind} index could not move to the GPU ({type(err).__name__}: {err})"
            if strict:
                raise FaissDeviceError(msg + "; pass device='auto' to search it on the CPU.") from err
            self.notes.append(msg + "; searching on the CPU.")

    @property
    def approximate(self) -> bool:
        return self.kind != "flat"

    def serialize(self) -> torch.Tensor | None:
        """The trained FAISS index as a uint8 tensor (None for exact search: rebuilt from the bank)."""
        import faiss

        return None if not self.approximate else torch.from_numpy(faiss.serialize_index(self.index).copy())

    def _search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        import faiss

        q = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        if self.index is None:
            if self.device_used == "cuda":
                sims, idx = faiss.knn_gpu(_gpu_resources(), q, self._rows, k, metric=_metric_type(self.metric))
            else:
                sims, idx = faiss.knn(q, self._rows, k, metric=_metric_type(self.metric))
        else:
            sims, idx = (self._gpu_index if self._gpu_index is not None else self.index).search(q, k)
        return _to_distances(sims, idx, self.metric)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, k) distances ascending and bank indices, as :func:`knn_search`.

        The last serving-size search (at most :data:`MEMO_ROWS` queries) is remembered: the
        same queries with the same k again (two detectors on one pooled index, or two layers
        with equal features, in one scoring pass) get its answer without searching twice.
        Equal means equal values (``torch.equal``), so a remembered answer is always the answer.
        """
        k = min(int(k), int(self.bank.shape[0]))
        q = queries.detach().float().cpu().contiguous()
        key = (k, self.rerank, getattr(self.index, "nprobe", None), self.device_used)  # settings changed: search again
        memo = self._memo
        if (
            memo is not None
            and q.shape[0] <= MEMO_ROWS
            and memo[1] == key
            and memo[0].shape == q.shape
            and torch.equal(memo[0], q)
        ):
            return memo[2].clone(), memo[3].clone()
        d, i = self._search_all(q, k)
        if q.shape[0] <= MEMO_ROWS:
            self._memo = (q.clone(), key, d.clone(), i.clone())  # one tuple: replaced whole, safe across threads
        return d, i

    def self_neighbours(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The bank searched against itself, ``k`` neighbours per row (the fit's leave-one-out search).

        Kept on the index after the first call: detectors and layers that share this index
        (:func:`shared_index`) fit from one search of the bank, not one each.
        """
        k = min(int(k), int(self.bank.shape[0]))
        hit = self.__dict__.get("_self_nn")
        if hit is None or hit[0] != k:
            d, i = self._search_all(self.bank, k)
            hit = self._self_nn = (k, d, i)
        return hit[1], hit[2]

    def _search_all(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind != "ivf_pq" or self.rerank <= 1:
            return self._search(queries, k)
        kk = min(self.rerank * k, int(self.bank.shape[0]))
        out_d, out_i = [], []
        for i in range(0, queries.shape[0], 1024):  # the gathered rows take 1024 x kk x D floats
            q = queries[i : i + 1024]
            _, cand = self._search(q, kk)
            dist = exact_distances(self.bank, q.float(), cand, self.metric)
            d, j = torch.topk(dist, k, dim=1, largest=False, sorted=True)
            out_d.append(d)
            out_i.append(torch.where(torch.isfinite(d), cand.gather(1, j), torch.full_like(j, -1)))
        return torch.cat(out_d), torch.cat(out_i)
