"""Named backbone constructors with the official DINOv3 names and arguments, plus weight loading.

>>> from eo_dinov3.hub import dinov3_vitl16
>>> model = dinov3_vitl16(weights="dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth")  # local file, never downloaded
>>> model = dinov3_vits16(pretrained=False)                                          # random init

``weights`` is a local path to an official hub ``.pth`` file, an official training ``teacher_checkpoint.pth``,
a timm or Hugging Face (``DINOv3ViTModel``, safetensors) checkpoint, or one of our own checkpoints; the layout is
detected from the keys (see :mod:`eo_dinov3.checkpoints`). The satellite (SAT-493M) ViT-L is recognised from its
``local_cls_norm`` keys, so a renamed file loads. ``weights="LVD1689M"`` / ``"SAT493M"`` looks for the official file
name in ``$DINOV3_WEIGHTS_DIR`` and the torch hub cache.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from eo_dinov3.models.vision_transformer import DinoVisionTransformer, ViTConfig

# Settings shared by every hub ViT (official dinov3/hub/backbones.py).
_COMMON: dict[str, Any] = dict(
    img_size=224,
    patch_size=16,
    in_chans=3,
    pos_embed_rope_base=100.0,
    pos_embed_rope_normalize_coords="separate",
    pos_embed_rope_rescale_coords=2.0,
    pos_embed_rope_dtype="fp32",
    qkv_bias=True,
    layerscale_init=1e-5,
    norm_layer="layernormbf16",
    ffn_bias=True,
    proj_bias=True,
    n_storage_tokens=4,
    mask_k_bias=True,
    drop_path_rate=0.0,
)

#: official hub name -> architecture (differences from ``_COMMON``)
ARCHS: dict[str, dict[str, Any]] = {
    "dinov3_vits16": dict(embed_dim=384, depth=12, num_heads=6, ffn_ratio=4.0, ffn_layer="mlp"),
    "dinov3_vits16plus": dict(embed_dim=384, depth=12, num_heads=6, ffn_ratio=6.0, ffn_layer="swiglu"),
    "dinov3_vitb16": dict(embed_dim=768, depth=12, num_heads=12, ffn_ratio=4.0, ffn_layer="mlp"),
    "dinov3_vitl16": dict(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=4.0, ffn_layer="mlp"),
    "dinov3_vitl16plus": dict(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=6.0, ffn_layer="swiglu"),
    "dinov3_vith16plus": dict(embed_dim=1280, depth=32, num_heads=20, ffn_ratio=6.0, ffn_layer="swiglu"),
    "dinov3_vit7b16": dict(
        embed_dim=4096,
        depth=40,
        num_heads=32,
        ffn_ratio=3.0,
        ffn_layer="swiglu64",
        qkv_bias=False,
        untie_global_and_local_cls_norm=True,
    ),
}

#: official weight file hashes (``<base>/dinov3_<arch>/dinov3_<arch>_pretrain_<dataset>-<hash>.pth``)
WEIGHT_HASHES: dict[tuple[str, str], str] = {
    ("dinov3_vits16", "lvd1689m"): "08c60483",
    ("dinov3_vits16plus", "lvd1689m"): "4057cbaa",
    ("dinov3_vitb16", "lvd1689m"): "73cec8be",
    ("dinov3_vitl16", "lvd1689m"): "8aa4cbdd",
    ("dinov3_vitl16", "sat493m"): "eadcf0ff",
    ("dinov3_vitl16plus", "lvd1689m"): "46503df0",
    ("dinov3_vith16plus", "lvd1689m"): "7c1da9a5",
    ("dinov3_vit7b16", "lvd1689m"): "a955f4ea",
    ("dinov3_vit7b16", "sat493m"): "a6675841",
}

#: normalisation preset that matches each released weight set
WEIGHTS_NORMALIZATION = {"lvd1689m": "lvd1689m", "sat493m": "sat493m"}


def official_weight_filename(name: str, dataset: str) -> str:
    """The file name Meta publishes, e.g. ``dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth``."""
    dataset = dataset.lower()
    try:
        h = WEIGHT_HASHES[(name, dataset)]
    except KeyError:
        raise ValueError(f"Meta released no {dataset} weights for {name}") from None
    return f"{name}_pretrain_{dataset}-{h}.pth"


def arch_config(name: str, **overrides: Any) -> ViTConfig:
    """The :class:`ViTConfig` of an official backbone name, with overrides (e.g. ``in_chans=4``)."""
    if name not in ARCHS:
        raise ValueError(f"unknown backbone {name!r}; choose from {sorted(ARCHS)}")
    return ViTConfig(**{**_COMMON, **ARCHS[name], **overrides})


def build_backbone(
    name: str,
    *,
    pretrained: bool = True,
    weights: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    check_hash: bool = False,
    **overrides: Any,
) -> DinoVisionTransformer:
    """Build an official-architecture backbone; load ``weights`` (local file) when ``pretrained``.

    ``check_hash`` is accepted for signature compatibility with the official hub (files are verified by their
    keys and shapes instead). The 7B is built on the ``meta`` device when no weights are given (no memory)."""
    del check_hash
    if pretrained and weights is not None:
        from eo_dinov3.checkpoints import load_backbone

        return load_backbone(weights, arch=name, device=device, **overrides)
    if pretrained:
        from eo_dinov3.errors import CheckpointError

        raise CheckpointError(
            f"{name}: pretrained=True needs weights=<local checkpoint path> (eo_dinov3 never downloads; "
            f"Meta's file is named {official_weight_filename(name, 'lvd1689m')}); use pretrained=False for a "
            "randomly initialised model"
        )
    if device is None and name == "dinov3_vit7b16":
        device = "meta"
    return DinoVisionTransformer(arch_config(name, **overrides), device=device)


def _constructor(name: str):
    def fn(
        *,
        pretrained: bool = True,
        weights: str | os.PathLike | None = None,
        check_hash: bool = False,
        **kwargs: Any,
    ) -> DinoVisionTransformer:
        return build_backbone(name, pretrained=pretrained, weights=weights, check_hash=check_hash, **kwargs)

    a = ARCHS[name]
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = (
        f"DINOv3 {name}: D={a['embed_dim']}, depth {a['depth']}, {a['num_heads']} heads, {a['ffn_layer']} FFN "
        f"(ratio {a['ffn_ratio']}), patch 16, 4 storage tokens, RoPE.\n\n"
        "``weights``: local checkpoint path (official/timm/HF/ours, detected from its keys) or 'LVD1689M'/'SAT493M'\n"
        "(looked up by the official file name in $DINOV3_WEIGHTS_DIR and the torch hub cache). ``pretrained=False``\n"
        "gives the official random initialisation. Extra keyword arguments override the architecture\n"
        "(e.g. ``in_chans=4``, ``drop_path_rate=0.1``, ``device='meta'``)."
    )
    return fn


dinov3_vits16 = _constructor("dinov3_vits16")
dinov3_vits16plus = _constructor("dinov3_vits16plus")
dinov3_vitb16 = _constructor("dinov3_vitb16")
dinov3_vitl16 = _constructor("dinov3_vitl16")
dinov3_vitl16plus = _constructor("dinov3_vitl16plus")
dinov3_vith16plus = _constructor("dinov3_vith16plus")
dinov3_vit7b16 = _constructor("dinov3_vit7b16")

BACKBONES = {name: globals()[name] for name in ARCHS}


def dinov3_vitl16_chmv2(
    *,
    pretrained: bool = True,
    weights: str | os.PathLike | None = None,
    backbone_weights: str | os.PathLike | None = None,
    check_hash: bool = False,
    device: torch.device | str | None = None,
    **kwargs: Any,
):
    """CHMv2 canopy-height model (Meta): SAT-493M ViT-L/16 + DPT head, heights in metres
    (:class:`eo_dinov3.canopy.model.CanopyHeightModel`).

    ``weights``: local official head file ``dinov3_vitl16_chmv2_dpt_head-3703d643.pth`` (then ``backbone_weights``
    = local ``dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth``), or a local Hugging Face
    ``facebook/dinov3-vitl16-chmv2-dpt-head`` folder / ``.safetensors`` (backbone included). ``pretrained=False``
    gives random weights. ``check_hash`` is accepted for signature compatibility with the official hub."""
    del check_hash
    from eo_dinov3.canopy.model import build_chmv2

    return build_chmv2(
        pretrained=pretrained, weights=weights, backbone_weights=backbone_weights, device=device, **kwargs
    )


# ---------------------------------------------------------------------------------------------------------------
# ConvNeXt backbones (official dinov3/hub/backbones.py names; LVD-1689M weights only)
# ---------------------------------------------------------------------------------------------------------------


def _convnext_constructor(size: str):
    def fn(
        *,
        pretrained: bool = True,
        weights: str | os.PathLike | None = None,
        check_hash: bool = False,
        device: torch.device | str | None = None,
        **kwargs: Any,
    ):
        from eo_dinov3.errors import CheckpointError
        from eo_dinov3.models.convnext import CONVNEXT_HASHES, ConvNeXt, convnext_config, load_convnext

        del check_hash
        kwargs.pop("hash", None)
        if pretrained and weights is not None:
            return load_convnext(weights, size=size, device=device, **kwargs)
        if pretrained:
            raise CheckpointError(
                f"dinov3_convnext_{size}: pretrained=True needs weights=<local checkpoint path> (eo_dinov3 never "
                f"downloads; Meta's file is named dinov3_convnext_{size}_pretrain_lvd1689m-{CONVNEXT_HASHES[size]}"
                ".pth); use pretrained=False for a randomly initialised model"
            )
        return ConvNeXt(convnext_config(size, **kwargs), device=device)

    fn.__name__ = fn.__qualname__ = f"dinov3_convnext_{size}"
    fn.__doc__ = (
        f"DINOv3 ConvNeXt-{size.capitalize()} (:class:`eo_dinov3.models.convnext.ConvNeXt`, official layout).\n\n"
        "``weights``: local official hub ``.pth``, training export or ``save_convnext`` file, or 'LVD1689M' (looked\n"
        "up by the official file name in $DINOV3_WEIGHTS_DIR and the torch hub cache); ``pretrained=False`` gives\n"
        "the official random initialisation. Extra keyword arguments override the config (``in_chans``,\n"
        "``drop_path_rate``, ``patch_size`` …)."
    )
    return fn


dinov3_convnext_tiny = _convnext_constructor("tiny")
dinov3_convnext_small = _convnext_constructor("small")
dinov3_convnext_base = _convnext_constructor("base")
dinov3_convnext_large = _convnext_constructor("large")
