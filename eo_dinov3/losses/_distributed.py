"""Tiny wrappers around ``torch.distributed`` shared by the losses (no-ops when no process group exists).

``group=None`` means the default (world) process group. The official code uses a "process subgroup" (the whole
world unless multi-distillation splits it); callers that need a subgroup pass it explicitly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def group_size(group=None) -> int:
    """Number of processes in ``group`` (1 when not distributed)."""
    return dist.get_world_size(group=group) if is_distributed() else 1


def group_rank(group=None) -> int:
    """Rank of this process inside ``group`` (0 when not distributed)."""
    return dist.get_rank(group=group) if is_distributed() else 0


def all_reduce_sum_(t: torch.Tensor, group=None) -> torch.Tensor:
    """In-place sum over ``group`` when distributed; returns ``t`` (unchanged on a single process)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t
