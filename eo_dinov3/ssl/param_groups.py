"""Optimiser parameter groups with layer-wise lr decay (official ``dinov3/train/param_groups.py`` rules).

Groups are built **per student sub-module** (backbone, DINO head, iBOT head) with parameter names relative to that
sub-module. For a backbone with ``L`` blocks:

* ``layer_id = 0`` for ``patch_embed*``, ``cls_token``, ``storage_tokens``, ``mask_token`` (and ``pos_embed``);
  ``i + 1`` for ``blocks.i.*``; ``L + 1`` for everything else (``norm``, ``local_cls_norm`` …);
* ``lr_multiplier = decay^(L + 1 − layer_id)``, times ``patch_embed_lr_mult`` (0.2) for ``patch_embed*``;
* heads (no ``blocks``): ``L = 0`` → multiplier 1;
* ``wd_multiplier = 0`` iff the name ends with ``bias`` or contains ``norm``, ``gamma`` (LayerScale) or
  ``fourier_w``; tokens and the patch-embed weight *are* weight-decayed. ``dino_head_wd_multiplier`` applies to
  names containing ``dino_head``, which never happens with relative names (dead option, kept for parity);
* ``is_last_layer`` iff the name contains ``last_layer`` (its lr follows the last-layer schedule, 0 while frozen).

Every iteration :func:`apply_optim_scheduler` sets ``lr = (last_layer_lr if is_last_layer else lr) ×
lr_multiplier`` and ``weight_decay = wd × wd_multiplier`` per group.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

import torch
from torch import nn

_LAYER0 = ("pos_embed", "patch_embed", "mask_token", "cls_token", "storage_tokens")
_WRAPPER_FRAGMENTS = (
    "_fsdp_wrapped_module.",
    "_checkpoint_wrapped_module.",
    "parametrizations.",
    "module.",
    "_orig_mod.",
)


def clean_param_name(name: str) -> str:
    """Strip FSDP / activation-checkpointing / ``torch.compile`` wrapper fragments from a parameter name."""
    for frag in _WRAPPER_FRAGMENTS[:3]:
        name = name.replace(frag, "")
    name = name.removesuffix(".original")
    for frag in _WRAPPER_FRAGMENTS[3:]:
        name = name.replace(frag, "")
    return name


def layer_id_of(name: str, num_layers: int) -> int:
    """Layer index of a (sub-module-relative) parameter name: 0 for tokens / patch embedding, ``i+1`` for
    ``blocks.i.*``, ``num_layers + 1`` otherwise; always ``num_layers + 1`` when ``num_layers == 0`` (heads).

    Names prefixed with ``backbone.`` (a whole meta-architecture) are handled too."""
    is_backbone = num_layers > 0
    if not (is_backbone or name.startswith("backbone")):
        return num_layers + 1
    if any(f".{k}" in name for k in _LAYER0) or (is_backbone and any(k in name for k in _LAYER0)):
        return 0
    if ".blocks." in name and ".residual." not in name:
        return int(name[name.find(".blocks.") :].split(".")[2]) + 1
    if "blocks." in name and "residual." not in name:
        return int(name[name.find("blocks.") :].split(".")[1]) + 1
    return num_layers + 1


def lr_decay_multiplier(name: str, lr_decay_rate: float, num_layers: int) -> float:
    """``lr_decay_rate ** (num_layers + 1 − layer_id)``."""
    return lr_decay_rate ** (num_layers + 1 - layer_id_of(name, num_layers))


def _num_blocks(model: nn.Module) -> int:
    if hasattr(model, "n_blocks"):
        return int(model.n_blocks)
    if hasattr(model, "blocks"):
        return len(model.blocks)
    if hasattr(model, "backbone"):
        return len(model.backbone.blocks)
    return 0


def get_params_groups_with_decay(
    model: nn.Module,
    lr_decay_rate: float = 1.0,
    patch_embed_lr_mult: float = 1.0,
    dino_head_wd_multiplier: float = 1.0,
) -> list[dict[str, Any]]:
    """One dict per trainable parameter of ``model`` (a backbone or a head): ``name``, ``params``,
    ``lr_multiplier``, ``wd_multiplier``, ``is_last_layer`` (in ``named_parameters`` order)."""
    n_blocks = _num_blocks(model)
    groups = []
    for raw_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = clean_param_name(raw_name)
        d: dict[str, Any] = {
            "name": name,
            "params": param,
            "is_last_layer": "last_layer" in name,
            "lr_multiplier": lr_decay_multiplier(name, lr_decay_rate, n_blocks),
            "wd_multiplier": dino_head_wd_multiplier if "dino_head" in name else 1.0,
        }
        if name.endswith("bias") or "norm" in name or "gamma" in name or "fourier_w" in name:
            d["wd_multiplier"] = 0.0
        if "patch_embed" in name:
            d["lr_multiplier"] *= patch_embed_lr_mult
        groups.append(d)
    return groups


def fuse_params_groups(
    all_params_groups: Iterable[dict[str, Any]],
    keys: tuple[str, ...] = ("lr_multiplier", "wd_multiplier", "is_last_layer"),
) -> list[dict[str, Any]]:
    """Merge per-parameter groups with identical ``keys`` values (first-seen order) into optimizer groups
    ``{"params": [...], "names": [...], *keys}``."""
    fused: dict[tuple, dict[str, Any]] = defaultdict(lambda: {"params": [], "names": []})
    for d in all_params_groups:
        ident = tuple(d[k] for k in keys)
        for k in keys:
            fused[ident][k] = d[k]
        fused[ident]["params"].append(d["params"])
        fused[ident]["names"].append(d.get("name"))
    return list(fused.values())


def apply_optim_scheduler(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    """Set every group's ``lr`` (``last_layer_lr`` for last-layer groups) × ``lr_multiplier`` and
    ``weight_decay = wd × wd_multiplier``."""
    for group in optimizer.param_groups:
        group["weight_decay"] = wd * group["wd_multiplier"]
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]
