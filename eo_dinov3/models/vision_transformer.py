"""The DINOv3 Vision Transformer (patch 16, CLS + storage/register tokens, RoPE, LayerScale, MLP or SwiGLU FFN).

Numerically the official ``dinov3.models.vision_transformer.DinoVisionTransformer`` (same constructor arguments,
same state-dict keys, same outputs) so that Meta's released checkpoints load strictly and give the same features.

Token sequence: ``[CLS (1), storage (R), patches (P = H/16 · W/16, row-major)]``. Outputs of
:meth:`DinoVisionTransformer.forward_features` (per image batch ``[B, C, H, W]``):

* ``x_norm_clstoken``   ``[B, D]``  final-normed CLS token
* ``x_storage_tokens``  ``[B, R, D]`` final-normed storage tokens
* ``x_norm_patchtokens`` ``[B, P, D]`` final-normed patch tokens
* ``x_prenorm``         ``[B, 1+R+P, D]`` un-normed final tokens
* ``masks``             the masks passed in
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from eo_dinov3.models.layers import (
    NORM_LAYERS,
    LayerScale,
    LinearKMaskedBias,
    PatchEmbed,
    RMSNorm,
    SelfAttentionBlock,
)
from eo_dinov3.models.rope import RopePositionEmbedding


@dataclass
class ViTConfig:
    """Constructor arguments of :class:`DinoVisionTransformer` (official names) plus EO metadata.

    ``bands`` (band names in input order), ``normalization`` (a preset name of :mod:`eo_dinov3.data.normalization`)
    and ``gsd_m`` (ground sampling distance the weights were trained at, metres/pixel) do not change the
    architecture; they travel with checkpoints so that users feed the model what it expects.
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    pos_embed_rope_base: float | None = 100.0
    pos_embed_rope_min_period: float | None = None
    pos_embed_rope_max_period: float | None = None
    pos_embed_rope_normalize_coords: str = "separate"
    pos_embed_rope_shift_coords: float | None = None
    pos_embed_rope_jitter_coords: float | None = None
    pos_embed_rope_rescale_coords: float | None = None
    pos_embed_rope_dtype: str = "fp32"
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    ffn_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    layerscale_init: float | None = None
    norm_layer: str = "layernorm"
    ffn_layer: str = "mlp"
    ffn_bias: bool = True
    proj_bias: bool = True
    n_storage_tokens: int = 0
    mask_k_bias: bool = False
    untie_cls_and_patch_norms: bool = False
    untie_global_and_local_cls_norm: bool = False
    # EO metadata (not architectural)
    bands: list[str] | None = None
    normalization: str | None = None
    gsd_m: float | None = None

    ARCH_FIELDS = (
        "patch_size in_chans pos_embed_rope_base pos_embed_rope_min_period pos_embed_rope_max_period "
        "pos_embed_rope_normalize_coords embed_dim depth num_heads ffn_ratio qkv_bias layerscale_init norm_layer "
        "ffn_layer ffn_bias proj_bias n_storage_tokens mask_k_bias untie_cls_and_patch_norms "
        "untie_global_and_local_cls_norm"
    ).split()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ViTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ViT config keys: {sorted(unknown)}")
        return cls(**d)


