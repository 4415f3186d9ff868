"""Gram anchoring loss (DINOv3 as coded): MSE between patch-similarity (Gram) matrices of student and Gram teacher.

Inputs are final-LayerNorm-ed patch features (``x_norm_patchtokens``) of the ``n_g·B`` global crops:
student ``X_s`` and target ``X_g``, ``[n_g·B, P, D]``. With ``apply_norm`` both are row-L2-normalised
(``F.normalize``, eps 1e-12). Then, in fp32::

    img_level=True : G = X̂ X̂ᵀ per image, [n_g·B, P, P]
    img_level=False: one Gram over all tokens of the local batch, [(n_g·B·P), (n_g·B·P)]
    L = mean((G_s − G_t)²)                   (an MSE over all entries; the paper writes ‖·‖_F²)

``remove_neg``: negatives set to 0 in both Grams. ``remove_only_teacher_neg``: teacher negatives set to 0; the
official code then zeroes the student where *both* are negative, but the teacher has already been clamped, so that
mask is empty — effectively only the teacher is clamped (reproduced here).

High-resolution Gram teachers produce more tokens than the student; :func:`resize_gram_teacher_features` brings
them to the student grid (bicubic, ``align_corners=False``, ``antialias=False``) *before* the L2 normalisation.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

TOKENS_USED = ("all", "masked", "unmasked")


class GramLoss(nn.Module):
    """Gram-matrix MSE. ``img_level`` is the default for :meth:`forward` (official configs: True for 7B)."""

    def __init__(
        self,
        apply_norm: bool = True,
        img_level: bool = True,
        remove_neg: bool = False,
        remove_only_teacher_neg: bool = False,
    ):
        super().__init__()
        if remove_neg and remove_only_teacher_neg:
            raise ValueError("GramLoss: remove_neg and remove_only_teacher_neg are mutually exclusive")
        self.apply_norm = apply_norm
        self.img_level = img_level
        self.remove_neg = remove_neg
        self.remove_only_teacher_neg = remove_only_teacher_neg

    def _gram(self, feats: Tensor, img_level: bool) -> Tensor:
        feats = feats.float()
        if self.apply_norm:
            feats = F.normalize(feats, dim=-1)
        if not img_level and feats.dim() == 3:
            feats = feats.flatten(0, 1)
        return feats @ feats.transpose(-1, -2)

    def forward(self, student_feats: Tensor, teacher_feats: Tensor, img_level: bool | None = None) -> Tensor:
        """0-d fp32 loss. Features ``[N_img, P, D]`` (``img_level``) or ``[N_img, P, D]`` / ``[N_tok, D]``
        (batch level, flattened to tokens)."""
        img_level = self.img_level if img_level is None else img_level
        if img_level and (student_feats.dim() != 3 or teacher_feats.dim() != 3):
            raise ValueError("GramLoss(img_level=True) needs [images, patches, dim] features")
        target_sim = self._gram(teacher_feats, img_level)
        student_sim = self._gram(student_feats, img_level)
        if self.remove_neg:
            target_sim = target_sim.clamp(min=0.0)
            student_sim = student_sim.clamp(min=0.0)
        elif self.remove_only_teacher_neg:
            target_sim = target_sim.clamp(min=0.0)
        return F.mse_loss(student_sim, target_sim)


def resize_gram_teacher_features(
    feats: Tensor,
    target_grid: int | tuple[int, int],
    source_grid: tuple[int, int] | None = None,
    mode: str = "bicubic",
    antialias: bool = False,
) -> Tensor:
    """Resize Gram-teacher patch features ``[N, P_t, D]`` (row-major ``h_t × w_t`` grid; square by default) to the
    student grid ``target_grid`` → ``[N, h·w, D]``, as the official meta-architecture does (bicubic,
    ``align_corners=False``, no antialias; applied to LayerNorm-ed features before L2 normalisation)."""
    if isinstance(target_grid, int):
        target_grid = (target_grid, target_grid)
    n, p_t, d = feats.shape
    if source_grid is None:
        side = math.isqrt(p_t)
        if side * side != p_t:
            raise ValueError(f"cannot infer a square grid from {p_t} teacher tokens; pass source_grid=(h, w)")
        source_grid = (side, side)
    if source_grid[0] * source_grid[1] != p_t:
        raise ValueError(f"source_grid {source_grid} does not hold {p_t} tokens")
    if tuple(source_grid) == tuple(target_grid):
        return feats
    grid = feats.transpose(-2, -1).unflatten(-1, tuple(source_grid))  # [N, D, h_t, w_t]
    grid = F.interpolate(grid, size=tuple(target_grid), mode=mode, align_corners=False, antialias=antialias)
    return grid.flatten(-2, -1).transpose(-2, -1)


def select_gram_tokens(
    student_feats: Tensor, teacher_feats: Tensor, masks: Tensor | None, tokens_used: str = "all"
) -> tuple[Tensor, Tensor]:
    """Token selection of the official ``gram.tokens_used``: ``"all"`` keeps ``[N, P, D]``; ``"masked"`` /
    ``"unmasked"`` keep the tokens where ``masks`` ``[N, P]`` (bool) is True / False → ``[N_sel, D]`` each (use
    with ``img_level=False``)."""
    if tokens_used not in TOKENS_USED:
        raise ValueError(f"tokens_used must be one of {TOKENS_USED}, got {tokens_used!r}")
    if tokens_used == "all":
        return student_feats, teacher_feats
    if masks is None:
        raise ValueError(f"tokens_used={tokens_used!r} needs the iBOT masks")
    keep = masks if tokens_used == "masked" else ~masks
    return student_feats[keep], teacher_feats[keep]
