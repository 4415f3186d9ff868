"""Checkpoint I/O for DINOv3 backbones: read any common layout safely, load strictly, report coverage, convert.

Layouts that :func:`load_backbone` recognises (from the keys, never from the file name):

* ``official`` -- Meta's hub ``.pth`` (plain backbone state dict: ``cls_token``, ``storage_tokens``,
  ``blocks.{i}.attn.qkv.weight`` …), also inside a training export ``{"teacher": {"backbone.*", "dino_head.*",
  "ibot_head.*"}}`` (prefixes ``module.``/``backbone.``/``teacher.``/``model_ema.``/``student.`` are stripped, heads
  are ignored and reported);
* ``timm`` -- timm's Eva port (``reg_token``, ``gamma_1``, ``attn.q_bias``/``v_bias``, ``mlp.fc1_g``/``fc1_x``);
* ``hf`` -- transformers ``DINOv3ViTModel`` (``embeddings.*``, ``[model.]layer.{i}.attention.q_proj`` …),
  ``.safetensors``/``.bin`` files or a ``save_pretrained`` folder;
* ``eo`` -- our own files written by :func:`save_backbone` (``{"format": "eo_dinov3", "version": 1, "config",
  "state_dict"}`` or a safetensors file with the config in its metadata) that also record the input bands,
  normalisation preset and GSD.

Everything is read with ``torch.load(weights_only=True, map_location="cpu")`` (memory-mapped when the file is a
zip checkpoint) or ``safetensors``: a pickle that would construct arbitrary objects or run code is refused.
Unreadable input raises a one-line :class:`~eo_dinov3.errors.CheckpointError`.

Tensors that a layout cannot hold are rebuilt from the architecture and listed in the :class:`LoadReport` as
"synthesized": the RoPE ``periods`` and ``qkv.bias_mask`` buffers (deterministic), the key third of ``qkv.bias``
(zero; a bias added to every key shifts all attention logits of a query equally, so it never changes the output),
``mask_token`` (zero; only used for iBOT masking in training, absent from timm) and ``local_cls_norm`` (only used
for local crops in training). Everything else must be in the file: loading is strict.

Conversions are exact: every tensor a target layout carries is bit-identical (``torch.equal``) after
official -> timm/hf -> official.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import re
import struct
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor

from eo_dinov3.errors import CheckpointError
from eo_dinov3.hub import ARCHS, WEIGHTS_NORMALIZATION, arch_config, official_weight_filename
from eo_dinov3.models.layers import FFN_ALIGN, swiglu_hidden_dim
from eo_dinov3.models.rope import rope_dtype, rope_periods
from eo_dinov3.models.vision_transformer import DinoVisionTransformer, ViTConfig

log = logging.getLogger(__name__)

LAYOUTS = ("official", "timm", "hf")
SAVE_FORMATS = ("official", "safetensors", "eo")
EO_FORMAT = "eo_dinov3"
EO_VERSION = 1
SAT_LABEL = "dinov3_vitl16 (SAT-493M)"
ZERO_FILLED = "\0zero-filled:"  # marker in conversion side lists: key third of this qkv.bias was set to 0
WEIGHT_SETS = ("lvd1689m", "sat493m")

# ----------------------------------------------------------------------------------------------------------------
# reading files
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RawCheckpoint:
    """What a file holds before any architecture is chosen.

    ``state_dict`` is in the official key layout (converted from ``layout``); tensors the layout cannot carry are
    missing. ``ignored`` lists keys outside the backbone (heads, optimizer …) as ``"<group> (<n> tensors)"``."""

    path: Path
    container: str
    layout: str
    prefix: str
    state_dict: dict[str, Tensor]
    ignored: list[str] = field(default_factory=list)
    config: dict[str, Any] | None = None
    hints: dict[str, Any] = field(default_factory=dict)
    dtypes: dict[str, int] = field(default_factory=dict)
    zero_filled: list[str] = field(default_factory=list)


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _sniff(path: Path) -> str:
    """``zip`` (torch.save), ``pickle`` (legacy torch.save), ``safetensors``, ``json``, ``text`` or ``binary``."""
    with open(path, "rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 9:  # before the pickle test: the header length may start with byte 0x80
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < n <= size - 8:
            return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    stripped = head.lstrip()
    if stripped[:1] in (b"{", b"["):
        return "json"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.reason != "unexpected end of data":  # a multi-byte character cut by the 16-byte window is still text
            return "binary"
    return "text" if not any(b < 9 or 13 < b < 32 for b in head) else "binary"


def _torch_load_raw(path: Path, kind: str) -> Any:
    if kind == "zip":
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # e.g. a zip written by another tool: retry without mmap
            if "mmap" not in str(e):
                raise
    return torch.load(path, map_location="cpu", weights_only=True)


def _torch_load(path: Path, kind: str) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error below says it all
            return _torch_load_raw(path, kind)
    except Exception as e:  # noqa: BLE001 - every failure becomes one readable line
        msg = str(e)
        if "Weights only load failed" in msg or "WeightsUnpickler" in msg:
            m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
            if m:
                raise CheckpointError(
                    f"{path}: refused as unsafe: its pickle would construct or call {m.group(1)} (only tensors and "
                    "plain containers are accepted, torch.load(weights_only=True)); if you trust the file, re-save "
                    "just its state dict or convert it to safetensors"
                ) from None
            m = re.search(r"WeightsUnpickler error:\s*([^\n]+)", msg)
            raise CheckpointError(
                f"{path}: not a torch.save checkpoint the safe loader can read ({m.group(1) if m else 'unknown'}; "
                "a plain pickle?); re-save the tensors with torch.save(state_dict, path)"
            ) from None
        if kind == "zip":
            raise CheckpointError(
                f"{path}: corrupt or truncated PyTorch checkpoint ({_one_line(msg, 120)}); download or copy it again"
            ) from None
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {_one_line(msg, 120)})"
        ) from None


def _safetensors_load(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        from safetensors import safe_open

        tensors: dict[str, Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
        return tensors, meta
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"{path}: corrupt or truncated safetensors file ({_one_line(str(e), 120)}); download or copy it again"
        ) from None


def _read_object(path: Path) -> tuple[Any, dict[str, str] | None, str]:
    """Load the file's top-level object: ``(object, safetensors metadata or None, description)``."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        if (path / ".metadata").is_file():
            raise CheckpointError(
                f"{path}: a PyTorch Distributed Checkpoint folder (training resume state); load its teacher "
                "export (eval/training_<it>/teacher_checkpoint.pth) instead"
            )
        raise CheckpointError(
            f"{path}: is a directory without model.safetensors, pytorch_model.bin or teacher_checkpoint.pth; "
            "pass the weights file itself"
        )
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: is empty (0 bytes); the download or copy did not finish")
    kind = _sniff(path)
    if kind == "safetensors":
        tensors, meta = _safetensors_load(path)
        return tensors, meta, "safetensors file"
    if kind in ("zip", "pickle"):
        return _torch_load(path, kind), None, "torch.save file"
    if kind == "json":
        raise CheckpointError(
            f"{path}: is a JSON file, not weights (a config.json? pass the .pth/.safetensors file next to it)"
        )
    if kind == "text":
        raise CheckpointError(f"{path}: is a text file, not a checkpoint (an HTML error page or a Git LFS pointer?)")
    raise CheckpointError(f"{path}: not a checkpoint (neither a torch.save zip/pickle nor a safetensors file)")


