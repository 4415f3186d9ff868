"""KoLeo (Kozachenko-Leonenko) entropy regulariser on pre-head CLS tokens (Sablayrolles et al. 2018).

For a batch ``x ∈ R^{B×D}``::

    x̂_b = x_b / max(‖x_b‖₂, 1e-8)
    nn(b) = argmax_{b'≠b} ⟨x̂_b, x̂_b'⟩             (diagonal of the dot-product matrix set to −1)
    d_b = ‖x̂_b − x̂_nn(b) + 1e-8·𝟙‖₂               (PairwiseDistance(eps=1e-8) adds eps to the difference)
    L = −(1/B) Σ_b log(d_b + 1e-8)

The official training applies it to each global crop separately and adds ``0.1 · Σ_crops L``.

Precision: the official non-distributed :class:`KoLeoLoss` runs in the input dtype (bf16 under FSDP); **this
implementation always computes in fp32** (inputs are upcast), which is identical for fp32 inputs and more accurate
for bf16 ones. :class:`KoLeoLossDistributed` computes distances in fp32 like the official one.
"""

from __future__ import annotations

import torch
import torch.distributed.nn as dist_nn
import torch.nn.functional as F
from torch import Tensor, nn

from eo_dinov3.losses._distributed import group_rank, group_size, is_distributed

_EPS = 1e-8


class KoLeoLoss(nn.Module):
    """Per-batch KoLeo loss (0-d fp32 tensor) of ``x`` ``[B, D]``."""

    def forward(self, student_output: Tensor, eps: float = _EPS) -> Tensor:
        with torch.autocast(student_output.device.type, enabled=False):
            x = F.normalize(student_output.float(), eps=eps, p=2, dim=-1)
            with torch.no_grad():
                dots = x @ x.t()
                dots.fill_diagonal_(-1)
                nn_idx = torch.max(dots, dim=1).indices
            distances = F.pairwise_distance(x, x[nn_idx], p=2, eps=eps)
            return -torch.log(distances + eps).mean()


class KoLeoLossDistributed(nn.Module):
    """KoLeo over groups of the global batch, all-gathered **with gradient** (``torch.distributed.nn.all_gather``).

    The global batch (all ranks' ``[local_B, D]`` concatenated in rank order) is split into contiguous groups of
    ``loss_group_size`` samples (default: the whole global batch; must be a multiple of ``local_B``). Each rank
    searches the ``topk`` nearest neighbours of its own samples inside its group (itself excluded) and returns
    ``mean over local_B·topk of −log(d + 1e-8)``. On one process with the default group it equals
    :class:`KoLeoLoss` (``topk=1``)."""

    def __init__(self, topk: int = 1, loss_group_size: int | None = None, group=None):
        super().__init__()
        self.topk = topk
        self.loss_group_size = loss_group_size
        self.group = group

    def forward(self, student_output: Tensor, eps: float = _EPS) -> Tensor:
        with torch.autocast(student_output.device.type, enabled=False):
            x = F.normalize(student_output.float(), eps=eps, p=2, dim=-1)  # [local_B, D]
            if is_distributed():
                all_x = torch.cat(dist_nn.all_gather(x, group=self.group), dim=0)  # [global_B, D]
            else:
                all_x = x
            world, rank = group_size(self.group), group_rank(self.group)
            local_b, global_b = len(x), len(all_x)
            group_b = self.loss_group_size if self.loss_group_size is not None else global_b
            if group_b % local_b != 0:
                raise ValueError(f"KoLeo loss group size {group_b} must be a multiple of the local batch {local_b}")
            if global_b % group_b != 0:
                raise ValueError(f"global batch {global_b} must be divisible by the KoLeo loss group size {group_b}")
            n_groups = global_b // group_b
            ranks_per_group = world // n_groups
            rank_in_group = rank % ranks_per_group
            candidates = all_x.view(n_groups, group_b, x.shape[1])[rank // ranks_per_group]  # [group_b, D]

            with torch.no_grad():
                dots = x @ candidates.t()  # [local_B, group_b]
                rows = torch.arange(local_b, device=x.device)
                dots[rows, rank_in_group * local_b + rows] = -1
                nn_idx = torch.topk(dots, k=self.topk, dim=1).indices  # [local_B, topk]

            anchors = x.unsqueeze(1).expand(-1, self.topk, -1).flatten(0, 1)
            distances = F.pairwise_distance(anchors, candidates[nn_idx].flatten(0, 1), p=2, eps=eps)
            return -torch.log(distances + eps).mean()
