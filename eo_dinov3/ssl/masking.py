"""iBOT block masking (official ``dinov3/data/masking.py`` algorithm and random-number call order).

A mask of exactly ``k`` patches on an ``H × W`` patch grid is built from rectangular blocks, then completed at
random:

1. While fewer than ``k`` patches are masked: up to 10 tries of
   ``area ~ U(min_num_patches, min(k − masked, max_num_patches))``, ``log aspect ~ U(ln a_min, ln a_max)``,
   ``h = round(√(area·aspect))``, ``w = round(√(area/aspect))``; when ``h < H`` and ``w < W`` (strict) a random
   top-left corner is drawn and the block is accepted if it adds ``0 < new ≤ k − masked`` patches. The first
   try that adds patches ends the round; a round that adds nothing ends the block phase.
2. The remainder is filled uniformly at random (NumPy ``choice`` without replacement) so the count is exact.

RNG: Python ``random`` (``uniform`` area, ``uniform`` log-aspect, then ``randint`` top and ``randint`` left only
when the block fits) and NumPy's legacy global generator for the completion — the *exact* call order of the
official code, so that seeding ``random`` and ``numpy.random`` reproduces its masks bit for bit. ``np.random.choice``
without replacement permutes the whole candidate set, so it consumes random numbers even when nothing is added;
this is mirrored too. Pass ``rng`` (a ``random.Random``) and ``np_rng`` (a ``numpy.random.RandomState``) for private
streams (e.g. per data-loader worker); they default to the global modules like the official code.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np


class MaskingGenerator:
    """Block-mask generator on a ``input_size = (H, W)`` patch grid (an int means square).

    ``max_num_patches`` caps a single block's area (official training: ``0.5 * S // 16 * S // 16`` for crop side
    ``S``, see :func:`official_max_num_patches`); ``min_num_patches`` (4) is the smallest block area;
    aspect ratios in ``[min_aspect, max_aspect]`` (default ``[0.3, 1/0.3]``)."""

    def __init__(
        self,
        input_size: int | tuple[int, int],
        num_masking_patches: int | None = None,
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        rng: Any = None,
        np_rng: Any = None,
    ):
        if not isinstance(input_size, tuple):
            input_size = (input_size,) * 2
        self.height, self.width = input_size
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.rng = random if rng is None else rng
        self.np_rng = np.random if np_rng is None else np_rng

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator({self.height}x{self.width}, block area [{self.min_num_patches}, "
            f"{self.max_num_patches}], log-aspect [{self.log_aspect_ratio[0]:.3f}, {self.log_aspect_ratio[1]:.3f}])"
        )

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _add_block(self, mask: np.ndarray, max_mask_patches: float) -> int:
        """One round (≤ 10 tries) of block placement; returns the number of newly masked patches."""
        delta = 0
        for _ in range(10):
            target_area = self.rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(self.rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = self.rng.randint(0, self.height - h)
                left = self.rng.randint(0, self.width - w)
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_mask_patches:
                    block[...] = True
                    delta += new
                if delta > 0:
                    break
        return delta

    def place_blocks(self, num_masking_patches: int) -> tuple[np.ndarray, int]:
        """Block phase only: ``(mask [H, W] bool, number of blocks placed)``; the mask may hold fewer than
        ``num_masking_patches`` patches (never more)."""
        mask = np.zeros(shape=self.get_shape(), dtype=bool)
        mask_count = 0
        n_blocks = 0
        while mask_count < num_masking_patches:
            max_mask_patches = min(num_masking_patches - mask_count, self.max_num_patches)
            delta = self._add_block(mask, max_mask_patches)
            if delta == 0:
                break
            mask_count += delta
            n_blocks += 1
        return mask, n_blocks

    def complete_mask_randomly(self, mask: np.ndarray, num_masking_patches: int) -> np.ndarray:
        """Add uniformly random patches until exactly ``num_masking_patches`` are masked (new array)."""
        flat = mask.flatten()
        to_add = self.np_rng.choice(np.where(~flat)[0], size=num_masking_patches - flat.sum(), replace=False)
        flat[to_add] = True
        return flat.reshape(mask.shape)

    def __call__(self, num_masking_patches: int = 0) -> np.ndarray:
        """A ``[H, W]`` bool mask with exactly ``num_masking_patches`` True entries."""
        mask, _ = self.place_blocks(num_masking_patches)
        return self.complete_mask_randomly(mask, num_masking_patches)


def official_max_num_patches(crop_size: int, patch_size: int = 16) -> float:
    """``max_num_patches`` as the official training builds it: ``0.5 * S // p * S // p`` with Python operator
    precedence, i.e. ``⌊⌊0.5·S/p⌋·S/p⌋`` (= ``P/2`` for an even grid; 105.0 instead of 112.5 for S = 240)."""
    return 0.5 * crop_size // patch_size * crop_size // patch_size
