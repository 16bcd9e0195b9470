"""torchrun/DDP set-up in a few explicit lines: rank, local rank and world size from the environment.

torchrun (or any launcher that sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) starts one
process per device; we join the process group (gloo on CPU, nccl on CUDA), rank 0 logs and writes.
Without those variables the run is a single process and nothing here touches torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
from torch import nn

from ..errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> this process's CUDA device when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device=cuda was asked for but PyTorch sees no CUDA GPU; use device=cpu or auto.")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun; a single-process DistInfo otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise UserError(f"WORLD_SIZE={world} is set but {' and '.join(missing)} not; launch with torchrun "
                            f"(which sets them all), or unset WORLD_SIZE for one process.")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, local_rank, world, dev)


def teardown() -> None:
    GlooSyncBatchNorm.group = None
    if dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[float], info: DistInfo) -> list[float]:
    """Element-wise sum of `values` over every process (float64, so counts stay exact)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every process when `flag` is true on any (so all stop at the same step)."""
    if not info.enabled:
        return flag
    return all_sum([1.0 if flag else 0.0], info)[0] > 0


def broadcast_buffers(model: nn.Module, info: DistInfo) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every rank. Without synchronised BN each rank's
    statistics include its own last batch; evaluating with rank 0's scores each shard with the model that
    rank 0 saves. (DDP overwrites the training model's buffers from rank 0 at every forward anyway.)"""
    if not info.enabled:
        return
    for b in model.buffers():
        dist.broadcast(b, src=0)


def gather_objects(obj, info: DistInfo) -> list:
    """`obj` from every rank, in rank order (for per-rank RNG states)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics are over the global batch, for CPU processes (gloo).

    PyTorch's SyncBatchNorm runs only on GPUs; this computes the same statistics with one differentiable
    all-reduces per layer (sum and count, then squared deviations), on its own process group so that it never
    interleaves with DDP's gradient all-reduces.
    """

    group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        c = x.shape[1]
        # Two passes, as BatchNorm itself: the global mean first, then the mean squared deviation from it
        # (E[x^2] - mean^2 in one pass loses the variance of near-constant channels to cancellation).
        first = torch.cat([x.sum((0, 2, 3)), x.new_full((1,), x.numel() / c)])
        first = dist_nn.all_reduce(first, group=GlooSyncBatchNorm.group)
        n = first[-1]
        mean = first[:c] / n
        centred = x - mean.view(1, c, 1, 1)
        var = dist_nn.all_reduce(centred.square().sum((0, 2, 3)), group=GlooSyncBatchNorm.group) / n
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
        scale = self.weight * torch.rsqrt(var + self.eps)
        return centred * scale.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)


def convert_sync_batchnorm(model: nn.Module, info: DistInfo) -> nn.Module:
    """Every BatchNorm2d synchronised over the processes: PyTorch's SyncBatchNorm on CUDA, ours on CPU."""
    if info.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if GlooSyncBatchNorm.group is None:
        GlooSyncBatchNorm.group = dist.new_group(backend="gloo")
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            new = GlooSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new.to(child.weight.device))
        else:
            convert_sync_batchnorm(child, info)
    return model


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
