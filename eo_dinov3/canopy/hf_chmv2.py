"""Convert CHMv2 weights between the official layout and Hugging Face ``CHMv2ForDepthEstimation``.

* Official (``facebookresearch/dinov3``): a backbone state dict (``dinov3_vitl16``: ``cls_token``, ``storage_tokens``,
  ``blocks.{i}.attn.qkv`` with a k-bias mask, ``rope_embed.periods``, ``local_cls_norm`` for SAT-493M …) and a
  separate DPT decoder file (``reassemble_blocks.*``, ``convs.*``, ``fusion_blocks.*``, ``conv_depth.*``).
* Hugging Face (``facebook/dinov3-vitl16-chmv2-dpt-head``, safetensors + ``config.json``): one state dict with
  ``backbone.*`` (``DINOv3ViTBackbone``: ``embeddings.*``, ``model.layer.{i}.attention.{q,k,v,o}_proj``, ``norm``)
  and ``head.*`` (``reassemble_stage.*``, ``convs.*``, ``fusion_layers.*``, ``conv_depth.*``).

Backbone keys are renamed by :func:`eo_dinov3.checkpoints.convert_state_dict` (the project's DINOv3ViTModel ↔
official mapping); this module adds the CHMv2 specifics: the ``backbone.``/``head.`` prefixes, the head renames,
and the tensors the HF layout does not hold:

* HF's CHMv2 config has ``key_bias=True``: official → HF writes the *effective* key bias ``bias · bias_mask``
  (zero for DINOv3 weights). HF → official keeps HF's key bias in ``qkv.bias`` under the official (1, 0, 1) mask.
  A bias added to every key shifts all attention logits of a query equally, so it never changes the output.
* ``rope_embed.periods`` (persistent officially, recomputed by HF) is rebuilt from ``rope_theta`` and the head dim.
* ``local_cls_norm`` (SAT-493M, training-only: never used at inference) has no HF counterpart; HF → official fills it
  with a copy of ``norm``.
* HF's default CHMv2 backbone config says ``layer_norm_eps=1e-6``; the official ViT-L uses 1e-5.
  :func:`hf_config_dict` writes 1e-5, :func:`check_hf_config` reports a mismatch.

Only the official CHMv2 head flavour exists in HF (RCU convs with bias, no post-fusion projection, no BatchNorm);
other DPT settings raise :class:`~eo_dinov3.errors.CheckpointError`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from eo_dinov3.checkpoints import convert_state_dict
from eo_dinov3.errors import CheckpointError
from eo_dinov3.models.dpt import DPTConfig
from eo_dinov3.models.rope import rope_periods

# (official, HF) head-name templates; {i}, {u}, {c} are integers, {p} is weight|bias. HF names carry "head.".
_HEAD_RULES: list[tuple[str, str]] = [
    ("reassemble_blocks.projects.{i}.conv.{p}", "reassemble_stage.layers.{i}.projection.{p}"),
    ("reassemble_blocks.resize_layers.{i}.{p}", "reassemble_stage.layers.{i}.resize.{p}"),
    ("reassemble_blocks.readout_projects.{i}.0.{p}", "reassemble_stage.readout_projects.{i}.0.{p}"),
    ("convs.{i}.conv.weight", "convs.{i}.weight"),
    ("fusion_blocks.{i}.project.conv.{p}", "fusion_layers.{i}.projection.{p}"),
    ("fusion_blocks.{i}.res_conv_unit{u}.conv{c}.conv.{p}", "fusion_layers.{i}.residual_layer{u}.convolution{c}.{p}"),
    ("conv_depth.head.{i}.{p}", "conv_depth.head.{i}.{p}"),
]


def _regex(template: str) -> re.Pattern:
    pat = re.escape(template)
    for name in "iuc":
        pat = pat.replace(re.escape("{" + name + "}"), f"(?P<{name}>\\d+)")
    pat = pat.replace(re.escape("{p}"), "(?P<p>weight|bias)")
    return re.compile(pat + "$")


def _rename(key: str, rules: list[tuple[str, str]], to_hf: bool) -> str | None:
    for off, hf in rules:
        src, dst = (off, hf) if to_hf else (hf, off)
        m = _regex(src).match(key)
        if m:
            return dst.format(**m.groupdict())
    return None


def is_hf_chmv2_state_dict(sd: dict[str, Any]) -> bool:
    """True for a Hugging Face ``CHMv2ForDepthEstimation`` state dict (``head.reassemble_stage.*`` keys)."""
    return any(k.startswith("head.reassemble_stage.") for k in sd)


# --------------------------------------------------------------------------------------------- official -> HF
def official_to_hf_state_dict(backbone_sd: dict[str, Tensor], head_sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official backbone + decoder state dicts → one HF ``CHMv2ForDepthEstimation`` state dict."""
    out = {"backbone." + k: v for k, v in convert_state_dict(backbone_sd, "official", "hf").items()}
    for k, bias in backbone_sd.items():  # HF CHMv2 has key_bias=True: add the effective (masked) key bias
        m = re.match(r"blocks\.(\d+)\.attn\.qkv\.bias$", k)
        if m:
            mask = backbone_sd.get(k + "_mask", torch.ones_like(bias)).to(bias.dtype)
            out[f"backbone.model.layer.{m.group(1)}.attention.k_proj.bias"] = (bias * mask).chunk(3)[1].clone()
    for k, v in head_sd.items():
        if k.startswith("reassemble_blocks.batchnorm_layers.") or k.startswith("project."):
            raise CheckpointError(
                f"decoder key {k!r}: Hugging Face CHMv2 has no BatchNorm / post-fusion projection; "
                "only the official CHMv2 head layout converts"
            )
        new = _rename(k, _HEAD_RULES, to_hf=True)
        if new is None:
            raise CheckpointError(f"decoder key {k!r} has no Hugging Face CHMv2 counterpart")
        out["head." + new] = v
    return out


