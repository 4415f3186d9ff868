"""Process-group helpers for torchrun jobs (works with one process too).

``torchrun --nproc_per_node N sat_training/pretrain.py …`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and a
rendezvous; :func:`init_distributed` joins it (NCCL on GPUs, gloo on CPUs). Gradients are averaged over ranks with
:func:`all_reduce_gradients` (bucketed all-reduce: DDP semantics without wrapping the meta-architecture).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Join the torchrun process group if launched by torchrun; choose the device (``auto``: CUDA if present)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def all_reduce_gradients(params, world_size: int, bucket_mb: float = 25.0) -> None:
    """Average ``.grad`` of ``params`` over all ranks (flattened buckets of about ``bucket_mb`` MB)."""
    if world_size <= 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0
    limit = bucket_mb * 2**20
    for g in grads:
        bucket.append(g)
        size += g.numel() * g.element_size()
        if size >= limit:
            _reduce_bucket(bucket, world_size)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket, world_size)


def _reduce_bucket(bucket: list[torch.Tensor], world_size: int) -> None:
    flat = torch.cat([g.reshape(-1) for g in bucket])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in bucket:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def all_true(flag: bool, device: torch.device) -> bool:
    """True only if ``flag`` is True on every rank (used for the non-finite step guard)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(t)
    return t.item() == 0.0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(values: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    """Average 0-d tensors over all ranks (for logging the global-batch losses); identity on one process."""
    keys = sorted(values)
    t = torch.stack([values[k].detach().float().reshape(()) for k in keys]).to(device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist())}