_FOLDER_FILES = ("model.safetensors", "pytorch_model.bin", "teacher_checkpoint.pth")
_CONTAINER_KEYS = ("teacher", "model_ema", "model", "state_dict", "module", "student", "backbone")


def _flatten(obj: Any, path: Path) -> tuple[dict[str, Tensor], str, list[str], dict[str, Any] | None]:
    """Unwrap containers to one flat ``{key: tensor}``: returns it, a description, ignored top-level entries and the
    recorded eo config (if any)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    ignored: list[str] = []
    if obj.get("format") == EO_FORMAT:
        version = obj.get("version")
        if not isinstance(version, int) or version > EO_VERSION:
            raise CheckpointError(
                f"{path}: eo_dinov3 checkpoint version {version!r} is not one this eo_dinov3 reads "
                f"(1…{EO_VERSION}); upgrade eo_dinov3"
            )
        sd = obj.get("state_dict")
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path}: eo_dinov3 checkpoint without a state_dict entry")
        return _tensors_only(sd, ignored), f"eo_dinov3 checkpoint v{version}", ignored, obj.get("config")
    desc = "plain state dict"
    chain = []
    while not any(isinstance(v, Tensor) for v in obj.values()):
        key = next((k for k in _CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            nested = [k for k, v in obj.items() if isinstance(v, dict)]
            if len(nested) == 1:
                key = nested[0]
            else:
                shown = ", ".join(repr(k) for k in list(obj)[:6]) or "none"
                where = f"under {'.'.join(chain)!r} " if chain else ""
                raise CheckpointError(f"{path}: holds no tensors ({where}keys: {shown})")
        ignored += [f"{'.'.join(chain + [str(k)])} (not used)" for k in obj if k != key]
        chain.append(str(key))
        obj = obj[key]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: entry {'.'.join(chain)!r} is not a state dict")
    if chain:
        desc = "{" + "".join(f'"{c}": ' for c in chain) + "…}" + (" training export" if chain[0] == "teacher" else "")
    return _tensors_only(obj, ignored), desc, ignored, None


def _tensors_only(sd: dict, ignored: list[str]) -> dict[str, Tensor]:
    out = {}
    for k, v in sd.items():
        if isinstance(v, Tensor):
            out[str(k)] = v
        else:
            ignored.append(f"{k} (not a tensor)")
    return out


def _detect_layout(sd: dict[str, Tensor], path: Path) -> tuple[str, str]:
    """``(layout, prefix)`` of the backbone inside ``sd``; training prefixes are ranked teacher > EMA > other >
    student > Gram teacher."""
    candidates = []
    for k in sd:
        if k.endswith("embeddings.cls_token"):
            candidates.append(("hf", k[: -len("embeddings.cls_token")]))
        elif k.endswith("cls_token"):
            p = k[: -len("cls_token")]
            timm = any(p + s in sd for s in ("reg_token", "blocks.0.gamma_1", "blocks.0.attn.q_bias"))
            timm = timm or any(k2.startswith(p + "blocks.0.mlp.fc1_g") for k2 in sd)
            candidates.append(("timm" if timm else "official", p))
    if not candidates:
        shown = ", ".join(list(sd)[:3])
        raise CheckpointError(
            f"{path}: no DINOv3 backbone found (no '*cls_token' among {len(sd)} tensors, e.g. {shown})"
        )

    def rank(c: tuple[str, str]) -> tuple[int, int]:
        p = c[1]
        order = 4 if "gram" in p else 0 if "teacher" in p else 1 if "model_ema" in p else 3 if "student" in p else 2
        return order, len(p)

    return sorted(candidates, key=rank)[0]


def _group_name(key: str) -> str:
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part.endswith("head") or part in ("head", "fc_norm", "projectors"):
            return ".".join(parts[: i + 1])
    return parts[0] if len(parts) > 1 else key


def _group(keys: Iterable[str]) -> list[str]:
    """Summarise keys as ``"dino_head.* (7 tensors)"`` / ``"dino_loss.center"`` groups, in first-seen order."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(_group_name(k), []).append(k)
    return [f"{g}.* ({len(ks)} tensors)" if len(ks) > 1 else ks[0] for g, ks in groups.items()]


def _patterns(keys: Iterable[str]) -> list[str]:
    """Summarise per-block keys as ``"blocks.{i}.attn.qkv.bias_mask (12)"``."""
    counts: dict[str, int] = {}
    for k in keys:
        pat = re.sub(r"^blocks\.\d+\.", "blocks.{i}.", k)
        counts[pat] = counts.get(pat, 0) + 1
    return [f"{p} ({n})" if n > 1 else p for p, n in counts.items()]


def read_checkpoint(path: str | os.PathLike) -> RawCheckpoint:
    """Read ``path`` safely and convert its backbone tensors to the official key layout (no model is built)."""
    path = Path(path).expanduser()
    if path.is_dir():  # a save_pretrained folder or an eval/training_<it>/ folder
        path = next((path / n for n in _FOLDER_FILES if (path / n).is_file()), path)
    obj, meta, desc = _read_object(path)
    recorded = None
    hints: dict[str, Any] = {}
    kept: dict[str, Tensor] = {}
    if meta is not None:  # safetensors
        sd, container, ignored = obj, desc, []
        try:
            if meta.get("format") == EO_FORMAT and "config" in meta:
                recorded = json.loads(meta["config"])
                container = f"eo_dinov3 safetensors v{meta.get('version', '?')}"
            if "hf_config" in meta:
                hints.update(_hf_hints(json.loads(meta["hf_config"])))
            if "num_heads" in meta:
                hints["num_heads"] = int(meta["num_heads"])
            kept = _decode_tensors(meta[KEPT_KEY]) if KEPT_KEY in meta else {}
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: unreadable metadata in the safetensors header ({e})") from None
        if recorded is not None and not isinstance(recorded, dict):
            raise CheckpointError(f"{path}: the recorded config is not a JSON object")
    else:
        sd, container, ignored, recorded = _flatten(obj, path)
    cfg_json = path.parent / "config.json"
    if cfg_json.is_file() and path.suffix in (".safetensors", ".bin"):
        try:
            hints.update(_hf_hints(json.loads(cfg_json.read_text())))
        except (ValueError, OSError):
            pass
    layout, prefix = _detect_layout(sd, path)
    inside = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    ignored += _group(k for k in sd if not k.startswith(prefix))
    dtypes: dict[str, int] = {}
    for v in inside.values():
        name = str(v.dtype).replace("torch.", "")
        dtypes[name] = dtypes.get(name, 0) + 1
    if layout == "timm":
        official, extra = _timm_to_official(inside)
    elif layout == "hf":
        official, extra = _hf_to_official(inside)
    else:
        official, extra = inside, []
    if kept and layout in ("timm", "hf"):  # exact tensors saved by save_layout beside the foreign keys
        official = {**official, **kept}
        extra = [k for k in extra if not (k.startswith(ZERO_FILLED) and k[len(ZERO_FILLED):] in kept)]
    zero_filled = [k[len(ZERO_FILLED) :] + "[key third]" for k in extra if k.startswith(ZERO_FILLED)]
    ignored += _group(k for k in extra if not k.startswith(ZERO_FILLED))
    if recorded is not None and layout == "official":
        layout_name = "eo"
    else:
        layout_name = layout
    return RawCheckpoint(
        path=path,
        container=container,
        layout=layout_name,
        prefix=prefix,
        state_dict=official,
        ignored=ignored,
        config=recorded,
        hints=hints,
        dtypes=dtypes,
        zero_filled=zero_filled,
    )


