"""Per-band normalisation presets (mean/std of reflectance-like values scaled to ``[0, 1]``).

* ``lvd1689m`` / ``imagenet``: the web DINOv3 backbones (ImageNet statistics).
* ``sat493m``: the satellite DINOv3 backbones (official README: mean 0.430, 0.411, 0.296; std 0.213, 0.156, 0.143).
* ``chmv2``: the CHMv2 canopy-height model (same as ``sat493m`` but red mean 0.420, as its code uses).

Use :func:`get_normalization` to look one up by name and :func:`normalize` to apply it to ``[B, C, H, W]`` input
in ``[0, 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Normalization:
    """``(x - mean) / std`` per band; ``x`` in ``[0, 1]`` (uint8 / 255 or uint16 / scale)."""

    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str = ""

    def tensors(self, device=None, dtype=torch.float32) -> tuple[Tensor, Tensor]:
        """Mean and std as ``[C, 1, 1]`` tensors."""
        mean = torch.tensor(self.mean, device=device, dtype=dtype)[:, None, None]
        std = torch.tensor(self.std, device=device, dtype=dtype)[:, None, None]
        return mean, std


PRESETS: dict[str, Normalization] = {
    "lvd1689m": Normalization(
        "lvd1689m", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "web DINOv3 (LVD-1689M), ImageNet statistics"
    ),
    "sat493m": Normalization(
        "sat493m", (0.430, 0.411, 0.296), (0.213, 0.156, 0.143), "satellite DINOv3 backbones (SAT-493M)"
    ),
    "chmv2": Normalization(
        "chmv2", (0.420, 0.411, 0.296), (0.213, 0.156, 0.143), "CHMv2 canopy-height model (red mean 0.420)"
    ),
}
ALIASES = {"imagenet": "lvd1689m", "lvd": "lvd1689m", "sat": "sat493m", "web": "lvd1689m"}


def get_normalization(name: str | Normalization) -> Normalization:
    """A preset by name (case-insensitive; aliases ``imagenet``, ``sat``, ``web``)."""
    if isinstance(name, Normalization):
        return name
    key = ALIASES.get(name.lower(), name.lower())
    if key not in PRESETS:
        raise ValueError(f"unknown normalisation {name!r}; choose from {sorted(PRESETS) + sorted(ALIASES)}")
    return PRESETS[key]


def normalize(x: Tensor, preset: str | Normalization) -> Tensor:
    """Normalise ``x [B, C, H, W]`` (or ``[C, H, W]``) in ``[0, 1]`` with a preset; C must match the preset."""
    n = get_normalization(preset)
    c = x.shape[-3]
    if c != len(n.mean):
        raise ValueError(f"normalisation {n.name!r} is for {len(n.mean)} bands but the input has {c}")
    mean, std = n.tensors(device=x.device, dtype=x.dtype)
    return (x - mean) / std