# --------------------------------------------------------------------------------------------- HF -> official
def hf_to_official_state_dicts(
    hf_sd: dict[str, Tensor],
    *,
    num_heads: int | None = None,
    rope_base: float = 100.0,
    with_local_cls_norm: bool = True,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """HF ``CHMv2ForDepthEstimation`` state dict → (official backbone state dict, official decoder state dict).

    ``num_heads`` (HF ``num_attention_heads``; default: 64-dim heads) and ``rope_base`` (HF ``rope_theta``)
    regenerate ``rope_embed.periods``; ``with_local_cls_norm`` adds the SAT-493M
    ``local_cls_norm`` (copy of ``norm``; unused at inference) so the result loads strictly into
    ``dinov3_vitl16(untie_global_and_local_cls_norm=True)``."""
    hf_backbone: dict[str, Tensor] = {}
    head: dict[str, Tensor] = {}
    for k, v in hf_sd.items():
        if k.startswith("backbone."):
            hf_backbone[k[len("backbone.") :]] = v
        elif k.startswith("head."):
            new = _rename(k[len("head.") :], _HEAD_RULES, to_hf=False)
            if new is None:
                raise CheckpointError(f"Hugging Face head key {k!r} is not a CHMv2 head parameter")
            head[new] = v
        else:
            raise CheckpointError(f"key {k!r} is neither backbone.* nor head.*: not a CHMv2ForDepthEstimation file")
    if not any(k.endswith("attention.q_proj.weight") for k in hf_backbone):
        raise CheckpointError("no backbone attention weights found: not a full CHMv2ForDepthEstimation file")
    backbone = convert_state_dict(hf_backbone, "hf", "official")
    for k, bias in list(backbone.items()):
        if k.endswith("attn.qkv.bias"):
            mask = torch.ones_like(bias)
            mask[bias.numel() // 3 : 2 * bias.numel() // 3] = 0.0
            backbone[k + "_mask"] = mask
    dim = backbone["blocks.0.attn.qkv.weight"].shape[1]
    n_heads = num_heads or _infer_num_heads(dim)
    backbone["rope_embed.periods"] = rope_periods(dim // n_heads, base=rope_base)
    if with_local_cls_norm and "norm.weight" in backbone:
        backbone["local_cls_norm.weight"] = backbone["norm.weight"].clone()
        backbone["local_cls_norm.bias"] = backbone["norm.bias"].clone()
    return backbone, head


def _infer_num_heads(dim: int) -> int:
    """DINOv3 ViTs use 64-dim heads (ViT-S/B/L/H+); the 7B uses 128."""
    return dim // 128 if dim >= 4096 else max(dim // 64, 1)


# --------------------------------------------------------------------------------------------- configs and files
def hf_config_dict(backbone: torch.nn.Module, head_config: DPTConfig, *, image_size: int = 416) -> dict[str, Any]:
    """A ``config.json`` for ``CHMv2Config`` (with a ``dinov3_vit`` backbone config) matching our model.

    ``backbone``: a :class:`~eo_dinov3.models.vision_transformer.DinoVisionTransformer`; HF ``out_indices`` are our
    0-based taps + 1 (HF counts the embedding output as stage 0)."""
    c = backbone.config
    h = head_config
    if c.ffn_layer != "mlp":
        raise CheckpointError(f"Hugging Face CHMv2 conversion supports MLP backbones only (got {c.ffn_layer!r})")
    if h.use_batchnorm or h.projection_after_fusion or not h.use_bias:
        raise CheckpointError(
            "Hugging Face CHMv2 implements only the official CHMv2 head "
            "(use_batchnorm=False, projection_after_fusion=False, use_bias=True)"
        )
    if not h.use_backbone_norm:
        raise CheckpointError("Hugging Face CHMv2 always applies the backbone norm to the taps (use_backbone_norm)")
    eps = 1e-5 if c.norm_layer == "layernormbf16" else 1e-6
    backbone_cfg = dict(
        model_type="dinov3_vit",
        image_size=image_size,
        patch_size=c.patch_size,
        num_channels=c.in_chans,
        hidden_size=c.embed_dim,
        intermediate_size=int(c.embed_dim * c.ffn_ratio),
        num_attention_heads=c.num_heads,
        num_hidden_layers=c.depth,
        num_register_tokens=c.n_storage_tokens,
        hidden_act="gelu",
        layer_norm_eps=eps,
        rope_theta=c.pos_embed_rope_base,
        query_bias=c.qkv_bias,
        key_bias=c.qkv_bias,
        value_bias=c.qkv_bias,
        proj_bias=c.proj_bias,
        mlp_bias=c.ffn_bias,
        layerscale_value=c.layerscale_init or 1.0,
        use_gated_mlp=False,
        pos_embed_rescale=c.pos_embed_rope_rescale_coords,
        out_indices=[i + 1 for i in h.backbone_out_layers],
        apply_layernorm=True,
        reshape_hidden_states=True,
        return_class_token=True,
    )
    return dict(
        model_type="chmv2",
        architectures=["CHMv2ForDepthEstimation"],
        backbone_config=backbone_cfg,
        patch_size=c.patch_size,
        reassemble_factors=[4, 2, 1, 0.5],
        post_process_channels=list(h.post_process_channels),
        fusion_hidden_size=h.channels,
        head_hidden_size=h.n_hidden_channels,
        number_output_channels=h.n_output_channels,
        readout_type=h.readout_type,
        min_depth=h.min_depth,
        max_depth=h.max_depth,
        bins_strategy=h.bins_strategy,
        norm_strategy=h.norm_strategy,
    )


def dpt_config_from_hf(config: dict[str, Any]) -> DPTConfig:
    """Our :class:`DPTConfig` from an HF CHMv2 ``config.json`` dict (missing fields take CHMv2Config defaults)."""
    bb = config.get("backbone_config") or {}
    dim = int(bb.get("hidden_size", 1024))
    factors = [float(f) for f in config.get("reassemble_factors", [4, 2, 1, 0.5])]
    if factors != [4.0, 2.0, 1.0, 0.5]:
        raise CheckpointError(f"reassemble_factors {factors} are not DPT's [4, 2, 1, 0.5]")
    return DPTConfig.chmv2(
        embed_dim=dim,
        channels=config.get("fusion_hidden_size", 256),
        post_process_channels=tuple(config.get("post_process_channels", (128, 256, 512, 1024))),
        n_hidden_channels=config.get("head_hidden_size", 128),
        n_output_channels=config.get("number_output_channels", 256),
        readout_type=config.get("readout_type", "project"),
        min_depth=config.get("min_depth", 0.001),
        max_depth=config.get("max_depth", 96.0),
        bins_strategy=config.get("bins_strategy", "chmv2_mixlog"),
        norm_strategy=config.get("norm_strategy", "chmv2_mixlog"),
        backbone_out_layers=tuple(i - 1 for i in bb.get("out_indices", [6, 12, 18, 24])),
    )


def check_hf_config(config: dict[str, Any]) -> list[str]:
    """Differences between an HF CHMv2 ``config.json`` and what the official model computes (one line each)."""
    bb = config.get("backbone_config") or {}
    notes = []
    eps = bb.get("layer_norm_eps", 1e-6)
    if eps != 1e-5:
        notes.append(f"backbone layer_norm_eps={eps:g} (official DINOv3 ViT uses 1e-5; eo_dinov3 uses 1e-5)")
    if bb.get("use_gated_mlp", False):
        notes.append("backbone uses a gated MLP: not the CHMv2 ViT-L")
    if not bb.get("apply_layernorm", True):
        notes.append("apply_layernorm=False: taps without the final norm (CHMv2 uses the norm)")
    return notes


def read_hf_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """(state dict, config dict or None) from an HF model folder (``model.safetensors`` or sharded
    ``model.safetensors.index.json`` + ``config.json``) or a single ``.safetensors`` file."""
    from safetensors.torch import load_file

    p = Path(path)
    config = None
    if p.is_dir():
        if (p / "config.json").is_file():
            config = json.loads((p / "config.json").read_text())
        index = p / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            sd: dict[str, Tensor] = {}
            for f in files:
                sd.update(load_file(str(p / f)))
            return sd, config
        if not (p / "model.safetensors").is_file():
            raise CheckpointError(f"{p}: no model.safetensors in this folder (expected a Hugging Face CHMv2 model)")
        p = p / "model.safetensors"
    elif (p.parent / "config.json").is_file():
        config = json.loads((p.parent / "config.json").read_text())
    try:
        return load_file(str(p)), config
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{p}: cannot read as safetensors ({e}); give the HF model folder or file") from None


def save_hf_checkpoint(model: torch.nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model`` (a :class:`~eo_dinov3.canopy.model.CanopyHeightModel`) as an HF CHMv2 folder
    (``config.json`` + ``model.safetensors``) loadable with ``CHMv2ForDepthEstimation.from_pretrained``."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    sd = official_to_hf_state_dict(model.backbone.state_dict(), model.head.state_dict())
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(d / "model.safetensors"))
    cfg = hf_config_dict(model.backbone, model.head.config)
    cfg["backbone_config"]["out_indices"] = [i + 1 for i in model.taps]
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return d


__all__ = [
    "official_to_hf_state_dict",
    "hf_to_official_state_dicts",
    "hf_config_dict",
    "dpt_config_from_hf",
    "check_hf_config",
    "is_hf_chmv2_state_dict",
    "read_hf_checkpoint",
    "save_hf_checkpoint",
]
