"""Seeded subsamples of a stream that do not depend on how the stream is batched.

A fit that reads its data batch by batch cannot ``randperm`` the whole set, and a sample drawn
per batch changes when the batch size does. Here every row gets a key from its position in the
stream (SplitMix64 of ``seed`` and the row's index: a bijection of the 64-bit integers, so keys
never tie) and a sample keeps the rows with the smallest keys, overall or per class: a uniform
random sample without replacement (the k smallest of i.i.d. keys), the same rows whether the
data come as one tensor or as a million batches. Written by hand because reservoir samplers
(``random.sample``, NumPy's ``Generator.choice``) need the whole population or depend on the
order of calls.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

__all__ = ["row_keys", "BottomK"]

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def row_keys(start: int, n: int, seed: int = 0) -> np.ndarray:
    """SplitMix64 keys (uint64, shape (n,)) of stream rows ``start .. start + n - 1`` under ``seed``."""
    with np.errstate(over="ignore"):
        z = (
            np.arange(start, start + n, dtype=np.uint64) + np.uint64(seed % 2**64) * np.uint64(0x9E3779B97F4A7C15)
        ) & _M64
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class BottomK:
    """Keeps, of a stream of rows, the ``k`` with the smallest :func:`row_keys` (per class with ``per_class``).

    ``add`` takes consecutive batches (a dict of tensors with the same rows, and their labels);
    ``result`` gives the kept rows in stream order. The kept set is compacted when the pending
    rows exceed both the kept ones and ``pending_rows``: memory is at most about
    ``k + max(k, pending_rows)`` rows (per class with ``per_class``) plus one batch. The default
    (65,536) suits feature rows; for big rows such as images pass ``pending_rows=k`` (at most
    about ``2 k`` rows, a compaction every ``k`` rows).
    """

    def __init__(self, k: int, *, seed: int = 0, per_class: bool = False, pending_rows: int = 65536) -> None:
        self.k, self.seed, self.per_class, self.pending_rows = int(k), int(seed), per_class, int(pending_rows)
        self.seen = 0
        self._parts: list[tuple[np.ndarray, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = []
        self._pending = 0
        self._kept = 0

    def add(self, tensors: Mapping[str, torch.Tensor], labels: torch.Tensor) -> None:
        n = int(labels.shape[0])
        keys = row_keys(self.seen, n, self.seed)
        self._parts.append(
            (keys, torch.arange(self.seen, self.seen + n), labels.long().cpu(), {k: v for k, v in tensors.items()})
        )
        self.seen += n
        self._pending += n
        if self._pending > max(self._kept, self.pending_rows):
            self._compact()

    def _compact(self) -> None:
        if not self._parts:
            return
        keys = np.concatenate([p[0] for p in self._parts])
        idx = torch.cat([p[1] for p in self._parts])
        labels = torch.cat([p[2] for p in self._parts])
        names = list(self._parts[0][3])
        order = np.argsort(keys, kind="stable")
        if self.per_class:
            lab_sorted = labels.numpy()[order]
            keep_sorted = np.zeros(order.shape[0], dtype=bool)
            for c in np.unique(lab_sorted):
                pos = np.flatnonzero(lab_sorted == c)[: self.k]
                keep_sorted[pos] = True
            chosen = order[keep_sorted]
        else:
            chosen = order[: self.k]
        chosen = torch.from_numpy(np.sort(chosen)).long()  # parts are in stream order: sorted positions keep it
        tensors = {name: torch.cat([p[3][name] for p in self._parts])[chosen] for name in names}
        self._parts = [(keys[chosen.numpy()], idx[chosen], labels[chosen], tensors)]
        self._kept = int(chosen.shape[0])
        self._pending = 0

    def result(self) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """(kept tensors, their labels, their stream indices), in stream order."""
        self._compact()
        if not self._parts:
            return {}, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        _, idx, labels, tensors = self._parts[0]
        return tensors, labels, idx
