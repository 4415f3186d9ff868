"""Deterministic data stream for pretraining: sample order, augmentation and masks are pure functions of
``(seed, position)``, so that a resumed run sees exactly the batches an uninterrupted run would, and the global
batch does not depend on how it is split over processes.

* Position ``p`` of the global stream (``p = step·G + rank·B + i`` for global batch ``G = world·B``) maps to a tile
  index through a per-epoch permutation drawn from ``(seed, epoch)``.
* Each sample's augmentation uses a ``torch.Generator`` seeded from ``(seed, p)``.
* iBOT masks are drawn per group of ``mask_group_size`` images (default ``B``) with Python/NumPy RNGs seeded from
  ``(seed, position of the group's first image)`` (the official collate draws them from the global RNG state).
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from eo_dinov3.data.manifest import derive_seed
from eo_dinov3.ssl.collate import collate_data_and_cast
from eo_dinov3.ssl.masking import MaskingGenerator


# independent random streams (first key after the run seed)
EPOCH_STREAM, AUG_STREAM, MASK_STREAM, STEP_STREAM, RESOLUTION_STREAM = 11, 12, 13, 14, 15


class StreamSampler(Sampler):
    """Infinite sampler yielding ``(index, position)`` for this rank, starting at ``start_step``.

    ``dataset_len`` tiles; ``local_batch`` images per rank and step; epochs are random permutations drawn from
    ``(seed, epoch)``."""

    def __init__(self, dataset_len: int, local_batch: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 start_step: int = 0):
        if dataset_len <= 0:
            raise ValueError("the dataset is empty")
        self.n, self.b, self.rank, self.world, self.seed = dataset_len, local_batch, rank, world_size, seed
        self.start_step = start_step
        self._perm_cache: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perm_cache:
            g = torch.Generator().manual_seed(derive_seed(self.seed, EPOCH_STREAM, epoch))
            self._perm_cache = {epoch: torch.randperm(self.n, generator=g)}
        return self._perm_cache[epoch]

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        return int(self._perm(epoch)[offset])

    def positions(self, step: int) -> range:
        G = self.b * self.world
        start = step * G + self.rank * self.b
        return range(start, start + self.b)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        step = self.start_step
        while True:
            for p in self.positions(step):
                yield self.index_at(p), p
            step += 1


def resolution_choice(seed: int, step: int, probabilities: Sequence[float]) -> int:
    """Index of the (global, local, Gram) crop-size triple used at optimiser step ``step``: drawn from
    ``probabilities`` with an RNG seeded by ``(seed, step)`` only, so every rank and every DataLoader worker picks
    the same triple for the whole global batch (the official high-res phase uses one fixed-seed RNG for this)."""
    if len(probabilities) == 1:
        return 0
    g = torch.Generator().manual_seed(derive_seed(seed, RESOLUTION_STREAM, step))
    return int(torch.multinomial(torch.tensor(probabilities, dtype=torch.float64), 1, generator=g))


class AugmentedTiles(Dataset):
    """Wraps a tile dataset (item = ``(image [C,H,W], sample_id)``) with the multi-crop augmentation, seeded per
    stream position. Items are ``(crops_dict, (sample_id, position))``; unreadable tiles were already skipped by the
    underlying dataset.

    ``augmentation`` is one callable, or a list of them (one per resolution triple) with ``probabilities`` and the
    ``global_batch`` size: position ``p`` belongs to step ``p // global_batch`` whose triple is
    :func:`resolution_choice` (high-resolution adaptation)."""

    def __init__(self, tiles: Dataset, augmentation: Callable[..., dict] | Sequence[Callable[..., dict]], seed: int,
                 *, probabilities: Sequence[float] | None = None, global_batch: int = 1):
        self.tiles, self.seed = tiles, seed
        self.augmentations = list(augmentation) if isinstance(augmentation, (list, tuple)) else [augmentation]
        self.probabilities = list(probabilities) if probabilities is not None else [1.0] * len(self.augmentations)
        if len(self.probabilities) != len(self.augmentations):
            raise ValueError("one probability per resolution triple is needed")
        self.global_batch = global_batch

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, key: tuple[int, int]):
        index, position = key
        image, sample_id = self.tiles[index]
        choice = resolution_choice(self.seed, position // self.global_batch, self.probabilities)
        g = torch.Generator().manual_seed(derive_seed(self.seed, AUG_STREAM, position))
        return self.augmentations[choice](image, generator=g), (str(sample_id), int(position))


class SSLCollate:
    """Collate with per-group deterministic masks (see module doc); adds ``sample_ids`` and ``positions``.

    Samples are ``(crops_dict, (sample_id, key))`` where ``key`` is the stream position (or any per-sample
    integer that is a pure function of the data order, e.g. the augmentation seed)."""

    def __init__(self, *, seed: int, mask_ratio_tuple: Sequence[float], mask_probability: float,
                 mask_group_size: int | None = None, dtype: torch.dtype = torch.float32, patch_size: int = 16):
        self.seed = seed
        self.mask_ratio_tuple = tuple(mask_ratio_tuple)
        self.mask_probability = mask_probability
        self.group = mask_group_size
        self.dtype = dtype
        self.patch_size = patch_size

    def __call__(self, samples: list) -> dict[str, Any]:
        size = samples[0][0]["global_crops"][0].shape[-1]  # the global crop side (may vary per step: high-res)
        side = size // self.patch_size
        grid, n_tokens = (side, side), side * side
        max_num_patches = 0.5 * size // self.patch_size * size // self.patch_size  # official expression
        group = self.group or len(samples)
        if len(samples) % group:
            raise ValueError(f"batch of {len(samples)} is not a multiple of ibot.mask_group_size={group}")
        parts = []
        for start in range(0, len(samples), group):
            chunk = samples[start : start + group]
            s = derive_seed(self.seed, MASK_STREAM, chunk[0][1][1])
            rng, np_rng = random.Random(s), np.random.RandomState(s % (2**32))
            generator = MaskingGenerator(grid, max_num_patches=max_num_patches, rng=rng, np_rng=np_rng)
            parts.append(
                collate_data_and_cast(
                    [(c[0], None) for c in chunk],
                    mask_ratio_tuple=self.mask_ratio_tuple,
                    mask_probability=self.mask_probability,
                    dtype=self.dtype,
                    n_tokens=n_tokens,
                    mask_generator=generator,
                    rng=rng,
                )
            )
        batch = parts[0] if len(parts) == 1 else merge_collated(parts)
        batch["sample_ids"] = [s[1][0] for s in samples]
        batch["positions"] = torch.tensor([s[1][1] for s in samples], dtype=torch.int64)
        return batch


def _crop_major_cat(tensors: list[Tensor], n_crops: int) -> Tensor:
    """Concatenate crop-major stacks ``[n_crops·b_i, ...]`` into one crop-major stack ``[n_crops·Σb_i, ...]``."""
    return torch.cat([t.unflatten(0, (n_crops, -1)) for t in tensors], dim=1).flatten(0, 1)


def merge_collated(parts: list[dict[str, Any]], n_global: int = 2) -> dict[str, Any]:
    """Merge collated groups into one batch (crop-major order kept; mask indices and weights recomputed)."""
    out: dict[str, Any] = {}
    out["collated_global_crops"] = _crop_major_cat([p["collated_global_crops"] for p in parts], n_global)
    n_local = parts[0]["collated_local_crops"].shape[0] // (parts[0]["collated_global_crops"].shape[0] // n_global)
    out["collated_local_crops"] = _crop_major_cat([p["collated_local_crops"] for p in parts], max(n_local, 1))
    if "collated_gram_teacher_crops" in parts[0]:
        out["collated_gram_teacher_crops"] = _crop_major_cat([p["collated_gram_teacher_crops"] for p in parts], n_global)
    masks = _crop_major_cat([p["collated_masks"] for p in parts], n_global)
    out["collated_masks"] = masks
    out["mask_indices_list"] = masks.flatten().nonzero().flatten()
    per_image = 1.0 / masks.sum(-1).clamp(min=1.0)
    out["masks_weight"] = per_image.unsqueeze(-1).expand_as(masks)[masks]
    out["n_masked_patches"] = torch.full((1,), int(masks.sum()), dtype=torch.long)
    out["upperbound"] = sum(int(p["upperbound"]) for p in parts)
    return out
