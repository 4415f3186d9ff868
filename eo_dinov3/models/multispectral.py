"""Turn 3-band (RGB) DINOv3 weights into N-band weights for multispectral input.

Convention (as in the official metadata-guided DINOv3 branch): the patch-embedding filter of an input band that is
one of red/green/blue keeps its pretrained RGB filter, every other band starts from the **mean RGB filter**, and the
whole patch-embedding weight is rescaled by ``3/N`` so that the expected pre-activation magnitude is unchanged when
all bands carry similar normalised values. The bias is kept. The band list is recorded in ``ViTConfig.bands``.

>>> model = dinov3_vitl16(weights=path)                                   # RGB weights
>>> ms = adapt_model_bands(model, ["blue", "green", "red", "nir"])          # 4-band model
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import Tensor

from eo_dinov3.models.vision_transformer import DinoVisionTransformer

#: band-name aliases (lower case) of the three RGB channels, index = channel in RGB weights
RGB_ALIASES: dict[str, int] = {
    **dict.fromkeys(["r", "red", "b04", "b4", "band4_red"], 0),
    **dict.fromkeys(["g", "green", "b03", "b3", "band3_green"], 1),
    **dict.fromkeys(["b", "blue", "b02", "b2", "band2_blue"], 2),
}


def rgb_index(band: str) -> int | None:
    """0/1/2 if ``band`` names red/green/blue (Sentinel-2 ``B04``/``B03``/``B02`` included), else None."""
    return RGB_ALIASES.get(band.strip().lower())


def adapt_patch_embed_weight(weight: Tensor, bands: Sequence[str]) -> Tensor:
    """``[D, 3, p, p]`` RGB patch-embedding weight -> ``[D, N, p, p]`` for ``bands`` (module doc convention)."""
    if weight.ndim != 4 or weight.shape[1] != 3:
        raise ValueError(f"expected an RGB patch-embedding weight [D, 3, p, p], got {list(weight.shape)}")
    if not bands:
        raise ValueError("bands must name at least one band")
    mean_filter = weight.mean(dim=1)
    chans = []
    for band in bands:
        i = rgb_index(band)
        chans.append(weight[:, i] if i is not None else mean_filter)
    return torch.stack(chans, dim=1) * (3.0 / len(bands))


def adapt_state_dict_bands(state_dict: dict[str, Tensor], bands: Sequence[str]) -> dict[str, Tensor]:
    """Copy of an official-layout state dict whose ``patch_embed.proj.weight`` is adapted to ``bands``."""
    out = dict(state_dict)
    out["patch_embed.proj.weight"] = adapt_patch_embed_weight(state_dict["patch_embed.proj.weight"], bands)
    return out


def adapt_model_bands(model: DinoVisionTransformer, bands: Sequence[str]) -> DinoVisionTransformer:
    """A new model with ``in_chans=len(bands)`` and adapted patch embedding; every other tensor is copied."""
    if model.config.in_chans != 3:
        raise ValueError(f"adapting needs an RGB (3-band) model, this one has {model.config.in_chans} bands")
    config = dataclasses.replace(model.config, in_chans=len(bands), bands=list(bands))
    device = model.cls_token.device
    new = DinoVisionTransformer(config, device=device)
    new.load_state_dict(adapt_state_dict_bands(model.state_dict(), bands), strict=True)
    return new.train(model.training)
