"""Multi-process hardening: the same :func:`guard.harden` call under ``torchrun``.

``torchrun --nproc_per_node=N -m guard harden --demo --rounds 3`` (or any script that calls
``guard.harden``) runs with DistributedDataParallel: the process group is initialised from
torchrun's environment (gloo on CPU, nccl when the model is on CUDA), each rank trains on its
``DistributedSampler`` shard with ``batch_size // N`` images per step (the same global batch as
one process), gradients are averaged by DDP. Attack generation runs on **rank 0 only** and the
resulting images are broadcast to every rank (the attacks are cheap next to a round's
training, and this keeps the attack set identical to a one-process run with the same seed).
Only rank 0 writes checkpoints; every rank reads them on resume. Streamed data: a map-style
Dataset (or image folder) is read by index, each rank its shard of the same seeded order; a
DataLoader cannot be sharded and is refused (ValueError naming ``data``). On GPUs, put the model on
``cuda:LOCAL_RANK`` before calling ``harden`` (``init_from_env`` selects that device for nccl).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

__all__ = ["world", "init_from_env", "process_group", "broadcast_tensors", "barrier"]


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: torch.device | str = "cpu") -> bool:
    """Initialise the process group from torchrun's variables when WORLD_SIZE > 1.

    Returns True when this call created the group (the caller then destroys it).
    """
    if not dist.is_available() or dist.is_initialized():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


@contextlib.contextmanager
def process_group(device: torch.device | str = "cpu") -> Iterator[bool]:
    """:func:`init_from_env` on entry; on exit, the group is destroyed if this call created it."""
    created = init_from_env(device)
    try:
        yield created
    finally:
        if created:
            dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


_DTYPES = [torch.float32, torch.int64, torch.float64, torch.bool]


def broadcast_tensors(
    tensors: dict[str, torch.Tensor] | None, names: Sequence[str], src: int = 0
) -> dict[str, torch.Tensor]:
    """Broadcast named CPU tensors from ``src`` to every rank (no pickling: shapes go first)."""
    rank, size = world()
    if size == 1:
        if tensors is None:  # internal invariant: the source rank always has them
            raise RuntimeError("broadcast_tensors: the source rank passed no tensors")
        return tensors
    backend_cuda = dist.get_backend() == "nccl"
    dev = torch.device("cuda", torch.cuda.current_device()) if backend_cuda else torch.device("cpu")
    out: dict[str, torch.Tensor] = {}
    for name in names:
        header = torch.zeros(10, dtype=torch.int64, device=dev)
        if rank == src:
            t = tensors[name]  # type: ignore[index]
            header[0] = t.dim()
            header[1] = _DTYPES.index(t.dtype)
            header[2 : 2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
        dist.broadcast(header, src)
        shape = [int(v) for v in header[2 : 2 + int(header[0])]]
        dtype = _DTYPES[int(header[1])]
        buf = tensors[name].to(dev).contiguous() if rank == src else torch.empty(shape, dtype=dtype, device=dev)  # type: ignore[index]
        dist.broadcast(buf, src)
        out[name] = buf.cpu()
    return out
