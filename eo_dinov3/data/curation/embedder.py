"""Backbone → tile embedding function used by the curation pipeline.

A backbone is named by :class:`EmbedderSpec`:

* ``backbone="dinov3_vits16"`` … ``"dinov3_vit7b16"`` (official architectures, :mod:`eo_dinov3.hub`) with
  ``weights=None`` (random initialisation — only for tests and demos) or a local weights file (official SAT-493M /
  LVD-1689M, ``teacher_checkpoint.pth``, ours; loaded by :func:`eo_dinov3.checkpoints.load_backbone`);
* ``backbone="checkpoint"`` with ``weights=PATH``: the architecture is read from the file;
* ``backbone="timm:NAME"``: ``timm.create_model(NAME, pretrained=False, num_classes=0)`` (+ a local state dict in
  ``weights``); the model's pooled output is the embedding.

The embedding of a DINOv3 backbone is its normalised class token (``x_norm_clstoken``), L2-normalised so that
cosine similarity is a dot product and squared L2 distance is ``2 - 2 cos``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from eo_dinov3.data.normalization import normalize
from eo_dinov3.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedderSpec:
    """What embeds a tile.

    Attributes:
        backbone: hub name, ``"checkpoint"`` or ``"timm:NAME"`` (module docstring).
        weights: local weights file (``None``: random initialisation, hub names and timm only).
        overrides: architecture overrides for hub names (e.g. ``{"embed_dim": 64, "depth": 2}``).
        image_size: tiles are resized to ``image_size`` × ``image_size`` pixels (bilinear, antialiased).
        normalization: preset of :mod:`eo_dinov3.data.normalization` (``sat493m`` for SAT-493M weights).
        bands: 1-based bands read from each tile (their number must match the backbone's input channels).
        pooling: DINOv3 backbones: ``"cls"`` (normalised class token, for trained weights), ``"patch_mean"`` (mean
            of the normalised patch tokens) or ``"cls_patch_mean"`` (both, concatenated, as DINOv3 linear probes).
            With *random* weights use ``"patch_mean"``: the official init (LayerScale 1e-5) leaves the class token
            almost input-independent, while patch tokens stay a random projection of the pixels.
    """

    backbone: str = "dinov3_vits16"
    weights: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    image_size: int = 224
    normalization: str = "sat493m"
    bands: tuple[int, ...] = (1, 2, 3)
    pooling: str = "cls"

    def __post_init__(self) -> None:
        if self.pooling not in ("cls", "patch_mean", "cls_patch_mean"):
            raise ConfigError(f"pooling must be 'cls', 'patch_mean' or 'cls_patch_mean', not {self.pooling!r}")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bands"] = list(self.bands)
        return d

    def key(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True)


def build_model(spec: EmbedderSpec, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The backbone of ``spec`` in eval mode on ``device``."""
    name = spec.backbone
    if name.startswith("timm:"):
        import timm

        with torch.random.fork_rng(devices=[]):  # same random init in every rank / dask worker
            torch.manual_seed(0)
            model = timm.create_model(name[5:], pretrained=False, num_classes=0, **spec.overrides)
        if spec.weights:
            from eo_dinov3.errors import CheckpointError

            try:
                sd = torch.load(spec.weights, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"cannot read timm weights {spec.weights!r}: {e}") from e
            sd = sd.get("state_dict", sd.get("model", sd)) if isinstance(sd, dict) else sd
            missing, unexpected = model.load_state_dict(sd, strict=False)
            bad = [k for k in missing if not k.startswith(("head", "fc.", "classifier"))]
            if bad:
                raise CheckpointError(f"{spec.weights!r} does not fit timm model {name[5:]!r}: missing {bad[:5]}")
    elif name == "checkpoint":
        if not spec.weights:
            raise ConfigError("backbone 'checkpoint' needs weights=<local checkpoint path>")
        from eo_dinov3.checkpoints import load_backbone

        model = load_backbone(spec.weights, **spec.overrides)
    else:
        from eo_dinov3.hub import ARCHS, build_backbone

        if name not in ARCHS:
            raise ConfigError(f"unknown backbone {name!r}; use one of {sorted(ARCHS)}, 'checkpoint' or 'timm:NAME'")
        if spec.weights:
            model = build_backbone(name, pretrained=True, weights=spec.weights, **spec.overrides)
        else:
            log.warning("backbone %s has random weights: clusters will follow colour/texture only", name)
            with torch.random.fork_rng(devices=[]):  # same random weights in every rank / dask worker
                torch.manual_seed(0)
                model = build_backbone(name, pretrained=False, **spec.overrides)
    return model.to(device).eval()


def preprocess_tile(tile: torch.Tensor, image_size: int) -> torch.Tensor:
    """One tile ``[C, H, W]`` (uint8 0–255 or float 0–1) → ``[C, S, S]`` float32 in [0, 1], ``S = image_size``."""
    x = tile.float() / 255.0 if tile.dtype == torch.uint8 else tile.float()
    s = int(image_size)
    if tuple(x.shape[-2:]) != (s, s):
        x = F.interpolate(x[None], size=(s, s), mode="bilinear", antialias=True, align_corners=False)[0]
    return x.clamp_(0.0, 1.0)


class Embedder:
    """Maps ``uint8``/``float`` tiles to L2-normalised embeddings.

    Args:
        spec: the backbone (:class:`EmbedderSpec`).
        device: torch device; bf16 autocast is used on CUDA.
        model: an already built module (overrides ``spec.backbone``; used by tests).
    """

    def __init__(self, spec: EmbedderSpec, device: torch.device | str = "cpu",
                 model: torch.nn.Module | None = None) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.model = (model.to(self.device).eval() if model is not None else build_model(spec, self.device))

    def preprocess(self, tile: torch.Tensor) -> torch.Tensor:
        """See :func:`preprocess_tile`."""
        return preprocess_tile(tile, self.spec.image_size)

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        """``batch [B, C, S, S]`` in [0, 1] (from :meth:`preprocess`) → ``[B, D]`` float32 unit vectors."""
        x = normalize(batch.to(self.device, non_blocking=True), self.spec.normalization)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            if hasattr(self.model, "forward_features") and not self.spec.backbone.startswith("timm:"):
                out = self.model.forward_features(x)
                if not isinstance(out, dict):
                    feats = out
                elif self.spec.pooling == "cls":
                    feats = out["x_norm_clstoken"]
                elif self.spec.pooling == "patch_mean":
                    feats = out["x_norm_patchtokens"].mean(1)
                else:
                    feats = torch.cat([out["x_norm_clstoken"], out["x_norm_patchtokens"].mean(1)], dim=1)
            else:
                feats = self.model(x)
        feats = F.normalize(feats.float().flatten(1), dim=1)
        return feats.cpu().numpy()