class DinoVisionTransformer(nn.Module):
    """DINOv3 ViT. Construct with official keyword arguments (see :class:`ViTConfig`) or ``config=ViTConfig(...)``.

    ``device="meta"`` builds without allocating memory (used for the 7B); materialise with
    ``model.to_empty(device=...)`` then ``model.init_weights()`` or ``load_state_dict``.
    """

    def __init__(self, config: ViTConfig | None = None, *, device: torch.device | str | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = ViTConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = c = config
        if c.embed_dim % c.num_heads:
            raise ValueError(f"embed_dim {c.embed_dim} is not divisible by num_heads {c.num_heads}")
        self.num_features = self.embed_dim = c.embed_dim
        self.n_blocks = c.depth
        self.num_heads = c.num_heads
        self.patch_size = c.patch_size
        self.n_storage_tokens = c.n_storage_tokens
        self.untie_cls_and_patch_norms = c.untie_cls_and_patch_norms
        self.untie_global_and_local_cls_norm = c.untie_global_and_local_cls_norm

        D = c.embed_dim
        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, D, device=device)
        self.cls_token = nn.Parameter(torch.empty(1, 1, D, device=device))
        if c.n_storage_tokens > 0:
            self.storage_tokens = nn.Parameter(torch.empty(1, c.n_storage_tokens, D, device=device))
        else:
            self.storage_tokens = None
        self.rope_embed = RopePositionEmbedding(
            D,
            num_heads=c.num_heads,
            base=c.pos_embed_rope_base,
            min_period=c.pos_embed_rope_min_period,
            max_period=c.pos_embed_rope_max_period,
            normalize_coords=c.pos_embed_rope_normalize_coords,
            shift_coords=c.pos_embed_rope_shift_coords,
            jitter_coords=c.pos_embed_rope_jitter_coords,
            rescale_coords=c.pos_embed_rope_rescale_coords,
            dtype=c.pos_embed_rope_dtype,
            device=device,
        )
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(
                D,
                c.num_heads,
                ffn_ratio=c.ffn_ratio,
                qkv_bias=c.qkv_bias,
                proj_bias=c.proj_bias,
                ffn_bias=c.ffn_bias,
                drop_path=c.drop_path_rate,
                init_values=c.layerscale_init,
                norm_layer=c.norm_layer,
                ffn_layer=c.ffn_layer,
                mask_k_bias=c.mask_k_bias,
                device=device,
            )
            for _ in range(c.depth)
        )
        make_norm = NORM_LAYERS[c.norm_layer]
        self.norm = make_norm(D, device=device)
        self.cls_norm = make_norm(D, device=device) if c.untie_cls_and_patch_norms else None
        self.local_cls_norm = make_norm(D, device=device) if c.untie_global_and_local_cls_norm else None
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.empty(1, D, device=device))
        if str(device) != "meta":
            self.init_weights()

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """Official initialisation: trunc-normal(0.02) Linears, zero biases, N(0, 0.02²) tokens, zero mask token,
        LayerNorm (1, 0), LayerScale at its init value, uniform patch embed, k-bias mask, RoPE periods."""
        self.rope_embed._init_weights()
        nn.init.normal_(self.cls_token, std=0.02)
        if self.storage_tokens is not None:
            nn.init.normal_(self.storage_tokens, std=0.02)
        nn.init.zeros_(self.mask_token)
        self.apply(_init_module)

    # ------------------------------------------------------------------ tokens
    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> tuple[Tensor, tuple[int, int]]:
        """``x [B, C, H, W]`` -> tokens ``[B, 1+R+P, D]`` and the patch grid ``(H/16, W/16)``. ``masks [B, P]`` bool
        replaces masked patch embeddings with ``mask_token``."""
        x = self.patch_embed(x)
        B, H, W, _ = x.shape
        x = x.flatten(1, 2)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
            cls_token = self.cls_token
        else:
            cls_token = self.cls_token + 0 * self.mask_token  # keeps mask_token in the graph (numerical no-op)
        parts = [cls_token.expand(B, -1, -1)]
        if self.storage_tokens is not None:
            parts.append(self.storage_tokens.expand(B, -1, -1))
        parts.append(x)
        return torch.cat(parts, dim=1), (H, W)

    def _norm_outputs(self, x: Tensor, masks: Tensor | None, local_entry: bool) -> dict[str, Tensor | None]:
        R = self.n_storage_tokens
        if self.untie_cls_and_patch_norms or self.untie_global_and_local_cls_norm:
            if self.untie_global_and_local_cls_norm and self.training and local_entry:
                cls_reg = self.local_cls_norm(x[:, : R + 1])
            elif self.untie_cls_and_patch_norms:
                cls_reg = self.cls_norm(x[:, : R + 1])
            else:
                cls_reg = self.norm(x[:, : R + 1])
            patch = self.norm(x[:, R + 1 :])
        else:
            x_norm = self.norm(x)
            cls_reg, patch = x_norm[:, : R + 1], x_norm[:, R + 1 :]
        return {
            "x_norm_clstoken": cls_reg[:, 0],
            "x_storage_tokens": cls_reg[:, 1:],
            "x_norm_patchtokens": patch,
            "x_prenorm": x,
            "masks": masks,
        }

    # ------------------------------------------------------------------ forward
    def forward_features_list(self, x_list: Sequence[Tensor], masks_list: Sequence[Tensor | None]) -> list[dict]:
        """Several crop sets (e.g. global, local) through shared weights; each entry keeps its own length.

        In training, RoPE coordinate augmentation is drawn per block and per entry (official order), and the
        second entry's CLS/storage use ``local_cls_norm`` when untied."""
        if len(x_list) != len(masks_list):
            raise ValueError("x and masks lists must have the same length")
        xs, grids = [], []
        for x, m in zip(x_list, masks_list):
            t, hw = self.prepare_tokens_with_masks(x, m)
            xs.append(t)
            grids.append(hw)
        for blk in self.blocks:
            ropes = [self.rope_embed(H=H, W=W) for H, W in grids]
            xs = [blk(t, r) for t, r in zip(xs, ropes)]
        return [self._norm_outputs(t, m, i == 1) for i, (t, m) in enumerate(zip(xs, masks_list))]

    def forward_features(
        self, x: Tensor | Sequence[Tensor], masks: Tensor | Sequence[Tensor | None] | None = None
    ) -> dict | list[dict]:
        """A tensor ``[B, C, H, W]`` -> dict of outputs (module doc); a list -> list of dicts (``masks`` a list)."""
        if isinstance(x, torch.Tensor):
            return self.forward_features_list([x], [masks])[0]
        if masks is None:
            masks = [None] * len(x)
        return self.forward_features_list(list(x), list(masks))

    def forward(self, *args, is_training: bool = False, **kwargs):
        """``is_training=True`` -> :meth:`forward_features` output; else ``head(x_norm_clstoken)`` ``[B, D]``."""
        ret = self.forward_features(*args, **kwargs)
        if is_training:
            return ret
        return self.head(ret["x_norm_clstoken"])

    def _intermediate(self, x: Tensor, n: int | Sequence[int]) -> list[Tensor]:
        x, (H, W) = self.prepare_tokens_with_masks(x)
        total = len(self.blocks)
        take = set(range(total - n, total)) if isinstance(n, int) else set(int(i) for i in n)
        bad = [i for i in take if not 0 <= i < total]
        if bad:
            raise ValueError(f"block indices {sorted(bad)} out of range for a {total}-block model")
        last = max(take)
        out = []
        for i, blk in enumerate(self.blocks[: last + 1]):
            x = blk(x, self.rope_embed(H=H, W=W))
            if i in take:
                out.append(x)
        return out

    def get_intermediate_layers(
        self,
        x: Tensor,
        *,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        return_extra_tokens: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of the last ``n`` blocks (int) or of the 0-based blocks in ``n`` (in block order).

        Per layer: patches ``[B, P, D]`` (``[B, D, H/16, W/16]`` with ``reshape``), optionally CLS ``[B, D]`` and
        storage tokens ``[B, R, D]``; ``norm`` applies the final norm (official semantics)."""
        outputs = self._intermediate(x, n)
        R = self.n_storage_tokens
        if norm:
            normed = []
            for out in outputs:
                if self.untie_cls_and_patch_norms:
                    out = torch.cat((self.cls_norm(out[:, : R + 1]), self.norm(out[:, R + 1 :])), dim=1)
                else:
                    out = self.norm(out)
                normed.append(out)
            outputs = normed
        class_tokens = [o[:, 0] for o in outputs]
        extra_tokens = [o[:, 1 : R + 1] for o in outputs]
        patches = [o[:, R + 1 :] for o in outputs]
        if reshape:
            B, _, h, w = x.shape
            p = self.patch_size
            patches = [o.reshape(B, h // p, w // p, -1).permute(0, 3, 1, 2).contiguous() for o in patches]
        if return_class_token and return_extra_tokens:
            return tuple(zip(patches, class_tokens, extra_tokens))
        if return_class_token:
            return tuple(zip(patches, class_tokens))
        if return_extra_tokens:
            return tuple(zip(patches, extra_tokens))
        return tuple(patches)


def _init_module(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, LinearKMaskedBias):
            m.reset_bias_mask()
    elif isinstance(m, (nn.LayerNorm, LayerScale, PatchEmbed, RMSNorm)):
        m.reset_parameters()
