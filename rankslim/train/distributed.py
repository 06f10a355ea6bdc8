"""Distributed data-parallel plumbing for the training loop (``torchrun --nproc_per_node=N``).

The same Python entry runs single-process or under ``torchrun``: :func:`setup` reads the
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` variables torchrun sets and initialises the process group
(``gloo`` on CPU, ``nccl`` on GPU).  Nothing here touches the network beyond the rendezvous torchrun
(or a test) configures.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, its ``device``, and whether
    :func:`setup` created the process group (then :func:`teardown` destroys it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files and draws progress bars."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process trains."""
        return self.world_size > 1


def setup(device: str | torch.device | None = None) -> DistContext:
    """Join (or create) the process group when launched by torchrun, else a 1-process context.

    ``device``: ``None`` picks ``cuda:LOCAL_RANK`` when CUDA is available and CPU otherwise.
    The backend is ``nccl`` for CUDA devices and ``gloo`` for CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device is None:
        dev = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None and world > 1:
            dev = torch.device(f"cuda:{local}")
    if world <= 1:
        return DistContext(0, 1, 0, dev, False)
    owns = False
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
        owns = True
    return DistContext(dist.get_rank(), dist.get_world_size(), local, dev, owns)


def teardown(ctx: DistContext) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()
        ctx.owns_group = False


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op in a single process)."""
    if ctx.distributed:
        dist.barrier()


def all_reduce_sum(ctx: DistContext, values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64; returned as Python floats)."""
    if not ctx.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return [float(v) for v in t.cpu()]


@torch.no_grad()
def broadcast_tensors(ctx: DistContext, tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s values (in place)."""
    if not ctx.distributed:
        return
    for t in tensors:
        dist.broadcast(t.data, src)


def sync_buffers(ctx: DistContext, model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    Each rank updates its BN statistics on its own shard; evaluation and checkpoints must all see
    rank 0's, as DDP's next forward would.
    """
    broadcast_tensors(ctx, [b for b in model.buffers() if b.is_floating_point() or b.dtype == torch.long])


def all_equal(ctx: DistContext, tensors: list[torch.Tensor]) -> bool:
    """True when ``tensors`` hold identical values on every rank (max over ranks of |t - t_rank0|)."""
    if not ctx.distributed:
        return True
    diffs = []
    for t in tensors:
        ref = t.detach().clone()
        dist.broadcast(ref, 0)
        diffs.append(float((t.detach() - ref).abs().max()) if t.numel() else 0.0)
    worst = torch.tensor([max(diffs, default=0.0)], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst) == 0.0


__all__ = ["DistContext", "setup", "teardown", "barrier", "all_reduce_sum", "broadcast_tensors", "sync_buffers",
           "all_equal"]
