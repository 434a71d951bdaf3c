"""Streamed data for :func:`guard.harden`: a Dataset, DataLoader or image folder read batch by batch.

A data set larger than memory (ImageNet's 1.2M images are 700+ GB as float32) cannot become the
one tensor that the fast path of ``harden`` shuffles. :class:`HardenStream` reads it instead:

- **one scan** when the run starts: the image count, the image shape and the largest label
  (the ``num_classes`` check), and, when there is a checkpoint, the "same data" digest,
  SHA-256 updated batch by batch over the images and then over the labels, which is
  byte for byte the digest of the tensor path (:func:`digest`), so a checkpoint written from
  tensors resumes from a Dataset of the same images and vice versa;
- **every epoch** (:meth:`HardenStream.epoch_batches`): a map-style Dataset (an image folder
  is one) is read in the epoch's seeded order, the very permutation the tensor path draws from
  ``(seed, round, epoch)``, reject images from the archive at the same places, so the
  hardened weights equal the tensor path's and a resumed run sees the same order; a
  DataLoader (or an IterableDataset) is read in its own order and batching, each batch
  followed by its share of reject images;
- **samples** (:meth:`HardenStream.sample`): the clean images a round's patch / PGD attacks
  start from are a seeded uniform sample (the rows :class:`guard.core.sampling.BottomK` keeps),
  read by index from a Dataset, in one pass from a DataLoader;
- **evaluation** (:func:`stream_accuracy`): the per-round clean accuracy streams ``test``.

Memory: one batch, the sample, the attack archive, and 9 bytes an image (labels and the
evaluation's hits), never the images.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Subset

from guard.core.data import image_folder, sample_stream, stream_batches
from guard.core.sampling import row_keys

__all__ = ["HardenStream", "digest", "epoch_order", "reject_picks", "stream_accuracy", "check_shardable"]


def _update(h: Any, t: torch.Tensor) -> None:
    h.update(t.detach().cpu().contiguous().numpy().tobytes())


def digest(tensors: Iterable[torch.Tensor]) -> str:
    """16 hex digits of SHA-256 over the bytes of each tensor in turn (the checkpoint's "same model / data" key)."""
    h = hashlib.sha256()
    for t in tensors:
        _update(h, t)
    return h.hexdigest()[:16]


def reject_picks(n_clean: int, archive_n: int, reject_share: float, gen: torch.Generator) -> torch.Tensor:
    """Which archive images join an epoch of ``n_clean`` clean ones, so that they are ``reject_share`` of it.

    Drawn uniformly from the whole archive: without replacement when it is large enough,
    otherwise repeated (the reject class neither swamps the clean ones nor vanishes).
    """
    n_rej = int(round(reject_share / (1.0 - reject_share) * n_clean)) if archive_n else 0
    if archive_n >= n_rej:
        return torch.randperm(archive_n, generator=gen)[:n_rej]
    return torch.randint(0, archive_n, (n_rej,), generator=gen)


def epoch_order(total: int, epoch_seed: int, rank: int, size: int) -> torch.Tensor:
    """This process's share of the epoch's shuffled positions (``DistributedSampler``; all of them with one process)."""
    sampler = DistributedSampler(range(total), num_replicas=size, rank=rank, shuffle=True, seed=epoch_seed % (2**31))
    return torch.tensor(list(sampler), dtype=torch.long)


def check_shardable(data: Any, name: str, size: int) -> None:
    """Under torchrun each process reads its ``DistributedSampler`` shard by index: a DataLoader cannot be sharded."""
    if size > 1 and isinstance(data, HardenStream) and not data.map_style:
        raise ValueError(
            f"{name}: a DataLoader or IterableDataset cannot be split across the {size} processes of torchrun "
            "(each would train on all of it); pass a map-style Dataset or an image folder (each process "
            "reads its shard by index) or (x, y) tensors."
        )


class _Lists:
    """A batch sampler over given index lists (a DataLoader reads each list as one batch)."""

    def __init__(self, lists: Callable[[], Iterator[list[int]]], n: int) -> None:
        self.lists, self.n = lists, n

    def __iter__(self) -> Iterator[list[int]]:
        return self.lists()

    def __len__(self) -> int:
        return self.n


class HardenStream:
    """A clean-image stream for :func:`guard.harden`, read batch by batch, never whole.

    Args:
        data: a Dataset, a DataLoader or an image-folder path.
        name: the argument's name for error messages (``"data"``, ``"test"``).
        batch_size: the batch a Dataset is read in (a DataLoader keeps its own).

    :meth:`scan` must run before :meth:`epoch_batches` and :meth:`sample` (they need the count).
    """

    def __init__(self, data: Any, name: str, batch_size: int) -> None:
        if isinstance(data, (str, os.PathLike)):
            data = image_folder(data, name)
        self.data, self.name, self.batch_size = data, name, int(batch_size)
        self.map_style = (
            isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__")
        )
        self.n = 0
        self.image_shape: tuple[int, ...] = ()
        self.ymax = -1
        self.digest: str | None = None

    def __len__(self) -> int:
        return self.n

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Checked ``(x, y)`` batches in stream order (index order for a Dataset)."""
        return stream_batches(self.data, self.batch_size, self.name)

    def scan(self, *, with_digest: bool) -> HardenStream:
        """One pass: count, image shape, largest label and (``with_digest``) the digest of :func:`digest` ``([x, y])``."""
        h = hashlib.sha256() if with_digest else None
        labels, shape, n = [], None, 0
        for xb, yb in self.batches():
            if shape is None:
                shape = tuple(xb.shape[1:])
            elif tuple(xb.shape[1:]) != shape:
                raise ValueError(
                    f"{self.name}: its images differ in shape ({shape} and then {tuple(xb.shape[1:])}); "
                    "resize them to one size (an image folder: a transforms.Resize)."
                )
            if h is not None:
                _update(h, xb)
            labels.append(yb.cpu())
            n += int(xb.shape[0])
        y = torch.cat(labels)
        if h is not None:
            _update(h, y)
            self.digest = h.hexdigest()[:16]
        self.n, self.image_shape, self.ymax = n, shape or (), int(y.max())
        return self

    def sample(self, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A seeded uniform sample of ``min(k, n)`` images and labels, in stream order.

        The rows with the ``k`` smallest :func:`guard.core.sampling.row_keys`: what
        :class:`~guard.core.sampling.BottomK` keeps of the stream, read by index from a Dataset
        (only those rows are read) and in one pass from a DataLoader. With ``k >= n``: all of
        them, in order (then the tensor path's draws from its pool are reproduced exactly).
        """
        if self.map_style:
            if k >= self.n:
                idx = np.arange(self.n)
            else:
                keys = row_keys(0, self.n, seed)
                idx = np.sort(np.argpartition(keys, k - 1)[:k])
            xs, ys = zip(*stream_batches(Subset(self.data, idx.tolist()), self.batch_size, self.name))
            return torch.cat(xs), torch.cat(ys)
        return sample_stream(self.data, k, self.batch_size, self.name, seed=seed)

    def epoch_batches(
        self,
        archive_x: torch.Tensor,
        n: int,
        reject_share: float,
        gen: torch.Generator,
        epoch_seed: int,
        rank: int,
        size: int,
        local_bs: int,
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """One epoch's ``(offset, x, y, is_clean)`` batches: every clean image once plus the reject share.

        A Dataset: the tensor path's order and batches exactly (:func:`epoch_order` over the
        clean images followed by the :func:`reject_picks`), the clean rows of each batch read
        by index. A DataLoader: its batches in its order, each followed by the reject images
        that keep the running share (their total is the tensor path's).
        """
        picks = reject_picks(self.n, int(archive_x.shape[0]), reject_share, gen)
        if self.map_style:
            return self._dataset_epoch(
                archive_x, picks, n, epoch_order(self.n + picks.numel(), epoch_seed, rank, size), local_bs
            )
        return self._loader_epoch(archive_x, picks, n, reject_share)

    def _dataset_epoch(
        self, archive_x: torch.Tensor, picks: torch.Tensor, n: int, order: torch.Tensor, local_bs: int
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        starts = range(0, order.numel(), local_bs)

        def clean_lists() -> Iterator[list[int]]:
            for i in starts:
                idx = order[i : i + local_bs]
                if bool((idx < self.n).any()):
                    yield idx[idx < self.n].tolist()

        n_lists = int(torch.unique(torch.nonzero(order < self.n).flatten() // local_bs).numel())
        loader = DataLoader(self.data, batch_sampler=_Lists(clean_lists, n_lists), generator=torch.Generator())
        reads = stream_batches(loader, 1, self.name)
        for i in starts:
            idx = order[i : i + local_bs]
            clean = idx < self.n
            xb = torch.empty((idx.numel(), *self.image_shape))
            yb = torch.full((idx.numel(),), n, dtype=torch.long)
            if bool(clean.any()):
                cx, cy = next(reads)
                xb[clean], yb[clean] = cx, cy
            if not bool(clean.all()):
                xb[~clean] = archive_x[picks[idx[~clean] - self.n]]
            yield i, xb, yb, clean

    def _loader_epoch(
        self, archive_x: torch.Tensor, picks: torch.Tensor, n: int, reject_share: float
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        ratio = reject_share / (1.0 - reject_share)
        seen = used = offset = 0
        for cx, cy in self.batches():
            b = int(cx.shape[0])
            r = min(int(round(ratio * (seen + b))), picks.numel()) - used if picks.numel() else 0
            take = picks[torch.arange(used, used + r)] if r > 0 else picks[:0]
            xb = torch.cat([cx, archive_x[take]])
            yb = torch.cat([cy, torch.full((take.numel(),), n, dtype=torch.long)])
            clean = torch.cat([torch.ones(b, dtype=torch.bool), torch.zeros(take.numel(), dtype=torch.bool)])
            yield offset, xb, yb, clean
            seen, used, offset = seen + b, used + take.numel(), offset + b + take.numel()


def stream_accuracy(
    predict: Callable[[torch.Tensor], torch.Tensor], held: HardenStream, n: int, head: str
) -> tuple[float, float]:
    """(accuracy, share predicted as reject ``n``) over ``held``, batch by batch; a rejected image is an error.

    Computed as the tensor path computes it (the mean of a float32 tensor of hits), so the two
    agree exactly on the same images; a label ``>= n`` raises ValueError naming the stream.
    """
    hits, rejected = [], []
    for xb, yb in held.batches():
        if int(yb.max()) >= n:
            raise ValueError(
                f"num_classes mismatch: the labels of {held.name} go up to {int(yb.max())} but the head {head!r} "
                f"has {n} outputs."
            )
        pred = predict(xb).cpu()
        hits.append(pred == yb)
        rejected.append(pred == n)
    return float(torch.cat(hits).float().mean()), float(torch.cat(rejected).float().mean())
