"""Multi-process hardening: the same :func:`training.harden.harden` call under ``torchrun``.

``torchrun --nproc_per_node=N -m training.distributed --demo --rounds 3`` (or any script that
calls ``harden``) runs with DistributedDataParallel: the process group is initialised from
torchrun's environment (gloo on CPU, nccl when the model is on CUDA), each rank trains on its
``DistributedSampler`` shard with ``batch_size // N`` images per step (the same global batch as
one process), gradients are averaged by DDP. Attack generation runs on **rank 0 only** and the
resulting images are broadcast to every rank (the attacks are cheap next to a round's
training, and this keeps the attack set identical to a one-process run with the same seed).
Only rank 0 writes checkpoints; every rank reads them on resume. On GPUs, put the model on
``cuda:LOCAL_RANK`` before calling ``harden`` (``init_from_env`` selects that device for nccl).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import torch
import torch.distributed as dist

__all__ = ["world", "init_from_env", "broadcast_tensors", "barrier", "main"]


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


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


_DTYPES = [torch.float32, torch.int64, torch.float64, torch.bool]


def broadcast_tensors(tensors: dict[str, torch.Tensor] | None, names: Sequence[str], src: int = 0) -> dict[str, torch.Tensor]:
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
            header[2:2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
        dist.broadcast(header, src)
        shape = [int(v) for v in header[2:2 + int(header[0])]]
        dtype = _DTYPES[int(header[1])]
        buf = tensors[name].to(dev).contiguous() if rank == src else torch.empty(shape, dtype=dtype, device=dev)  # type: ignore[index]
        dist.broadcast(buf, src)
        out[name] = buf.cpu()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``torchrun ... -m training.distributed``: harden and write a JSON summary."""
    p = argparse.ArgumentParser(prog="python -m training.distributed")
    p.add_argument("--model-state", help="safetensors file of a DemoNet state (with --width/--hidden); default: the demo model")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--train", type=int, default=8000, help="use the first N demo training images")
    p.add_argument("--test", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs-per-round", type=int, default=2)
    p.add_argument("--attacks", default=None, help="comma-separated round attacks")
    p.add_argument("--budget", choices=["quick", "default"], default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--json", default=None, help="rank 0 writes the history here")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import guard
    from guard.core.cache import atomic_write_text, load_tensors
    from guard.demo import shift_augment
    from guard.core.models import DemoNet
    from guard.training.harden import harden
    from guard.training.round_attacks import DEFAULT_ATTACKS, AttackBudget

    train, test = guard.demo_data()
    if args.model_state:
        model = DemoNet(width=args.width, hidden=args.hidden)
        model.load_state_dict(load_tensors(args.model_state)[0])
    else:
        model = guard.demo_model(progress=False)
    budget = AttackBudget.quick() if args.budget == "quick" else AttackBudget()
    created = init_from_env("cpu")
    res = harden(model, guard.Split(train.x[:args.train], train.y[:args.train]),
                 test=guard.Split(test.x[:args.test], test.y[:args.test]),
                 attacks=args.attacks.split(",") if args.attacks else DEFAULT_ATTACKS, rounds=args.rounds,
                 epochs_per_round=args.epochs_per_round, budget=budget, seed=args.seed, augment=shift_augment,
                 checkpoint_dir=args.checkpoint_dir, progress=False)
    rank, size = world()
    if rank == 0 and args.json:
        atomic_write_text(args.json, json.dumps({"world_size": size, "baseline": res.baseline, "history": res.history,
                                                 "timings": res.timings}, indent=2))
    if created:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