def _hf_hints(c: dict[str, Any]) -> dict[str, Any]:
    hints = {}
    if "num_attention_heads" in c:
        hints["num_heads"] = int(c["num_attention_heads"])
    if "layer_norm_eps" in c:
        hints["norm_layer"] = "layernorm" if abs(float(c["layer_norm_eps"]) - 1e-6) < 1e-9 else "layernormbf16"
    if "rope_theta" in c:
        hints["pos_embed_rope_base"] = float(c["rope_theta"])
    if "layerscale_value" in c:
        hints["layerscale_init"] = float(c["layerscale_value"])
    if "image_size" in c and isinstance(c["image_size"], int):
        hints["img_size"] = int(c["image_size"])
    return hints


# ----------------------------------------------------------------------------------------------------------------
# key-layout conversion (official <-> timm <-> hf)
# ----------------------------------------------------------------------------------------------------------------

_NOT_IN_TIMM = ("mask_token", "rope_embed.periods", ".bias_mask", "local_cls_norm.")
_NOT_IN_HF = ("rope_embed.periods", ".bias_mask", "local_cls_norm.")


def _drop(k: str, patterns: tuple[str, ...]) -> bool:
    return any(k == p or k.startswith(p) or (p.startswith(".") and k.endswith(p)) for p in patterns)


