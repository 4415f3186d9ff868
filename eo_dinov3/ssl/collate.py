"""Batch collation for SSL training: crop-major stacking, deterministic iBOT mask ladder, casting.

Official ``dinov3/data/collate.py`` behaviour. Each sample is ``(crops_dict, target)`` (the target is ignored) with
``crops_dict["global_crops"]`` (``n_g`` tensors ``[C, H, W]``), ``crops_dict["local_crops"]`` (``n_l`` tensors) and
optionally ``crops_dict["gram_teacher_crops"]`` (``n_g`` tensors). For a per-GPU batch of ``b`` images
(``n_g·b`` global-crop images):

* crops are stacked **crop-major**: ``[crop 0 of every image, crop 1 of every image, …]``;
* ``n_masked = ⌊n_g·b · mask_probability⌋`` images get masks with ratios
  ``r_i = linspace(lo, hi, n_masked+1)[i+1]`` (a **float32** ``torch.linspace``; the count is ``int(P · r_i)``
  evaluated in float32, which differs from exact arithmetic in some cases, e.g. P=100, b=6: 29 instead of 30);
  the other images get empty masks; then the list of masks is shuffled with Python ``random.shuffle`` (both views
  mixed).

RNG order (must be kept for bit-exact masks): every mask generator call (python ``random`` then numpy), optional
circular shifts (python ``random``), then the shuffle.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor


def mask_ratio_ladder(n_masked: int, mask_ratio_tuple: tuple[float, float]) -> Tensor:
    """The ``n_masked`` deterministic ratios ``linspace(lo, hi, n_masked + 1)[1:]`` (float32) ``[n_masked]``."""
    return torch.linspace(*mask_ratio_tuple, n_masked + 1)[1:]


def mask_counts(
    n_tokens: int, n_crop_images: int, mask_ratio_tuple: tuple[float, float], mask_probability: float
) -> list[int]:
    """Masked-patch counts of the masked images, in ladder order: ``int(n_tokens * r_i)`` with ``r_i`` float32
    (a 0-d float32 tensor times a Python int stays float32 — the official arithmetic)."""
    n_masked = int(n_crop_images * mask_probability)
    probs = torch.linspace(*mask_ratio_tuple, n_masked + 1)
    return [int(n_tokens * probs[i + 1]) for i in range(n_masked)]


def collate_data_and_cast(
    samples: Sequence[tuple[dict[str, Sequence[Tensor]], Any]],
    mask_ratio_tuple: tuple[float, float],
    mask_probability: float,
    dtype: torch.dtype,
    n_tokens: int,
    mask_generator: Callable[[int], np.ndarray],
    random_circular_shift: bool = False,
    local_batch_size: int | None = None,
    rng: Any = None,
) -> dict[str, Any]:
    """Collate ``samples`` into the SSL batch dict.

    ``n_tokens`` = patches per global crop ``P``; ``mask_generator(k)`` returns an ``[H, W]`` bool mask with ``k``
    patches (:class:`eo_dinov3.ssl.masking.MaskingGenerator`); ``local_batch_size`` overrides the number of
    images used for masking (multi-distillation); ``rng`` (default: the ``random`` module) for shifts and shuffle.

    Returns ``collated_global_crops [n_g·b, C, H, W]``, ``collated_local_crops [n_l·b, C, h, w]`` (cast to
    ``dtype``), ``collated_masks [n_g·b, P]`` bool, ``mask_indices_list [N_masked]`` int64 (flat indices into
    ``n_g·b·P``), ``masks_weight [N_masked]`` float32 (``1/max(n_i,1)`` of each masked token's image),
    ``upperbound`` (int, sum of the target counts), ``n_masked_patches [1]`` int64 and, when the samples carry
    them, ``collated_gram_teacher_crops [n_g·b, C, H', W']``."""
    rng = random if rng is None else rng
    crops0 = samples[0][0]
    n_global = len(crops0["global_crops"])
    n_local = len(crops0["local_crops"])

    def stack(key: str, n: int) -> Tensor:
        return torch.stack([s[0][key][i] for i in range(n) for s in samples])

    collated_global = stack("global_crops", n_global)
    collated_local = stack("local_crops", n_local)
    collated_gram = stack("gram_teacher_crops", n_global) if "gram_teacher_crops" in crops0 else None

    n_images = n_global * local_batch_size if local_batch_size is not None else len(collated_global)
    counts = mask_counts(n_tokens, n_images, mask_ratio_tuple, mask_probability)
    masks_list = []
    for count in counts:
        mask = torch.from_numpy(np.asarray(mask_generator(count), dtype=bool))
        if random_circular_shift:
            shift = (rng.randint(0, mask.shape[0] - 1), rng.randint(0, mask.shape[1] - 1))
            mask = torch.roll(mask, shift, (0, 1))
        masks_list.append(mask)
    for _ in range(len(counts), n_images):
        masks_list.append(torch.from_numpy(np.asarray(mask_generator(0), dtype=bool)))
    rng.shuffle(masks_list)

    collated_masks = torch.stack(masks_list).flatten(1)
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    per_image_weight = 1 / collated_masks.sum(-1).clamp(min=1.0)
    masks_weight = per_image_weight.unsqueeze(-1).expand_as(collated_masks)[collated_masks]

    out: dict[str, Any] = {
        "collated_global_crops": collated_global.to(dtype),
        "collated_local_crops": collated_local.to(dtype),
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "upperbound": int(sum(counts)),
        "n_masked_patches": torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long),
    }
    if collated_gram is not None:
        out["collated_gram_teacher_crops"] = collated_gram.to(dtype)
    return out
