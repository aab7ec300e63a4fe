"""torchrun / DDP plumbing: who this process is, and the few collectives the loop needs.

Single-process runs take the same code path with ``world == 1``; every collective is then a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (from torchrun's RANK / WORLD_SIZE / LOCAL_RANK)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 alone logs, prints and writes files."""
        return self.rank == 0


def init(device_type: str) -> Dist:
    """Join the process group when launched by torchrun: NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        # Before any collective: object collectives run on the *current* device, which is cuda:0 otherwise.
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        # gloo beside NCCL: metric states and object collectives live on the CPU.
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo")
    return Dist(rank, world, local)


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def gather(d: Dist, obj: Any) -> List[Any]:
    """Every rank's ``obj`` (picklable plain data), in rank order, on every rank."""
    if d.world == 1:
        return [obj]
    out: List[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def broadcast(d: Dist, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if d.world == 1:
        return obj
    box = [obj if d.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_true(d: Dist, flag: torch.Tensor) -> bool:
    """True only if ``flag`` (a bool tensor) holds on every rank, so all ranks take the same branch."""
    if d.world > 1:
        flag = flag.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def all_sum(d: Dist, x: torch.Tensor) -> torch.Tensor:
    if d.world > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def shutdown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
