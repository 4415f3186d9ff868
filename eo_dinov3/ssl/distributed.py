"""Process-group helpers for torchrun jobs (works with one process too).

``torchrun --nproc_per_node N sat_training/pretrain.py …`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and a
rendezvous; :func:`init_distributed` joins it (NCCL on GPUs, gloo on CPUs). Gradients are averaged over ranks with
:func:`all_reduce_gradients` (bucketed all-reduce: DDP semantics without wrapping the meta-architecture).

Elastic restarts (``torchrun --max-restarts N``): torchrun's agent keeps one TCPStore for the whole job
(``TORCHELASTIC_USE_AGENT_STORE=True``, with ``--rdzv-backend c10d`` and with ``--master-port``), and in the torch
build we run on (2.14) the restarted workers get the *same* store back, still holding the dead attempt's
process-group keys (peer addresses). A new gloo/NCCL group built on it reads stale addresses and fails
("Gloo connectFullMesh failed ... Connection refused") or hangs, at random (same failure as pytorch/pytorch#135712).
:func:`init_distributed` therefore builds every attempt's process group under its own key prefix of that store
(a generation counter kept in the store itself, so all ranks agree even when their nodes'
``TORCHELASTIC_RESTART_COUNT`` differ). ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in torchrun's environment (a fresh
store per attempt) avoids the problem as well; then torch's default set-up is used unchanged.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

_GENERATION_KEY = "eo_dinov3/process_group_generation"


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
        _init_process_group("nccl" if use_cuda else "gloo", rank, world, datetime.timedelta(seconds=timeout_s),
                            device_ids=[local_rank] if use_cuda else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def _init_process_group(backend: str, rank: int, world: int, timeout: datetime.timedelta,
                        device_ids: list[int] | None = None) -> None:
    """``init_process_group`` that survives torchrun restarts on a shared, reused agent store.

    Without torchrun's shared store: torch's default ``env://`` set-up. With it: read the generation of the last
    process group built on this store (none yet: -1), build this one under the key prefix
    ``eo_dinov3/pg_<generation + 1>``, and once every rank has joined (barrier: nobody writes the counter before all
    ranks of this attempt have read it) rank 0 records the new generation. Attempts thus never read each other's
    keys, whether or not torchrun hands them a fresh store.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend=backend, timeout=timeout)
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    generation = (int(store.get(_GENERATION_KEY)) if store.check([_GENERATION_KEY]) else -1) + 1
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"eo_dinov3/pg_{generation}", store),
                            rank=rank, world_size=world, timeout=timeout)
    if device_ids is not None:
        dist.barrier(device_ids=device_ids)
    else:
        dist.barrier()
    if rank == 0:
        store.set(_GENERATION_KEY, str(generation))


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
