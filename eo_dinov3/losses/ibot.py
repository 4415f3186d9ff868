"""iBOT masked-patch loss (DINOv3 as coded).

Only masked global-crop patch tokens enter the heads. With ``q_p`` the Sinkhorn-Knopp targets of the teacher at
masked token ``p`` (teacher sees the *unmasked* image), ``s_p`` the student logits there (student sees the mask
token), ``τ_s = 0.1`` and ``n_i`` the number of masked tokens of image ``i``::

    L_iBOT = −(1/(n_g·B)) · Σ_i (1/max(n_i,1)) · Σ_{p∈𝓜_i} Σ_k q_{p,k} · log softmax(s_p/τ_s)_k

i.e. a per-image mean over its masked tokens, averaged over **all** ``n_g·B`` global-crop images (images without
masks count in the denominator with contribution 0). The per-token weights ``1/max(n_i,1)`` come from the collate
(``masks_weight``).

Teacher targets: the DINO Sinkhorn-Knopp (:func:`eo_dinov3.losses.dino.sinkhorn_knopp_core`) with
``M_tot`` = total number of masked patches over the process group (``n_masked_patches`` all-reduced).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eo_dinov3.losses._distributed import all_reduce_sum_
from eo_dinov3.losses.dino import sinkhorn_knopp_core


def _token_ce_sum(teacher_probs: Tensor, student_logits: Tensor, student_temp: float) -> Tensor:
    """``Σ_k q_k · log softmax(s/τ_s)_k`` per token (fp32), shape = input shape without the last dim."""
    return torch.sum(teacher_probs.float() * F.log_softmax(student_logits.float() / student_temp, dim=-1), dim=-1)


class iBOTPatchLoss(nn.Module):  # noqa: N801 (official name)
    """iBOT patch loss with Sinkhorn-Knopp teacher targets.

    ``patch_out_dim`` = iBOT prototypes ``K'``; ``student_temp`` 0.1; ``group`` for the all-reduces."""

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, group=None):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.group = group
        self.register_buffer("center", torch.zeros(1, 1, patch_out_dim))

    def init_weights(self) -> None:
        """Reset the (unused) softmax-centering centre to zero."""
        self.center.zero_()

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_logits: Tensor,
        teacher_temp: float,
        n_masked_patches_tensor: Tensor | int,
        n_iterations: int = 3,
    ) -> Tensor:
        """Targets ``[N_masked, K']`` (fp32, rows sum to 1) from teacher logits at the masked tokens.

        ``n_masked_patches_tensor``: this rank's masked-token count (``[1]`` int64 from the collate, or an int);
        it is summed over the group to give ``M_tot``. Unlike the official code the caller's tensor is not
        modified in place (the official all-reduce overwrites it)."""
        n_total = torch.as_tensor(n_masked_patches_tensor, device=teacher_logits.device).clone()
        all_reduce_sum_(n_total, self.group)
        return sinkhorn_knopp_core(teacher_logits, teacher_temp, n_iterations, n_total, self.group)

    def forward_masked(
        self,
        student_logits: Tensor,
        teacher_probs: Tensor,
        student_masks_flat: Tensor,
        n_masked_patches: int | None = None,
        masks_weight: Tensor | None = None,
    ) -> Tensor:
        """The loss used in training (0-d fp32).

        ``student_logits`` ``[N', K']`` (``N' ≥ N_masked``; rows past ``n_masked_patches`` are dropped),
        ``teacher_probs`` ``[N_masked, K']``, ``student_masks_flat`` ``[n_g·B, P]`` bool,
        ``masks_weight`` ``[N_masked]`` (``1/max(n_i,1)`` per masked token; rebuilt from the masks if omitted)."""
        token_loss = _token_ce_sum(teacher_probs, student_logits, self.student_temp)
        if masks_weight is None:
            per_image = 1 / student_masks_flat.sum(-1).clamp(min=1.0)
            masks_weight = per_image.unsqueeze(-1).expand_as(student_masks_flat)[student_masks_flat]
        if n_masked_patches is not None:
            token_loss = token_loss[:n_masked_patches]
        token_loss = token_loss * masks_weight
        return -token_loss.sum() / student_masks_flat.shape[0]

    def forward(self, student_logits: Tensor, teacher_probs: Tensor, student_masks_flat: Tensor) -> Tensor:
        """Dense variant (unused by the official meta-architecture): ``student_logits``/``teacher_probs``
        ``[B, P, K']``, ``student_masks_flat`` ``[B, P]``; per-image masked mean, then mean over images."""
        token_loss = _token_ce_sum(teacher_probs, student_logits, self.student_temp)
        masks = student_masks_flat.float()
        per_image = torch.sum(token_loss * masks, dim=-1) / masks.sum(dim=-1).clamp(min=1.0)
        return -per_image.mean()