def _official_to_timm(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    out, dropped = {}, []
    for k, v in sd.items():
        if _drop(k, _NOT_IN_TIMM):
            dropped.append(k)
            continue
        if k.startswith("cls_norm."):
            raise CheckpointError("the timm layout has no separate CLS norm (untie_cls_and_patch_norms=True)")
        if k.endswith("attn.qkv.bias"):
            q, _, vb = v.chunk(3)
            out[k[: -len("qkv.bias")] + "q_bias"] = q.clone()
            out[k[: -len("qkv.bias")] + "v_bias"] = vb.clone()
            dropped.append(k + "[key third]")
            continue
        k2 = "reg_token" if k == "storage_tokens" else k
        k2 = k2.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")
        k2 = k2.replace(".mlp.w1.", ".mlp.fc1_g.").replace(".mlp.w2.", ".mlp.fc1_x.").replace(".mlp.w3.", ".mlp.fc2.")
        out[k2] = v
    return out, dropped


def _timm_to_official(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    out, extra = {}, []
    swiglu = any(".mlp.fc1_g." in k for k in sd)
    for k, v in sd.items():
        if k.startswith(("head.", "fc_norm.", "attn_pool.", "norm_pre.", "rope.")):
            extra.append(k)
            continue
        if k.endswith("attn.v_bias"):
            continue
        if k.endswith("attn.q_bias"):
            base = k[: -len("q_bias")]
            vb = sd.get(base + "v_bias")
            if vb is None:
                raise CheckpointError(f"timm checkpoint has {k} but no {base}v_bias")
            out[base + "qkv.bias"] = torch.cat((v, torch.zeros_like(v), vb))
            extra.append(ZERO_FILLED + base + "qkv.bias")
            continue
        k2 = "storage_tokens" if k == "reg_token" else k
        k2 = k2.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")
        if swiglu:
            k2 = k2.replace(".mlp.fc1_g.", ".mlp.w1.").replace(".mlp.fc1_x.", ".mlp.w2.")
            k2 = k2.replace(".mlp.fc2.", ".mlp.w3.")
        out[k2] = v
    return out, extra


_HF_BLOCK = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.o_proj": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
}


def _official_to_hf(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    out, dropped = {}, []
    for k, v in sd.items():
        if _drop(k, _NOT_IN_HF):
            dropped.append(k)
            continue
        if k.startswith("cls_norm."):
            raise CheckpointError("the HF layout has no separate CLS norm (untie_cls_and_patch_norms=True)")
        if k == "cls_token":
            out["embeddings.cls_token"] = v
        elif k == "storage_tokens":
            out["embeddings.register_tokens"] = v
        elif k == "mask_token":
            out["embeddings.mask_token"] = v.reshape(1, 1, -1)
        elif k.startswith("patch_embed.proj."):
            out["embeddings.patch_embeddings." + k.split(".")[-1]] = v
        elif k.startswith("norm."):
            out[k] = v
        elif k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            pre = f"model.layer.{i}."
            if rest.startswith("attn.qkv."):
                kind = rest.split(".")[-1]
                q, kk, vv = v.chunk(3)
                out[pre + f"attention.q_proj.{kind}"] = q.clone()
                if kind == "weight":
                    out[pre + "attention.k_proj.weight"] = kk.clone()
                else:
                    dropped.append(k + "[key third]")
                out[pre + f"attention.v_proj.{kind}"] = vv.clone()
                continue
            mod, _, leaf = rest.rpartition(".")
            if mod.startswith("mlp."):
                name = mod.split(".")[1]
                hf = {"fc1": "up_proj", "fc2": "down_proj", "w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"}
                out[pre + f"mlp.{hf[name]}.{leaf}"] = v
            elif rest in ("ls1.gamma", "ls2.gamma"):
                out[pre + ("layer_scale1.lambda1" if rest == "ls1.gamma" else "layer_scale2.lambda1")] = v
            else:
                inv = {b: a for a, b in _HF_BLOCK.items()}
                if mod not in inv:
                    raise CheckpointError(f"no HF name for official key {k}")
                out[pre + f"{inv[mod]}.{leaf}"] = v
        else:
            raise CheckpointError(f"no HF name for official key {k}")
    if "embeddings.register_tokens" not in out and "embeddings.cls_token" in out:
        c = out["embeddings.cls_token"]
        out["embeddings.register_tokens"] = c.new_zeros(1, 0, c.shape[-1])
    return out, dropped


def _hf_to_official(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    out, extra = {}, []
    gated = any(".mlp.gate_proj." in k for k in sd)
    qkv: dict[str, dict[str, Tensor]] = {}
    block_re = re.compile(r"^(?:model\.)?layer\.(\d+)\.(.+)$")
    for k, v in sd.items():
        if k == "embeddings.cls_token":
            out["cls_token"] = v
        elif k == "embeddings.register_tokens":
            if v.shape[1] > 0:
                out["storage_tokens"] = v
        elif k == "embeddings.mask_token":
            out["mask_token"] = v.reshape(1, -1)
        elif k.startswith("embeddings.patch_embeddings."):
            out["patch_embed.proj." + k.split(".")[-1]] = v
        elif k.startswith("norm."):
            out[k] = v
        elif m := block_re.match(k):
            i, rest = m.groups()
            pre = f"blocks.{i}."
            if rest.startswith("attention.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                qkv.setdefault(pre, {})[rest.split(".", 1)[1]] = v
                continue
            mod, _, leaf = rest.rpartition(".")
            if mod.startswith("mlp."):
                name = mod.split(".")[1]
                ours = (
                    {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"}
                    if gated
                    else {"up_proj": "fc1", "down_proj": "fc2"}
                )
                out[pre + f"mlp.{ours.get(name, name)}.{leaf}"] = v
            elif rest in ("layer_scale1.lambda1", "layer_scale2.lambda1"):
                out[pre + ("ls1.gamma" if rest.startswith("layer_scale1") else "ls2.gamma")] = v
            elif mod in _HF_BLOCK:
                out[pre + f"{_HF_BLOCK[mod]}.{leaf}"] = v
            else:
                out[pre + rest] = v  # left for the strict check to report
        else:
            extra.append(k)
    for pre, parts in qkv.items():
        try:
            out[pre + "attn.qkv.weight"] = torch.cat([parts[f"{n}_proj.weight"] for n in "qkv"])
        except KeyError as e:
            raise CheckpointError(f"HF checkpoint: {pre}: missing attention weight {e.args[0]}") from None
        if "q_proj.bias" in parts or "v_proj.bias" in parts:
            q, vb = parts.get("q_proj.bias"), parts.get("v_proj.bias")
            ref = q if q is not None else vb
            q = torch.zeros_like(ref) if q is None else q
            vb = torch.zeros_like(ref) if vb is None else vb
            kb = parts.get("k_proj.bias")
            if kb is None:
                kb = torch.zeros_like(ref)
                extra.append(ZERO_FILLED + pre + "attn.qkv.bias")
            out[pre + "attn.qkv.bias"] = torch.cat((q, kb, vb))
    return out, extra


def convert_state_dict(sd: dict[str, Tensor], src: str, dst: str) -> dict[str, Tensor]:
    """Convert a backbone state dict between key layouts ``official``/``timm``/``hf`` (``src="auto"`` detects it).

    Tensors are copied bit-for-bit; tensors the target cannot hold (see module doc) are dropped, and converting
    *to* official leaves them out (load with :func:`load_backbone` to have them rebuilt)."""
    if src == "auto":
        src, prefix = _detect_layout(sd, Path("<state dict>"))
        sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    for name in (src, dst):
        if name not in LAYOUTS:
            raise ValueError(f"unknown layout {name!r}; choose from {LAYOUTS}")
    if src == "timm":
        sd = _timm_to_official(sd)[0]
    elif src == "hf":
        sd = _hf_to_official(sd)[0]
    if dst == "timm":
        return _official_to_timm(sd)[0]
    if dst == "hf":
        return _official_to_hf(sd)[0]
    return dict(sd)


def export_state_dict(model: DinoVisionTransformer, layout: str = "official") -> dict[str, Tensor]:
    """``model``'s weights in the ``official``, ``timm`` or ``hf`` key layout (CPU tensors).

    Logs which tensors the layout cannot carry, and warns when the RoPE periods stored in the model differ from
    the fp32 periods timm/transformers recompute (then their features differ slightly from ours)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if layout == "official":
        return sd
    cfg = model.config
    _check_exportable(cfg, layout)
    periods = sd.get("rope_embed.periods")
    if periods is not None:
        ref = _periods_for(cfg)
        if not torch.equal(periods.float(), ref.float()):
            diff = ((periods.float() - ref.float()).abs() / ref.float()).max().item()
            log.warning(
                "the model's RoPE periods differ from the fp32 periods %s recomputes (max rel. diff %.2g): "
                "its features will differ slightly from ours",
                layout,
                diff,
            )
    out, dropped = (_official_to_timm if layout == "timm" else _official_to_hf)(sd)
    if layout == "hf" and cfg.layerscale_init is None:
        for i in range(cfg.depth):
            for j in (1, 2):
                out[f"model.layer.{i}.layer_scale{j}.lambda1"] = torch.ones(cfg.embed_dim)
    log.info("export to %s layout leaves out %d tensors (%s)", layout, len(dropped), ", ".join(_patterns(dropped)))
    return out


def _check_exportable(cfg: ViTConfig, layout: str) -> None:
    problems = []
    if cfg.untie_cls_and_patch_norms:
        problems.append("a separate CLS norm (untie_cls_and_patch_norms)")
    if cfg.pos_embed_rope_base is None:
        problems.append("RoPE min/max periods")
    if cfg.pos_embed_rope_normalize_coords != "separate" and layout == "hf":
        problems.append(f"RoPE coords '{cfg.pos_embed_rope_normalize_coords}'")
    if cfg.norm_layer == "rmsnorm":
        problems.append("RMSNorm")
    if layout == "timm" and cfg.layerscale_init is None:
        problems.append("no LayerScale")
    if problems:
        raise CheckpointError(f"the {layout} layout cannot represent this model: {', '.join(problems)}")


def _periods_for(cfg: ViTConfig) -> Tensor:
    return rope_periods(
        cfg.embed_dim // cfg.num_heads,
        base=cfg.pos_embed_rope_base,
        min_period=cfg.pos_embed_rope_min_period,
        max_period=cfg.pos_embed_rope_max_period,
        dtype=rope_dtype(cfg.pos_embed_rope_dtype),
    )


def ffn_hidden_dim(cfg: ViTConfig) -> int:
    """Hidden width of the FFN of ``cfg`` (``int(D·ratio)`` for mlp, official rounding for SwiGLU)."""
    if cfg.ffn_layer == "mlp":
        return int(cfg.embed_dim * cfg.ffn_ratio)
    return swiglu_hidden_dim(cfg.embed_dim, cfg.ffn_ratio, FFN_ALIGN[cfg.ffn_layer])


def hf_config(cfg: ViTConfig) -> dict[str, Any]:
    """Arguments of ``transformers.DINOv3ViTConfig`` describing the same network as ``cfg``."""
    _check_exportable(cfg, "hf")
    return dict(
        patch_size=cfg.patch_size,
        hidden_size=cfg.embed_dim,
        intermediate_size=ffn_hidden_dim(cfg),
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        hidden_act="gelu" if cfg.ffn_layer == "mlp" else "silu",
        layer_norm_eps=1e-6 if cfg.norm_layer == "layernorm" else 1e-5,
        rope_theta=float(cfg.pos_embed_rope_base),
        image_size=cfg.img_size,
        num_channels=cfg.in_chans,
        query_bias=cfg.qkv_bias,
        key_bias=False,
        value_bias=cfg.qkv_bias,
        proj_bias=cfg.proj_bias,
        mlp_bias=cfg.ffn_bias,
        layerscale_value=float(cfg.layerscale_init) if cfg.layerscale_init else 1.0,
        use_gated_mlp=cfg.ffn_layer != "mlp",
        num_register_tokens=cfg.n_storage_tokens,
        pos_embed_shift=cfg.pos_embed_rope_shift_coords,
        pos_embed_jitter=cfg.pos_embed_rope_jitter_coords,
        pos_embed_rescale=cfg.pos_embed_rope_rescale_coords,
    )


def timm_config(cfg: ViTConfig) -> tuple[str, dict[str, Any]]:
    """``(model_name, kwargs)`` so that ``timm.create_model(name, pretrained=False, **kwargs)`` is this network."""
    _check_exportable(cfg, "timm")
    hidden = ffn_hidden_dim(cfg)
    kwargs: dict[str, Any] = dict(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=(hidden + 0.5) / cfg.embed_dim,  # timm takes int(D·ratio): the +0.5 makes that exactly `hidden`
        swiglu_mlp=cfg.ffn_layer != "mlp",
        swiglu_align_to=8 if cfg.ffn_layer != "mlp" else 0,
        num_reg_tokens=cfg.n_storage_tokens,
        init_values=cfg.layerscale_init,
        rope_temperature=cfg.pos_embed_rope_base,
        qkv_bias=cfg.qkv_bias,
    )
    if cfg.norm_layer == "layernorm":
        from timm.layers import LayerNorm

        kwargs["norm_layer"] = functools.partial(LayerNorm, eps=1e-6)
    return ("vit_base_patch16_dinov3_qkvb" if cfg.qkv_bias else "vit_base_patch16_dinov3"), kwargs


# ----------------------------------------------------------------------------------------------------------------
# architectures: expected shapes, inference from shapes, nearest match
# ----------------------------------------------------------------------------------------------------------------


def synthesizable(key: str, layout: str) -> bool:
    """Whether ``layout`` cannot carry ``key`` (official name), so that it is rebuilt on load (module doc)."""
    if layout not in ("timm", "hf"):
        return False
    if key in ("rope_embed.periods", "mask_token") or key.startswith("local_cls_norm.") or key.endswith(".bias_mask"):
        return True
    return layout == "timm" and key.endswith("attn.qkv.bias")  # timm's bias-free variant of the same weights


def _expected_shapes(cfg: ViTConfig) -> dict[str, tuple[int, ...]]:
    return dict(_expected_shapes_cached(json.dumps(dataclasses.asdict(cfg), sort_keys=True)))


@functools.lru_cache(maxsize=64)
def _expected_shapes_cached(cfg_json: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    model = DinoVisionTransformer(ViTConfig(**json.loads(cfg_json)), device="meta")
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def _official_candidates(in_chans: int = 3) -> dict[str, ViTConfig]:
    out = {}
    for name in ARCHS:
        out[name] = arch_config(name, in_chans=in_chans)
        if name == "dinov3_vitl16":
            out[SAT_LABEL] = arch_config(name, in_chans=in_chans, untie_global_and_local_cls_norm=True)
    return out


def arch_name(cfg: ViTConfig) -> str:
    """The official name whose architecture ``cfg`` is (SAT-493M ViT-L labelled as such), else ``"custom"``.
    ``in_chans`` and non-architectural fields are not compared."""
    fields = [f for f in ViTConfig.ARCH_FIELDS if f != "in_chans"]
    for label, ref in _official_candidates().items():
        if all(getattr(cfg, f) == getattr(ref, f) for f in fields):
            return label
    return "custom"


def nearest_archs(shapes: dict[str, tuple[int, ...]], top: int = 3) -> list[tuple[str, int, int]]:
    """Official architectures ranked by how many of their tensors ``shapes`` holds with the same name and shape:
    ``[(label, matched, expected), ...]``."""
    in_chans = shapes.get("patch_embed.proj.weight", (0, 3))[1]
    scores = []
    for label, cfg in _official_candidates(in_chans).items():
        exp = _expected_shapes(cfg)
        matched = sum(1 for k, s in exp.items() if shapes.get(k) == s)
        scores.append((label, matched, len(exp), matched / max(len(exp), len(shapes))))
    scores.sort(key=lambda t: -t[3])
    return [(a, b, c) for a, b, c, _ in scores[:top]]


def _shape(sd: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def infer_config(
    sd: dict[str, Tensor], hints: dict[str, Any] | None = None, layout: str = "official"
) -> ViTConfig:
    """The :class:`ViTConfig` implied by an official-layout state dict's keys and shapes.

    Embed dim, depth, patch size, bands, storage tokens, FFN type/width, biases, LayerScale and the untied norms are
    read off the shapes; heads come from the RoPE ``periods`` (``D_h = 4·len``) or ``hints`` (HF config) or default
    to 64-channel heads; an official architecture with exactly these shapes (up to the tensors ``layout`` cannot
    carry) is preferred."""
    hints = dict(hints or {})
    try:
        D = sd["cls_token"].shape[-1]
        pw = sd["patch_embed.proj.weight"]
    except KeyError as e:
        raise CheckpointError(f"not a DINOv3 backbone: no {e.args[0]!r} tensor") from None
    shapes = _shape(sd)
    in_chans = pw.shape[1]
    for label, cfg in _official_candidates(in_chans).items():
        exp = _expected_shapes(cfg)
        if all(exp.get(k) == s for k, s in shapes.items()) and all(
            k in shapes or synthesizable(k, layout) for k in exp
        ):
            return cfg
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise CheckpointError("not a DINOv3 backbone: no 'blocks.{i}.*' tensors")
    depth = max(blocks) + 1
    periods = sd.get("rope_embed.periods")
    if periods is not None:
        head_dim = 4 * periods.numel()
    elif "num_heads" in hints:
        head_dim = D // hints["num_heads"]
    else:
        head_dim = 64 if D % 64 == 0 else 128 if D % 128 == 0 else D
    kw: dict[str, Any] = dict(
        img_size=hints.get("img_size", 224),
        patch_size=pw.shape[-1],
        in_chans=in_chans,
        embed_dim=D,
        depth=depth,
        num_heads=D // head_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        proj_bias="blocks.0.attn.proj.bias" in sd,
        n_storage_tokens=sd["storage_tokens"].shape[1] if "storage_tokens" in sd else 0,
        mask_k_bias="blocks.0.attn.qkv.bias_mask" in sd
        or ("blocks.0.attn.qkv.bias" in sd and "rope_embed.periods" not in sd),
        layerscale_init=hints.get("layerscale_init", 1e-5) if "blocks.0.ls1.gamma" in sd else None,
        norm_layer=hints.get("norm_layer", "layernormbf16") if "norm.bias" in sd else "rmsnorm",
        untie_cls_and_patch_norms="cls_norm.weight" in sd,
        untie_global_and_local_cls_norm="local_cls_norm.weight" in sd,
        pos_embed_rope_rescale_coords=2.0,
    )
    kw.update(_rope_from_periods(periods, head_dim, hints))
    if "blocks.0.mlp.fc1.weight" in sd:
        hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
        kw.update(ffn_layer="mlp", ffn_ratio=hidden / D, ffn_bias="blocks.0.mlp.fc1.bias" in sd)
        if int(D * kw["ffn_ratio"]) != hidden:
            kw["ffn_ratio"] = (hidden + 0.5) / D
    elif "blocks.0.mlp.w1.weight" in sd:
        hidden = sd["blocks.0.mlp.w1.weight"].shape[0]
        kw.update(ffn_bias="blocks.0.mlp.w1.bias" in sd)
        for kind in ("swiglu", "swiglu32", "swiglu64", "swiglu128"):
            ratio = round(1.5 * hidden / D, 6)
            if swiglu_hidden_dim(D, ratio, FFN_ALIGN[kind]) == hidden:
                kw.update(ffn_layer=kind, ffn_ratio=ratio)
                break
        else:
            raise CheckpointError(f"cannot find an FFN ratio giving a SwiGLU width of {hidden} for D={D}")
    else:
        raise CheckpointError("not a DINOv3 backbone: no blocks.0.mlp.fc1 or blocks.0.mlp.w1 weights")
    return ViTConfig(**kw)


def _rope_from_periods(periods: Tensor | None, head_dim: int, hints: dict[str, Any]) -> dict[str, Any]:
    if periods is None or periods.numel() < 2:
        return dict(pos_embed_rope_base=hints.get("pos_embed_rope_base", 100.0))
    p = periods.double()
    n = p.numel()
    if abs(p[0].item() - 1.0) < 1e-6:
        est = p[-1].item() ** (head_dim / (4 * (n - 1)))
        for base in (100.0, float(round(est)), est):
            ref = rope_periods(head_dim, base=base, dtype=torch.float64)
            if torch.allclose(ref, p, rtol=1e-2):
                return dict(pos_embed_rope_base=base)
        return dict(pos_embed_rope_base=est)
    return dict(pos_embed_rope_base=None, pos_embed_rope_min_period=p[0].item(), pos_embed_rope_max_period=p[-1].item())


def describe_config(cfg: ViTConfig) -> str:
    """``D=64, depth 3, 2 heads, mlp FFN (hidden 256), 4 storage tokens, patch 16, 3 bands``."""
    return (
        f"D={cfg.embed_dim}, depth {cfg.depth}, {cfg.num_heads} heads, {cfg.ffn_layer} FFN (hidden "
        f"{ffn_hidden_dim(cfg)}), {cfg.n_storage_tokens} storage tokens, patch {cfg.patch_size}, {cfg.in_chans} bands"
    )


# ----------------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """Coverage of one load: every expected tensor is either ``loaded`` from the file or ``synthesized`` (a buffer
    or training-only tensor the layout cannot hold, rebuilt from the architecture); ``ignored`` lists file entries
    outside the backbone (heads, optimizer …)."""

    path: str
    container: str
    layout: str
    prefix: str
    arch: str
    config_source: str
    sat_variant: bool | None
    loaded: int
    expected: int
    synthesized: list[str]
    ignored: list[str]
    dtypes: dict[str, int]
    n_params: int
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        sat = {True: "yes", False: "no", None: "n/a"}[self.sat_variant]
        parts = [
            f"{self.path}: {self.layout} layout ({self.container}"
            + (f", prefix '{self.prefix}'" if self.prefix else "")
            + ")",
            f"arch {self.arch} ({self.config_source})",
            f"loaded {self.loaded}/{self.expected} tensors",
            f"{self.n_params:,} parameters",
            f"SAT-493M variant: {sat}",
        ]
        if self.synthesized:
            parts.append(f"synthesized {len(self.synthesized)} ({', '.join(_patterns(self.synthesized))})")
        if self.ignored:
            parts.append(f"ignored {', '.join(self.ignored)}")
        parts += self.notes
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_weights(weights: str | os.PathLike, arch: str | None) -> Path:
    """A path, or ``"LVD1689M"``/``"SAT493M"`` looked up by the official file name of ``arch`` in
    ``$DINOV3_WEIGHTS_DIR`` and ``torch.hub.get_dir()/checkpoints``."""
    text = os.fspath(weights)
    if text.lower() in WEIGHT_SETS and not Path(text).exists():
        if arch is None:
            raise CheckpointError(f"weights={text!r} needs an architecture (e.g. dinov3_vitl16(weights={text!r}))")
        try:
            fname = official_weight_filename(arch, text.lower())
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        dirs = []
        if os.environ.get("DINOV3_WEIGHTS_DIR"):
            dirs.append(Path(os.environ["DINOV3_WEIGHTS_DIR"]).expanduser())
        dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
        for d in dirs:
            if (d / fname).is_file():
                return d / fname
        raise CheckpointError(
            f"{fname} not found in {' or '.join(str(d) for d in dirs)}; download it from Meta (eo_dinov3 never "
            "downloads) and put it there, set $DINOV3_WEIGHTS_DIR, or pass weights=<path>"
        )
    return Path(text).expanduser()


def _complete(
    sd: dict[str, Tensor], cfg: ViTConfig, layout: str
) -> tuple[dict[str, Tensor], list[str]]:
    """Add the tensors the layout cannot carry (see module doc); official-layout files must hold everything."""
    if layout not in ("timm", "hf"):
        return sd, []
    sd = dict(sd)
    synthesized = []
    expected = _expected_shapes(cfg)
    D = cfg.embed_dim
    for k, shape in expected.items():
        if k in sd or not synthesizable(k, layout):
            continue
        if k == "rope_embed.periods":
            sd[k] = _periods_for(cfg)
        elif k.endswith(".bias_mask"):
            m = torch.ones(shape)
            m[D : 2 * D] = 0.0
            sd[k] = m
        elif k == "mask_token":
            sd[k] = torch.zeros(shape)
        elif k == "local_cls_norm.weight":
            sd[k] = torch.ones(shape)
        elif k == "local_cls_norm.bias":
            sd[k] = torch.zeros(shape)
        else:  # qkv.bias of timm's bias-free variant
            sd[k] = torch.zeros(shape)
        synthesized.append(k)
    return sd, synthesized


def _config_for(raw: RawCheckpoint, arch: str | None, overrides: dict[str, Any]) -> tuple[ViTConfig, str, list[str]]:
    sd = raw.state_dict
    notes: list[str] = []
    eo_meta = {}
    if raw.config:
        eo_meta = {k: raw.config.get(k) for k in ("bands", "normalization", "gsd_m") if raw.config.get(k) is not None}
    if arch is not None:
        cfg = arch_config(arch, **overrides)
        source = f"arch={arch}"
        changes: dict[str, Any] = {}
        pw = sd.get("patch_embed.proj.weight")
        if "in_chans" not in overrides and pw is not None and pw.ndim == 4 and pw.shape[1] != cfg.in_chans:
            changes["in_chans"] = pw.shape[1]
            notes.append(f"in_chans={pw.shape[1]} from the checkpoint")
        if "local_cls_norm.weight" in sd and not cfg.untie_global_and_local_cls_norm:
            changes["untie_global_and_local_cls_norm"] = True
            notes.append("local_cls_norm found: built with untie_global_and_local_cls_norm=True (SAT-493M layout)")
        for k, v in eo_meta.items():
            if k not in overrides:
                changes[k] = v
        cfg = dataclasses.replace(cfg, **changes)
    elif raw.config:
        try:
            cfg = ViTConfig.from_dict({**raw.config, **overrides})
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{raw.path}: recorded config is invalid ({e})") from None
        source = "config recorded in the file"
    else:
        cfg = infer_config(sd, raw.hints, raw.layout)
        if overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        source = "inferred from shapes"
    label = arch_name(cfg)
    if label == SAT_LABEL and cfg.normalization is None and "normalization" not in overrides:
        cfg = dataclasses.replace(cfg, normalization=WEIGHTS_NORMALIZATION["sat493m"])
        notes.append("normalization=sat493m (SAT-493M weights)")
    return cfg, source, notes


def _mismatch_message(raw: RawCheckpoint, sd: dict[str, Tensor], cfg: ViTConfig, target: str) -> str | None:
    expected = _expected_shapes(cfg)
    shapes = _shape(sd)
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [k for k in expected if k in shapes and shapes[k] != expected[k]]
    if not (missing or unexpected or wrong):
        return None
    ok = len(expected) - len(missing) - len(wrong)
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''})")
    if unexpected:
        parts.append(
            f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}{', …' if len(unexpected) > 3 else ''})"
        )
    if wrong:
        parts.append(
            f"{len(wrong)} mis-shaped ("
            + ", ".join(f"{k} {list(shapes[k])} vs {list(expected[k])}" for k in wrong[:2])
            + (", …" if len(wrong) > 2 else "")
            + ")"
        )
    best = nearest_archs(shapes, top=1)[0]
    if best[0] != target and best[1] > 0:
        hint = f"this looks like {best[0]} (matches {best[1]}/{best[2]} tensors), not {target}"
    else:
        try:
            hint = f"the file holds a {describe_config(infer_config(sd, raw.hints, raw.layout))} ViT"
        except CheckpointError:
            hint = f"closest official architecture: {best[0]} ({best[1]}/{best[2]} tensors)"
    return (
        f"{raw.path}: does not fit {target}: only {ok}/{len(expected)} tensors match; {'; '.join(parts)}; {hint}"
    )


def load_backbone(
    weights: str | os.PathLike,
    *,
    arch: str | None = None,
    device: torch.device | str | None = None,
    **overrides: Any,
) -> DinoVisionTransformer:
    """Build the backbone stored in the LOCAL file ``weights`` and load it strictly (never downloads).

    ``weights``: a path (official hub ``.pth``, ``teacher_checkpoint.pth``, timm, HF safetensors/bin/folder, ours)
    or ``"LVD1689M"``/``"SAT493M"`` (official file name of ``arch`` in ``$DINOV3_WEIGHTS_DIR`` / torch hub cache).
    ``arch``: an official name (``eo_dinov3.hub.ARCHS``); ``None`` uses the config recorded in the file or infers it
    from the tensor shapes. ``overrides`` change :class:`ViTConfig` fields (e.g. ``drop_path_rate=0.1``).
    The satellite ViT-L is recognised from its ``local_cls_norm`` keys, whatever the file name.

    Returns the model (train mode, as the official hub, fp32 parameters) with ``model.load_report``
    (:class:`LoadReport`). Raises :class:`CheckpointError` (one line) for unreadable or non-matching files."""
    if arch is not None and arch not in ARCHS:
        raise CheckpointError(f"unknown backbone {arch!r}; choose from {sorted(ARCHS)}")
    path = resolve_weights(weights, arch)
    raw = read_checkpoint(path)
    cfg, source, notes = _config_for(raw, arch, overrides)
    sd, synthesized = _complete(raw.state_dict, cfg, raw.layout)
    label = arch_name(cfg)
    if label == "custom":
        target = arch or f"a {describe_config(cfg)} ViT"
    else:
        target = label
    msg = _mismatch_message(raw, sd, cfg, target)
    if msg:
        raise CheckpointError(msg)
    model = DinoVisionTransformer(cfg, device="meta")
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    sd = {k: (v.to(dtypes[k]) if v.dtype != dtypes[k] else v) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    if device is not None:
        model.to(device)
    expected = len(dtypes)
    n_params = sum(p.numel() for p in model.parameters())
    report = LoadReport(
        path=str(path),
        container=raw.container,
        layout=raw.layout,
        prefix=raw.prefix,
        arch=label,
        config_source=source,
        sat_variant=_sat_variant(cfg, label, raw.layout),
        loaded=expected - len(synthesized),
        expected=expected,
        synthesized=synthesized + raw.zero_filled,
        ignored=raw.ignored,
        dtypes=raw.dtypes,
        n_params=n_params,
        notes=notes,
    )
    model.load_report = report
    log.info("%s", report.summary())
    return model


def _sat_variant(cfg: ViTConfig, label: str, layout: str) -> bool | None:
    """Whether the SAT-493M layout (``local_cls_norm``) is present; None where keys cannot tell: the 7B (always has
    it) and timm/HF files (they never store it; SAT weights there load as the LVD architecture, same outputs)."""
    if label == "dinov3_vit7b16" or layout in ("timm", "hf"):
        return None
    return cfg.untie_global_and_local_cls_norm


# ----------------------------------------------------------------------------------------------------------------
# saving
# ----------------------------------------------------------------------------------------------------------------


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cpu_contiguous(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def save_backbone(model: DinoVisionTransformer, path: str | os.PathLike, *, format: str = "eo") -> Path:
    """Write ``model``'s weights (atomically) as ``official`` (plain state dict, Meta's hub format),
    ``safetensors`` (official keys, config JSON in the metadata) or ``eo`` (``{"format": "eo_dinov3",
    "version": 1, "config", "state_dict"}``, which records bands/normalization/gsd_m). Returns the path."""
    if format not in SAVE_FORMATS:
        raise ValueError(f"unknown format {format!r}; choose from {SAVE_FORMATS}")
    path = Path(path).expanduser()
    sd = _cpu_contiguous(model.state_dict())
    config = model.config.to_dict()
    if format == "official":
        _atomic_write(path, lambda p: torch.save(sd, p))
    elif format == "eo":
        payload = {"format": EO_FORMAT, "version": EO_VERSION, "config": config, "state_dict": sd}
        _atomic_write(path, lambda p: torch.save(payload, p))
    else:
        from safetensors.torch import save_file

        meta = {"format": EO_FORMAT, "version": str(EO_VERSION), "layout": "official", "config": json.dumps(config)}
        _atomic_write(path, lambda p: save_file(sd, p, metadata=meta))
    return path


KEPT_KEY = "eo_dinov3.kept_tensors"


def _kept_tensors(official: dict[str, Tensor], foreign: dict[str, Tensor], layout: str) -> dict[str, Tensor]:
    """Official tensors that the ``layout`` file cannot reproduce bit for bit (mask token, the masked key third of
    ``qkv.bias``, stored RoPE periods, ``local_cls_norm`` …)."""
    back = convert_state_dict(foreign, layout, "official")
    return {k: v for k, v in official.items() if k not in back or not torch.equal(back[k], v)}


def _encode_tensors(tensors: dict[str, Tensor]) -> str:
    """JSON of ``{key: [dtype, shape, base64 bytes]}`` for the safetensors metadata (strings only)."""
    import base64

    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        raw = v.view(torch.uint8).numpy().tobytes() if v.numel() else b""
        out[k] = [str(v.dtype).replace("torch.", ""), list(v.shape), base64.b64encode(raw).decode()]
    return json.dumps(out)


def _decode_tensors(text: str) -> dict[str, Tensor]:
    import base64

    out = {}
    for k, (dtype, shape, data) in json.loads(text).items():
        dt = getattr(torch, dtype)
        buf = bytearray(base64.b64decode(data))
        t = torch.frombuffer(buf, dtype=torch.uint8).view(dt) if buf else torch.empty(0, dtype=dt)
        out[k] = t.reshape(shape).clone()
    return out


def save_layout(model: DinoVisionTransformer, path: str | os.PathLike, layout: str) -> Path:
    """Write ``model`` in the ``timm`` or ``hf`` key layout: ``.safetensors`` files get the config in the metadata;
    a path without a weights suffix becomes an HF ``save_pretrained``-style folder (``config.json`` +
    ``model.safetensors``) for ``hf``; other suffixes are written with ``torch.save``."""
    from safetensors.torch import save_file

    path = Path(path).expanduser()
    sd = _cpu_contiguous(export_state_dict(model, layout))
    if layout == "hf":
        extra = {"hf_config": json.dumps(hf_config(model.config))}
    else:
        extra = {"timm_model": timm_config(model.config)[0], "num_heads": str(model.config.num_heads)}
    # tensors the foreign layout cannot hold ride along in the safetensors header (ignored by timm/transformers,
    # restored by read_checkpoint), so official -> timm/HF file -> official is lossless
    kept = _kept_tensors(export_state_dict(model, "official"), sd, layout)
    if kept:
        extra[KEPT_KEY] = _encode_tensors(kept)
    if layout == "hf" and path.suffix not in (".safetensors", ".pth", ".pt", ".bin"):
        path.mkdir(parents=True, exist_ok=True)
        cfg = {"architectures": ["DINOv3ViTModel"], "model_type": "dinov3_vit", **hf_config(model.config)}
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
        meta = {"format": "pt", **({KEPT_KEY: extra[KEPT_KEY]} if KEPT_KEY in extra else {})}
        _atomic_write(path / "model.safetensors", lambda p: save_file(sd, p, metadata=meta))
        return path
    if path.suffix == ".safetensors":
        _atomic_write(path, lambda p: save_file(sd, p, metadata={"format": "pt", **extra}))
    else:
        _atomic_write(path, lambda p: torch.save(sd, p))
    return path


# ----------------------------------------------------------------------------------------------------------------
# inspection and CLI
# ----------------------------------------------------------------------------------------------------------------


def inspect_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """What a file is, without building a model: layout, container, prefix, architecture guess with match counts,
    parameter count, SAT variant, dtypes, ignored entries (heads …) and recorded EO metadata."""
    raw = read_checkpoint(path)
    sd = raw.state_dict
    info: dict[str, Any] = {
        "file": str(raw.path),
        "size_bytes": raw.path.stat().st_size,
        "container": raw.container,
        "layout": raw.layout,
        "prefix": raw.prefix,
        "tensors": len(sd),
        "parameters": sum(v.numel() for k, v in sd.items() if not k.endswith(("periods", "bias_mask"))),
        "dtypes": raw.dtypes,
        "ignored": raw.ignored,
    }
    full = sd
    try:
        cfg = ViTConfig.from_dict(raw.config) if raw.config else infer_config(sd, raw.hints, raw.layout)
        full = _complete(sd, cfg, raw.layout)[0]  # judge timm/hf files with what their layout cannot hold
        info["arch"] = arch_name(cfg)
        info["architecture"] = describe_config(cfg)
        info["config"] = {k: getattr(cfg, k) for k in ViTConfig.ARCH_FIELDS}
        info["sat_variant"] = _sat_variant(cfg, info["arch"], raw.layout)
    except (CheckpointError, ValueError, TypeError) as e:
        info["arch"] = None
        info["architecture"] = f"unknown ({e})"
        info["sat_variant"] = None
    info["nearest_official"] = [
        {"arch": a, "matched": m, "expected": n} for a, m, n in nearest_archs(_shape(full))
    ]
    info["local_cls_norm"] = "local_cls_norm.weight" in sd
    info["eo_metadata"] = (
        {k: raw.config.get(k) for k in ("bands", "normalization", "gsd_m")} if raw.config else None
    )
    return info


def _format_info(info: dict[str, Any]) -> str:
    sat = {True: "yes", False: "no", None: "cannot tell from keys"}[info["sat_variant"]]
    near = ", ".join(f"{d['arch']} {d['matched']}/{d['expected']}" for d in info["nearest_official"])
    lines = [
        f"file:          {info['file']}",
        f"container:     {info['container']}",
        f"layout:        {info['layout']}" + (f" (prefix '{info['prefix']}')" if info["prefix"] else ""),
        f"architecture:  {info['arch']}  [{info['architecture']}]",
        f"official fit:  {near}  (tensors matched by name and shape)",
        f"parameters:    {info['parameters']:,} in {info['tensors']} tensors",
        f"dtypes:        {', '.join(f'{k} x{v}' for k, v in info['dtypes'].items())}",
        f"SAT-493M:      {sat}" + (" (local_cls_norm present)" if info["local_cls_norm"] else ""),
        f"ignored:       {', '.join(info['ignored']) or 'nothing'}",
        f"EO metadata:   {json.dumps(info['eo_metadata']) if info['eo_metadata'] else 'none recorded'}",
    ]
    return "\n".join(lines)


def _inspect_cli(args: argparse.Namespace) -> int:
    info = inspect_checkpoint(args.file)
    print(json.dumps(info, indent=2, default=str) if args.json else _format_info(info))
    return 0


def _convert_cli(args: argparse.Namespace) -> int:
    model = load_backbone(args.input, arch=args.arch)
    if args.to in SAVE_FORMATS:
        out = save_backbone(model, args.output, format=args.to)
    else:
        out = save_layout(model, args.output, args.to)
    print(f"{model.load_report.summary()}\nwrote {out} ({args.to})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``inspect-checkpoint`` and ``convert-checkpoint`` to the ``eo-dinov3`` command line."""
    p = subparsers.add_parser(
        "inspect-checkpoint",
        help="say what a weights file is (layout, architecture, SAT variant, heads, dtypes, EO metadata)",
        description="Read a checkpoint safely (weights_only / safetensors) and describe it without building a model.",
    )
    p.add_argument("file", help="checkpoint file (.pth/.pt/.bin/.safetensors) or HF folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_inspect_cli)
    c = subparsers.add_parser(
        "convert-checkpoint",
        help="convert a backbone checkpoint between official/timm/hf/safetensors/eo",
        description="Load IN strictly (any supported layout) and write OUT in the chosen format.",
    )
    c.add_argument("input", help="source checkpoint")
    c.add_argument("output", help="destination file (an HF folder for --to hf without a file suffix)")
    c.add_argument("--to", required=True, choices=["official", "timm", "hf", "safetensors", "eo"])
    c.add_argument("--arch", default=None, choices=sorted(ARCHS), help="architecture (default: from the file)")
    c.set_defaults(func=_convert_cli)
