"""Canopy-height model: a frozen DINOv3 backbone + DPT head → heights in metres, CHMv2-compatible.

>>> from eo_dinov3.canopy.model import CanopyHeightModel
>>> model = CanopyHeightModel.from_official("dinov3_vitl16_chmv2_dpt_head-3703d643.pth",
...                                         "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth")
>>> heights = model.predict_heights(rgb_uint8)          # [H, W, 3] or [3, H, W] uint8 -> [1, 1, H, W] metres

Pipeline of :meth:`CanopyHeightModel.forward` for a normalised ``[B, 3, H, W]`` batch:

1. centre zero-padding (after normalisation, as the official ``CenterPadding``) to ``H', W'`` multiples of
   ``pad_multiple`` (default 32 = an even 16-px patch grid; identical to the official ``CenterPadding(16)``
   whenever that already gives an even grid; for an odd grid the official output is distorted, see
   :mod:`eo_dinov3.models.dpt`, so one more patch row/column is padded instead);
2. ``backbone.get_intermediate_layers(n=taps, reshape=True, return_class_token=True, norm=...)``;
3. DPT head → logits ``[B, K, H', W']`` → :class:`~eo_dinov3.models.dpt.FeaturesToDepth` → ``[B, 1, H', W']`` m;
4. the padding is **cropped** off (never resized: the official notebook and HF post-processing resize the
   padded map back, which shifts edge pixels) → ``[B, 1, H, W]`` metres.

Expected input (CHMv2): RGB uint8 at ~0.6 m GSD (SAT-493M pretraining; CHMv2 does not state it), normalised with
the ``chmv2`` preset (mean 0.420, 0.411, 0.296; std 0.213, 0.156, 0.143). See :attr:`CanopyHeightModel.metadata`.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eo_dinov3.data.normalization import Normalization, get_normalization
from eo_dinov3.errors import CheckpointError, ConfigError, DataError
from eo_dinov3.models.dpt import DPTConfig, DPTHead, FeaturesToDepth
from eo_dinov3.models.vision_transformer import DinoVisionTransformer

#: expected ground sampling distance of CHMv2 inputs, metres/pixel (SAT-493M pretraining imagery)
CHMV2_GSD_M = 0.6
#: official file name of the CHMv2 DPT head
CHMV2_HEAD_FILENAME = "dinov3_vitl16_chmv2_dpt_head-3703d643.pth"


class CanopyHeightModel(nn.Module):
    """Backbone + DPT head predicting canopy height in metres; the backbone is frozen by default.

    ``taps`` (0-based blocks) and ``use_backbone_norm`` default to the head config's ``backbone_out_layers`` /
    ``use_backbone_norm``; ``normalization`` is the preset :meth:`predict_heights` applies; ``gsd_m`` is the input
    GSD the weights expect (metadata, not enforced here)."""

    def __init__(
        self,
        backbone: DinoVisionTransformer,
        head: DPTHead,
        *,
        normalization: str | Normalization = "chmv2",
        taps: Sequence[int] | None = None,
        use_backbone_norm: bool | None = None,
        patch_size: int | None = None,
        pad_multiple: int | None = None,
        gsd_m: float | None = CHMV2_GSD_M,
        freeze_backbone: bool = True,
        name: str = "chmv2",
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        cfg = head.config
        self.features_to_height = FeaturesToDepth.from_config(cfg)
        self.taps = tuple(int(t) for t in (taps if taps is not None else cfg.backbone_out_layers))
        self.use_backbone_norm = cfg.use_backbone_norm if use_backbone_norm is None else bool(use_backbone_norm)
        self.patch_size = int(patch_size or backbone.patch_size)
        self.pad_multiple = int(pad_multiple or 2 * self.patch_size)
        if self.pad_multiple % self.patch_size:
            raise ConfigError(f"pad_multiple {self.pad_multiple} must be a multiple of patch size {self.patch_size}")
        self.normalization = get_normalization(normalization)
        self.gsd_m = gsd_m
        self.name = name
        depth = getattr(backbone, "n_blocks", None)
        if len(self.taps) != 4 or (depth is not None and not all(0 <= t < depth for t in self.taps)):
            raise ConfigError(f"taps {list(self.taps)} must be 4 block indices in [0, {depth})")
        dim = getattr(backbone, "embed_dim", None)
        if dim is not None and any(c != dim for c in cfg.in_channels):
            raise ConfigError(f"head in_channels {list(cfg.in_channels)} do not match the backbone width {dim}")
        if freeze_backbone:
            backbone.requires_grad_(False)

    # ------------------------------------------------------------------ metadata
    @property
    def metadata(self) -> dict[str, Any]:
        """What the model expects and returns (units, GSD, normalisation, height range)."""
        c = self.head.config
        return {
            "name": self.name,
            "units": "m",
            "expected_gsd_m": self.gsd_m,
            "input": "RGB, uint8 (or float in [0, 1]) before normalisation",
            "normalization": self.normalization.name,
            "mean": self.normalization.mean,
            "std": self.normalization.std,
            "taps": list(self.taps),
            "patch_size": self.patch_size,
            "pad_multiple": self.pad_multiple,
            "output": f"{c.bins_strategy} bins x{c.n_output_channels}" if c.n_output_channels > 1 else "regression",
            "height_range_m": (c.min_depth * (8 if c.norm_strategy == "chmv2_mixlog" else 1), c.max_depth),
        }

    # ------------------------------------------------------------------ padding
    def padding(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Centre padding ``(top, bottom, left, right)`` in pixels; the odd pixel goes to the bottom/right."""
        m = self.pad_multiple

        def split(n: int) -> tuple[int, int]:
            extra = math.ceil(n / m) * m - n
            return extra // 2, extra - extra // 2

        top, bottom = split(height)
        left, right = split(width)
        return top, bottom, left, right

    def pad(self, x: Tensor) -> tuple[Tensor, tuple[int, int, int, int]]:
        """Zero-pad a normalised ``[B, C, H, W]`` batch; returns (padded batch, (top, bottom, left, right))."""
        t, b, l, r = self.padding(x.shape[-2], x.shape[-1])
        return F.pad(x, (l, r, t, b)), (t, b, l, r)

    # ------------------------------------------------------------------ forward
    def encode(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Tapped layers of a padded batch: 4 × (patch map ``[B, D, H'/16, W'/16]``, CLS ``[B, D]``)."""
        return list(
            self.backbone.get_intermediate_layers(
                x, n=list(self.taps), reshape=True, return_class_token=True, norm=self.use_backbone_norm
            )
        )

    def forward_padded(self, x: Tensor) -> tuple[Tensor, tuple[int, int, int, int]]:
        """Heights ``[B, 1, H', W']`` (metres) at the padded size, and the padding ``(top, bottom, left, right)``."""
        if x.ndim != 4:
            raise DataError(f"expected a normalised batch [B, C, H, W], got shape {list(x.shape)}")
        xp, pads = self.pad(x)
        logits = self.head(self.encode(xp))
        if logits.shape[-2:] != xp.shape[-2:]:
            raise ConfigError(
                f"head output {tuple(logits.shape[-2:])} != padded input {tuple(xp.shape[-2:])}: the patch grid is "
                f"odd; use pad_multiple={2 * self.patch_size} (the default)"
            )
        return self.features_to_height(logits), pads

    def forward(self, x: Tensor) -> Tensor:
        """Normalised ``[B, 3, H, W]`` → canopy height ``[B, 1, H, W]`` in metres (padding cropped off)."""
        h, (t, b, l, r) = self.forward_padded(x)
        return h[..., t : h.shape[-2] - b, l : h.shape[-1] - r]

    @torch.inference_mode()
    def predict_heights(self, image: Tensor | np.ndarray) -> Tensor:
        """Heights in metres ``[B, 1, H, W]`` (float32, model device) for raw RGB: uint8 (divided by 255) or float
        in ``[0, 1]``; layout ``[H, W, 3]``, ``[3, H, W]`` or ``[B, 3, H, W]``. Normalises with
        :attr:`normalization`; runs in eval mode without gradients."""
        x = torch.as_tensor(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
        c = len(self.normalization.mean)
        if x.ndim == 3:
            x = x.unsqueeze(0) if x.shape[0] == c else x.permute(2, 0, 1).unsqueeze(0)
        if x.ndim != 4 or x.shape[1] != c:
            raise DataError(f"expected an RGB image [H, W, {c}], [{c}, H, W] or [B, {c}, H, W]; got {list(x.shape)}")
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        elif x.is_floating_point():
            if x.numel() and float(x.max()) > 1.0 + 1e-6:
                raise DataError(
                    "float image has values > 1: scale it to [0, 1] first (or pass the uint8 array, which is /255)"
                )
            x = x.float()
        else:
            raise DataError(f"unsupported image dtype {x.dtype}: pass uint8 RGB or float in [0, 1]")
        p = next(self.parameters())
        mean, std = self.normalization.tensors(device=p.device, dtype=torch.float32)
        x = (x.to(p.device) - mean) / std
        was_training = self.training
        self.eval()
        try:
            return self(x.to(p.dtype)).float()
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def chmv2(
        cls, backbone: DinoVisionTransformer | None = None, *, device: torch.device | str | None = None, **kwargs: Any
    ) -> "CanopyHeightModel":
        """Randomly initialised CHMv2 architecture (ViT-L/16 SAT layout + CHMv2 DPT head, 33.7 M parameters)."""
        if backbone is None:
            from eo_dinov3.hub import dinov3_vitl16

            backbone = dinov3_vitl16(pretrained=False, untie_global_and_local_cls_norm=True, device=device)
        head = DPTHead(DPTConfig.chmv2(embed_dim=backbone.embed_dim), device=device)
        return cls(backbone, head, **kwargs)

    @classmethod
    def from_official(
        cls,
        head_path: str | os.PathLike,
        backbone_path: str | os.PathLike | DinoVisionTransformer,
        *,
        head_config: DPTConfig | None = None,
        device: torch.device | str | None = None,
        **kwargs: Any,
    ) -> "CanopyHeightModel":
        """Load Meta's CHMv2 files: the DPT head ``.pth`` (strict) and the SAT-493M ViT-L backbone ``.pth`` (or a
        backbone module). ``head_config`` defaults to :meth:`DPTConfig.chmv2` for the backbone width."""
        backbone = backbone_path if isinstance(backbone_path, nn.Module) else load_backbone_file(backbone_path)
        head = DPTHead(head_config or DPTConfig.chmv2(embed_dim=backbone.embed_dim))
        _load_strict(head, read_official_head(head_path), f"CHMv2 head {head_path}")
        model = cls(backbone, head, **kwargs)
        return model.to(device) if device is not None else model

    @classmethod
    def from_hf(cls, path: str | os.PathLike, *, device: torch.device | str | None = None, **kwargs: Any):
        """Load a Hugging Face ``CHMv2ForDepthEstimation`` folder or ``.safetensors`` file (backbone + head)."""
        from eo_dinov3.canopy import hf_chmv2
        from eo_dinov3.hub import arch_config

        sd, config = hf_chmv2.read_hf_checkpoint(path)
        if not hf_chmv2.is_hf_chmv2_state_dict(sd):
            raise CheckpointError(f"{path}: not a Hugging Face CHMv2 checkpoint (no head.reassemble_stage.* keys)")
        config = config or {}
        for note in hf_chmv2.check_hf_config(config) if config else []:
            warnings.warn(f"{path}: {note}; eo_dinov3 computes like the official model", stacklevel=2)
        bb = config.get("backbone_config") or {}
        backbone_sd, head_sd = hf_chmv2.hf_to_official_state_dicts(
            sd, num_heads=bb.get("num_attention_heads"), rope_base=bb.get("rope_theta", 100.0)
        )
        dim = backbone_sd["cls_token"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in backbone_sd if k.startswith("blocks."))
        overrides = dict(untie_global_and_local_cls_norm=True)
        if (dim, depth) != (1024, 24):
            overrides.update(
                embed_dim=dim,
                depth=depth,
                num_heads=bb.get("num_attention_heads", dim // 64),
                ffn_ratio=backbone_sd["blocks.0.mlp.fc1.weight"].shape[0] / dim,
            )
        backbone = DinoVisionTransformer(arch_config("dinov3_vitl16", **overrides))
        _load_strict(backbone, backbone_sd, f"CHMv2 backbone from {path}")
        head_cfg = hf_chmv2.dpt_config_from_hf(config) if config else DPTConfig.chmv2(embed_dim=dim)
        head = DPTHead(head_cfg)
        _load_strict(head, head_sd, f"CHMv2 head from {path}")
        model = cls(backbone, head, **kwargs)
        return model.to(device) if device is not None else model


# --------------------------------------------------------------------------------------------- file helpers
def _load_strict(module: nn.Module, sd: dict[str, Tensor], what: str) -> None:
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(first[1:3])[:300] if len(first) > 1 else first[0][:300]
        raise CheckpointError(f"{what} does not fit the architecture: {detail}") from None


def read_official_head(path: str | os.PathLike) -> dict[str, Tensor]:
    """The decoder state dict of an official head file (plain state dict, ``{"model": ...}`` or a full
    depther state dict whose ``decoder.*`` keys are taken)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file (the CHMv2 head is distributed as {CHMV2_HEAD_FILENAME})")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{p}: cannot read as a PyTorch checkpoint ({type(e).__name__})") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p}: expected a state dict, got {type(obj).__name__}")
    if any(k.startswith("decoder.") for k in obj):
        obj = {k[len("decoder.") :]: v for k, v in obj.items() if k.startswith("decoder.")}
    return obj


