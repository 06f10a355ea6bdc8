"""A 2-process gloo DDP run equals a 1-process run with the same global batch.

Tolerance: parameters agree to 1e-5 absolute.  Both runs see the same global batches (DistributedSampler
interleaves one seeded permutation); they differ only in float summation order (two half-batch gradient
means averaged by all-reduce vs one full-batch mean), ~1e-7 per step.  The model has no BatchNorm: under DDP
each rank normalises with its own half-batch statistics, which is a different computation by design.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 4))


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(320, 1, 8, 8, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    return TensorDataset(x, y)


def _train(out: str | None):
    from rankslim.train import train_lrpet
    # 320 samples, 10 % held out -> 288 = 9 global batches of 32; projection every 4 iterations
    res = train_lrpet(_net(), _data(), rank_ratio=0.5, epochs=2, lr=0.05, batch_size=32, period=4, seed=0,
                      schedule="cosine")
    if out is not None:
        torch.save({k: v.detach().clone() for k, v in res.projected_model.state_dict().items()}, out)
    return res


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    _train(out if rank == 0 else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_equals_one_process(tmp_path):
    single = _train(None)  # first: warms every lazy import, which the forked children then share
    out = str(tmp_path / "ddp.pt")
    # fork: the children reuse the imported modules (spawn would re-import torch in each, ~10 s on 2 cores)
    mp.start_processes(_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="fork")
    ddp = torch.load(out, weights_only=True)
    ref = single.projected_model.state_dict()
    assert single.projections == 5  # 18 iterations: at 4, 8, 12, 16, and the final projection
    for k, v in ref.items():
        assert torch.allclose(ddp[k], v, atol=1e-5, rtol=0), (k, float((ddp[k] - v).abs().max()))
    # the weights moved: the comparison is not trivially between two untrained models
    assert not torch.allclose(ref["0.weight"], _net().state_dict()["0.weight"], atol=1e-3)
