"""DINO CLS-token loss: Sinkhorn-Knopp teacher targets and the student cross-entropy (DINOv3 as coded).

Teacher targets (Sinkhorn-Knopp, fp32, 3 iterations, teacher temperature ``τ_t`` from the schedule)::

    Q = exp(Z / τ_t)ᵀ                       K × M, no max-subtraction
    Q ← Q / ΣQ                              (sum all-reduced over the process group)
    repeat n:
        Q_k· ← Q_k· / (Σ_b Q_kb) / K        (row sums all-reduced)
        Q_·b ← Q_·b / (Σ_k Q_kb) / M_tot    (local columns; M_tot = M × world size)
    q = (M_tot · Q)ᵀ                         M × K, every row sums to 1

Subtracting a per-sample max before ``exp`` is *not* equivalent (the first row normalisation mixes samples), so it
is deliberately not done; ``Z/τ_t > 88`` overflows fp32 exactly as in the official code.

Student: ``log p_s = log_softmax(S / τ_s)``, ``τ_s = 0.1``; ``CE(s, t) = −Σ_k q_{t,k} log p_{s,k}``.

* local term: all (local student crop, global teacher crop) pairs, ``L = Σ CE / (n_l · n_g · B)``;
* global term with ``ignore_diagonal=True`` (what the official meta-architecture uses): cross-view pairs only,
  ``L = Σ_{s≠t} CE / (B (n_s n_t − min(n_s, n_t)))``; with ``False`` all pairs, divided by ``B n_s n_t``.

The meta-architecture combines them with :func:`dino_loss_weights` (16/18 local, 2/18 global for 2 + 8 crops).

A DINOv2-style softmax-centering teacher (EMA centre, momentum 0.9, applied lazily on the next call) is kept for
completeness (:meth:`DINOLoss.softmax_center_teacher`); the official DINOv3 meta-architecture never uses it.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from eo_dinov3.losses._distributed import all_reduce_sum_, group_size, is_distributed


@torch.no_grad()
def sinkhorn_knopp_core(
    teacher_logits: Tensor,
    teacher_temp: float,
    n_iterations: int,
    n_samples_total: int | float | Tensor,
    group=None,
) -> Tensor:
    """Sinkhorn-Knopp with an explicit global sample count ``M_tot`` (shared by the DINO and iBOT losses).

    ``teacher_logits`` ``[M, K]`` (any float dtype, computed in fp32); returns fp32 targets ``[M, K]``.
    The global sum and the per-prototype row sums are all-reduced over ``group`` when distributed; column
    sums are local (each sample lives on one rank)."""
    Q = torch.exp(teacher_logits.float() / teacher_temp).t()  # [K, M]
    K = Q.shape[0]
    total = torch.sum(Q)
    all_reduce_sum_(total, group)
    Q /= total
    for _ in range(n_iterations):
        row_sums = torch.sum(Q, dim=1, keepdim=True)
        all_reduce_sum_(row_sums, group)
        Q /= row_sums
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= n_samples_total
    Q *= n_samples_total
    return Q.t()


def sinkhorn_knopp(
    teacher_logits: Tensor,
    teacher_temp: float,
    n_iterations: int = 3,
    *,
    group=None,
) -> Tensor:
    """DINO teacher targets ``[M, K]`` (fp32, rows sum to 1) from teacher logits ``[M, K]``.

    ``M_tot = M × world size`` (every rank holds the same number of samples, as in the official code)."""
    n_total = teacher_logits.shape[0] * group_size(group)
    return sinkhorn_knopp_core(teacher_logits, teacher_temp, n_iterations, n_total, group)


def dino_loss_weights(n_global: int, n_local: int, ignore_diagonal: bool = True) -> tuple[float, float]:
    """``(local_scale, global_scale)`` applied by the official meta-architecture to the two DINO terms.

    ``T_g = n_g(n_g−1)`` (``n_g²`` without ``ignore_diagonal``), ``T_l = n_g·n_l``; scales ``T_l/(T_g+T_l)`` and
    ``T_g/(T_g+T_l)`` (16/18 and 2/18 for 2 global + 8 local crops)."""
    t_global = n_global * (n_global - 1) if ignore_diagonal else n_global**2
    t_local = n_global * n_local
    return t_local / (t_global + t_local), t_global / (t_global + t_local)


class DINOLoss(nn.Module):
    """Cross-entropy between student CLS logits and teacher targets, plus the teacher-target builders.

    ``out_dim`` = number of prototypes ``K``; ``student_temp`` ``τ_s`` (0.1); ``center_momentum`` (0.9) only for
    the softmax-centering alternative. ``group``: process group for the all-reduces (``None`` = world)."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, group=None):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.group = group
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._pending_center: Tensor | None = None
        self._pending_count = 0
        self._reduce_handle = None

    def init_weights(self) -> None:
        """Reset the (softmax-centering) centre to zero."""
        self.center.zero_()

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
        """See :func:`sinkhorn_knopp`: ``[M, K]`` logits → ``[M, K]`` targets (M = n_g·B, crop-major)."""
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations, group=self.group)

    def forward(
        self,
        student_logits: Tensor | Sequence[Tensor],
        teacher_probs: Tensor | Sequence[Tensor],
        ignore_diagonal: bool = False,
    ) -> Tensor:
        """Mean cross-entropy over (student crop, teacher crop, image) triples (0-d fp32 tensor).

        ``student_logits``: ``[S, B, K]`` or a list of ``S`` tensors ``[B, K]``; ``teacher_probs``: ``[T, B, K]``
        (or a list), rows summing to 1. With ``ignore_diagonal`` the pairs ``s == t`` (same view) are skipped."""
        if not isinstance(student_logits, Tensor):
            student_logits = torch.stack(list(student_logits))
        if not isinstance(teacher_probs, Tensor):
            teacher_probs = torch.stack(list(teacher_probs))
        n_s, B, _ = student_logits.shape
        n_t = teacher_probs.shape[0]
        log_p = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        if not ignore_diagonal:
            return -torch.einsum("sbk,tbk->", log_p, teacher_probs) / (B * n_s * n_t)
        pair_ce = -torch.einsum("sbk,tbk->st", log_p, teacher_probs)  # [S, T]
        n_diag = min(n_s, n_t)
        pair_ce = torch.diagonal_scatter(pair_ce, pair_ce.new_zeros(n_diag))
        return pair_ce.sum() / (B * n_s * n_t - B * n_diag)

    # ---- DINOv2-style softmax centering (unused by the DINOv3 meta-architecture) -------------------------------
    @torch.no_grad()
    def softmax_center_teacher(
        self, teacher_logits: Tensor, teacher_temp: float, update_centers: bool = True
    ) -> Tensor:
        """``softmax((Z − c) / τ_t)`` ``[M, K]``; first applies a pending centre update when ``update_centers``."""
        if update_centers:
            self.apply_center_update()
        return F.softmax((teacher_logits - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """Start the centre update with the batch ``[M, K]``: the batch sum is all-reduced asynchronously and
        folded into the EMA centre on the next :meth:`apply_center_update` (lazily, as the official code does)."""
        self._pending_count = len(teacher_logits)
        self._pending_center = torch.sum(teacher_logits, dim=0, keepdim=True)
        self._reduce_handle = None
        if is_distributed():
            self._reduce_handle = dist.all_reduce(self._pending_center, async_op=True, group=self.group)

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """``c ← m·c + (1−m)·mean_b Z`` with the mean over all ranks' samples (no-op without a pending update)."""
        if self._pending_center is None:
            return
        if self._reduce_handle is not None:
            self._reduce_handle.wait()
        batch_center = self._pending_center / (self._pending_count * group_size(self.group))
        self.center.copy_(self.center * self.center_momentum + batch_center * (1 - self.center_momentum))
        self._pending_center = None
        self._reduce_handle = None