def load_backbone_file(path: str | os.PathLike, arch: str = "dinov3_vitl16") -> DinoVisionTransformer:
    """A backbone from a local checkpoint: through :func:`eo_dinov3.checkpoints.load_backbone` (layout detection)
    when that module is installed, otherwise an official hub ``.pth`` loaded strictly (SAT-493M ``local_cls_norm``
    keys switch on ``untie_global_and_local_cls_norm``)."""
    try:
        from eo_dinov3.checkpoints import load_backbone
    except ModuleNotFoundError as e:
        if e.name != "eo_dinov3.checkpoints":
            raise
        load_backbone = None
    if load_backbone is not None:
        return load_backbone(path, arch=arch)

    from eo_dinov3.hub import build_backbone

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such backbone file (e.g. dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth)")
    sd = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    model = build_backbone(arch, pretrained=False, untie_global_and_local_cls_norm="local_cls_norm.weight" in sd)
    _load_strict(model, sd, f"backbone {p}")
    return model


def build_chmv2(
    *,
    pretrained: bool = True,
    weights: str | os.PathLike | None = None,
    backbone_weights: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    **kwargs: Any,
) -> CanopyHeightModel:
    """CHMv2 from local files: official head + backbone ``.pth`` files, or one Hugging Face
    ``facebook/dinov3-vitl16-chmv2-dpt-head`` folder / ``.safetensors`` (backbone included); random with
    ``pretrained=False``. Nothing is downloaded."""
    if not pretrained:
        return CanopyHeightModel.chmv2(device=device, **kwargs)
    if weights is None:
        raise CheckpointError(
            f"dinov3_vitl16_chmv2: pretrained=True needs weights=<local {CHMV2_HEAD_FILENAME} or HF CHMv2 folder> "
            "(eo_dinov3 never downloads); use pretrained=False for random weights"
        )
    p = Path(weights)
    if p.is_dir() or p.suffix == ".safetensors":
        if backbone_weights is not None:
            raise ConfigError(
                "a Hugging Face CHMv2 checkpoint already contains the backbone; drop backbone_weights"
            )
        return CanopyHeightModel.from_hf(p, device=device, **kwargs)
    if backbone_weights is None:
        raise CheckpointError(
            "the official CHMv2 head needs backbone_weights=<local dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth>"
        )
    return CanopyHeightModel.from_official(p, backbone_weights, device=device, **kwargs)


__all__ = [
    "CanopyHeightModel",
    "build_chmv2",
    "load_backbone_file",
    "read_official_head",
    "CHMV2_GSD_M",
    "CHMV2_HEAD_FILENAME",
]
