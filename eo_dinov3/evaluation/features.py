"""Frozen-backbone features for GEO-Bench, computed once and cached on disk.

:class:`FrozenBackbone` wraps our DINOv3 ViTs (``dinov3_vitl16`` …, optionally ``weights=FILE``) and any timm model
(``timm:NAME``, weights from a local file) behind one call that returns, for a batch ``[B, C, H, W]``:

* ``cls``  ``[B, D]`` — final-normed CLS token (CNNs: global average pool),
* ``mean`` ``[B, D]`` — mean of the final-normed patch tokens,
* ``maps`` — per tapped layer ``(patch map [B, D, H/p, W/p], CLS [B, D])`` for segmentation heads.

:class:`FeatureCache` stores the features of one (backbone weights checksum, task, split, partition, band set,
resolution, normalisation, layers) in ``<cache>/<task>/<split>-<partition>-<hash>.pt``; a second probe, seed or
method reads them back without a backbone pass. A partition whose samples are all in a cached ``default`` entry is
served by slicing that entry (label-efficiency sweeps cost no extra backbone pass either).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eo_dinov3.errors import CheckpointError, ConfigError
from eo_dinov3.evaluation.geobench_format import GeoBenchTask

FEATURE_VERSION = 1  # bump when the stored layout changes


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def sha256_state_dict(model: nn.Module) -> str:
    """Hex SHA-256 over a model's parameters and buffers (names, shapes, bytes) — identifies random inits."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        if not isinstance(v, Tensor) or v.device.type == "meta":
            continue
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def four_even_intervals(depth: int) -> list[int]:
    """Official DINOv3 ``FOUR_EVEN_INTERVALS`` taps ``[i·L/4 − 1]`` (forced to ``[4, 11, 17, 23]`` for 24 blocks;
    shallow test models repeat layers)."""
    if depth == 24:
        return [4, 11, 17, 23]
    return [max(0, (i + 1) * depth // 4 - 1) for i in range(4)]


@dataclass
class FrozenBackbone:
    """A frozen backbone in ``eval()`` mode with a uniform feature interface (see module doc)."""

    name: str
    model: nn.Module
    embed_dim: int
    patch_size: int
    depth: int
    checksum: str
    kind: str  # "dinov3" | "timm-vit" | "timm-cnn"
    input_mean: tuple[float, ...] | None = None  # model preset on [0, 1] input, when known
    input_std: tuple[float, ...] | None = None
    meta: dict = field(default_factory=dict)

    @torch.no_grad()
    def __call__(self, x: Tensor, layers: Sequence[int] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        m = self.model
        if self.kind == "dinov3":
            take = sorted(set(layers or []) | {self.depth - 1})
            res = m.get_intermediate_layers(x, n=take, reshape=True, return_class_token=True, norm=True)
            by_layer = dict(zip(take, res))
            last_map, last_cls = by_layer[self.depth - 1]
            out["cls"], out["mean"] = last_cls, last_map.mean((2, 3))
            out["maps"] = [by_layer[i] for i in (layers or [])]
        elif self.kind == "timm-vit":
            idx = sorted(set(layers or []) | {self.depth - 1})
            final, inter = m.forward_intermediates(x, indices=idx, norm=True, output_fmt="NCHW",
                                                   return_prefix_tokens=True)  # fmt: skip
            by_layer = {}
            for i, item in zip(idx, inter):
                pmap, prefix = item if isinstance(item, tuple) else (item, None)
                cls = prefix[:, 0] if prefix is not None and prefix.shape[1] else pmap.mean((2, 3))
                by_layer[i] = (pmap, cls)
            npt = getattr(m, "num_prefix_tokens", 1)
            final = m.norm(final) if hasattr(m, "norm") else final
            out["cls"] = final[:, 0] if npt else final.mean(1)
            out["mean"] = final[:, npt:].mean(1)
            out["maps"] = [by_layer[i] for i in (layers or [])]
        else:  # CNN: forward_intermediates gives NCHW maps
            idx = sorted(set(layers or []) | {self.depth - 1})
            final, inter = m.forward_intermediates(x, indices=idx)
            pooled = final.mean((2, 3))
            out["cls"], out["mean"] = pooled, pooled
            out["maps"] = [(inter[idx.index(i)], inter[idx.index(i)].mean((2, 3))) for i in (layers or [])]
        return out


def _load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"weights file {p} not found")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    sd = torch.load(p, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "teacher"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def load_frozen_backbone(spec: str, weights: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                         arch_overrides: dict | None = None, seed: int = 0) -> FrozenBackbone:  # fmt: skip
    """``spec``: an official name (``dinov3_vitl16`` …; ``weights`` = local file in any layout that
    :mod:`eo_dinov3.checkpoints` reads, e.g. the web or SAT-493M release or one of our checkpoints) or
    ``timm:NAME`` (``timm.create_model(NAME, pretrained=False, num_classes=0)``, weights from a local file).
    Without weights the model is randomly initialised with ``torch.manual_seed(seed)`` (tests, smoke runs)."""
    overrides = dict(arch_overrides or {})
    torch.manual_seed(seed)
    if spec.startswith("timm:"):
        import timm

        name = spec[5:]
        try:
            model = timm.create_model(name, pretrained=False, num_classes=0, **overrides)
        except Exception as e:  # unknown name / bad kwargs
            raise ConfigError(f"timm cannot build {name!r}: {e}") from None
        if weights is not None:
            sd = _load_state_dict_file(weights)
            missing, unexpected = model.load_state_dict(sd, strict=False)
            missing = [k for k in missing if not k.startswith("head")]
            if missing:
                raise CheckpointError(
                    f"{weights} does not fit timm model {name}: {len(missing)} missing keys (e.g. {missing[:3]})"
                )
        is_vit = hasattr(model, "patch_embed") and hasattr(model, "blocks")
        depth = len(model.blocks) if is_vit else len(getattr(model, "feature_info", [])) or 4
        patch = model.patch_embed.patch_size[0] if is_vit else 32
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        kind = "timm-vit" if is_vit else "timm-cnn"
        fb = FrozenBackbone(spec, model, int(model.num_features), int(patch), int(depth), "", kind,
                            tuple(cfg.get("mean", ())) or None, tuple(cfg.get("std", ())) or None)  # fmt: skip
    else:
        from eo_dinov3 import hub

        if spec not in hub.ARCHS:
            raise ConfigError(f"unknown backbone {spec!r}; use one of {sorted(hub.ARCHS)} or timm:NAME")
        model = hub.build_backbone(spec, pretrained=weights is not None, weights=weights, **overrides)
        from eo_dinov3.data.normalization import get_normalization

        norm = get_normalization("sat493m" if weights and "sat493m" in str(weights).lower() else "lvd1689m")
        fb = FrozenBackbone(spec, model, int(model.embed_dim), int(model.patch_size), int(model.n_blocks), "",
                            "dinov3", norm.mean, norm.std)  # fmt: skip
    fb.model.eval().requires_grad_(False).to(device)
    fb.checksum = sha256_file(weights) if weights is not None else "init:" + sha256_state_dict(fb.model)[:32]
    fb.meta = {"weights": str(weights) if weights else None, "arch_overrides": overrides, "init_seed": seed}
    return fb


# ------------------------------------------------------------------------------------------------ preprocessing
@dataclass(frozen=True)
class Preprocess:
    """How raw on-disk values become model input ``[B, C, S, S]``.

    ``normalization``: ``dataset`` — per-band z-score with the task's ``band_stats.json`` (default; what the
    DINOv3 authors used for GEO-Bench RGB); ``model`` — robust [0, 1] scaling (band p1–p99) then the backbone's
    own mean/std (DINOv3 SAT: 0.430/0.411/0.296, 0.213/0.156/0.143); ``none`` — raw values.
    ``image_size``: side in pixels after bilinear resizing (a multiple of the patch size)."""

    bands: tuple[str, ...]
    image_size: int
    normalization: str = "dataset"

    def key(self) -> dict:
        return {"bands": list(self.bands), "image_size": self.image_size, "normalization": self.normalization}


def make_transform(task: GeoBenchTask, pre: Preprocess, backbone: FrozenBackbone) -> Callable[[np.ndarray], Tensor]:
    """Callable raw ``[C, H, W]`` -> normalised, resized ``[C, S, S]`` float32 tensor."""
    if pre.normalization == "dataset":
        off, scale = task.scaling(pre.bands, "zscore")
        post_m = post_s = None
    elif pre.normalization == "model":
        off, scale = task.scaling(pre.bands, "unit")
        n = len(off)
        if backbone.input_mean is None or len(backbone.input_mean) != n:
            raise ConfigError(
                f"normalization=model needs the backbone's mean/std for {n} bands; "
                f"{backbone.name} has {backbone.input_mean}; use --normalization dataset"
            )
        post_m = torch.tensor(backbone.input_mean)[:, None, None]
        post_s = torch.tensor(backbone.input_std)[:, None, None]
    elif pre.normalization == "none":
        off, scale = task.scaling(pre.bands, "none")
        post_m = post_s = None
    else:
        raise ConfigError(f"unknown normalization {pre.normalization!r}; use dataset, model or none")
    off_t, scale_t = torch.from_numpy(off)[:, None, None], torch.from_numpy(scale)[:, None, None]

    def fn(x: np.ndarray) -> Tensor:
        t = (torch.from_numpy(x) - off_t) / scale_t
        if post_m is not None:
            t = (t.clamp(0, 1) - post_m) / post_s
        if t.shape[-2:] != (pre.image_size, pre.image_size):
            t = F.interpolate(t[None], size=(pre.image_size, pre.image_size), mode="bilinear",
                              align_corners=False, antialias=True)[0]  # fmt: skip
        return t

    return fn


# ------------------------------------------------------------------------------------------------ cache
@dataclass
class FeatureSet:
    """Features of one split: ``cls``/``mean`` ``[N, D]`` float32, optional ``maps`` ``[N, L, D, h, w]`` float16
    and ``map_cls`` ``[N, L, D]``, labels (``[N]`` int, ``[N, K]`` multi-hot, or ``[N, H, W]`` class maps), sample
    names, and extraction stats (``seconds``, ``images``; 0 when read from the cache)."""

    names: list[str]
    cls: Tensor
    mean: Tensor
    labels: Tensor
    maps: Tensor | None = None
    map_cls: Tensor | None = None
    seconds: float = 0.0
    from_cache: bool = False

    def subset(self, names: Sequence[str]) -> "FeatureSet":
        pos = {n: i for i, n in enumerate(self.names)}
        idx = torch.tensor([pos[n] for n in names], dtype=torch.long)
        pick = (lambda t: None if t is None else t[idx])  # noqa: E731
        return FeatureSet(list(names), self.cls[idx], self.mean[idx], self.labels[idx], pick(self.maps),
                          pick(self.map_cls), 0.0, True)  # fmt: skip


class FeatureCache:
    """On-disk cache of :class:`FeatureSet` (see module doc). ``root=None`` disables caching."""

    def __init__(self, root: str | os.PathLike | None):
        self.root = Path(root) if root is not None else None
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(backbone: FrozenBackbone, task: str, split: str, partition: str, pre: Preprocess,
            layers: Sequence[int]) -> dict:  # fmt: skip
        return {"v": FEATURE_VERSION, "backbone": backbone.name, "checksum": backbone.checksum, "task": task,
                "split": split, "partition": partition, **pre.key(), "layers": list(layers)}  # fmt: skip

    def _path(self, key: dict) -> Path:
        assert self.root is not None
        h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return self.root / key["task"] / f"{key['split']}-{key['partition']}-{h}.pt"

    def get(self, key: dict) -> FeatureSet | None:
        if self.root is None:
            return None
        p = self._path(key)
        if not p.is_file():
            return None
        d = torch.load(p, map_location="cpu", weights_only=False)
        if d.get("key") != key:
            return None
        self.hits += 1
        return FeatureSet(d["names"], d["cls"], d["mean"], d["labels"], d.get("maps"), d.get("map_cls"), 0.0, True)

    def put(self, key: dict, fs: FeatureSet) -> None:
        if self.root is None:
            return
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        torch.save({"key": key, "names": fs.names, "cls": fs.cls, "mean": fs.mean, "labels": fs.labels,
                    "maps": fs.maps, "map_cls": fs.map_cls}, tmp)  # fmt: skip
        os.replace(tmp, p)


def _stack_labels(labels: list[Any]) -> Tensor:
    if isinstance(labels[0], (int, np.integer)):
        return torch.tensor([int(v) for v in labels], dtype=torch.long)
    return torch.from_numpy(np.stack(labels).astype(np.int64))


@torch.no_grad()
def extract_features(task: GeoBenchTask, names: Sequence[str], backbone: FrozenBackbone, pre: Preprocess, *,
                     layers: Sequence[int] = (), batch_size: int = 32, device: str | torch.device = "cpu",
                     progress: Callable[[int], None] | None = None) -> FeatureSet:  # fmt: skip
    """Run the frozen backbone over ``names`` (bf16 autocast on CUDA). ``layers``: blocks whose patch maps are kept
    (segmentation); empty for classification."""
    dev = torch.device(device)
    tf = make_transform(task, pre, backbone)
    cls_l, mean_l, maps_l, mcls_l, labels = [], [], [], [], []
    t0 = time.perf_counter()
    for start in range(0, len(names), batch_size):
        chunk = names[start : start + batch_size]
        xs = []
        for n in chunk:
            x, y = task.read_sample(n, pre.bands)
            xs.append(tf(x))
            labels.append(y)
        x = torch.stack(xs).to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out = backbone(x, layers=list(layers))
        cls_l.append(out["cls"].float().cpu())
        mean_l.append(out["mean"].float().cpu())
        if layers:
            maps_l.append(torch.stack([m for m, _ in out["maps"]], 1).half().cpu())
            mcls_l.append(torch.stack([c for _, c in out["maps"]], 1).float().cpu())
        if progress:
            progress(len(chunk))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    D = backbone.embed_dim
    empty = torch.zeros(0, D)
    return FeatureSet(
        list(names),
        torch.cat(cls_l) if cls_l else empty,
        torch.cat(mean_l) if mean_l else empty,
        _stack_labels(labels) if labels else torch.zeros(0, dtype=torch.long),
        torch.cat(maps_l) if maps_l else None,
        torch.cat(mcls_l) if mcls_l else None,
        secs,
        False,
    )


def cached_features(cache: FeatureCache, task: GeoBenchTask, split: str, partition: str, backbone: FrozenBackbone,
                    pre: Preprocess, *, layers: Sequence[int] = (), batch_size: int = 32,
                    device: str | torch.device = "cpu", progress: Callable[[int], None] | None = None) -> FeatureSet:  # fmt: skip
    """Features of ``task``/``split``/``partition`` from the cache, else computed once and stored."""
    key = cache.key(backbone, task.name, split, partition, pre, layers)
    hit = cache.get(key)
    names = task.split(split, partition)
    if hit is not None:
        if progress:
            progress(len(names))
        return hit
    if partition != "default":
        base = cache.get(cache.key(backbone, task.name, split, "default", pre, layers))
        if base is not None and set(names) <= set(base.names):
            fs = base.subset(names)
            cache.put(key, fs)
            if progress:
                progress(len(names))
            return fs
    cache.misses += 1
    fs = extract_features(task, names, backbone, pre, layers=layers, batch_size=batch_size, device=device,
                          progress=progress)  # fmt: skip
    cache.put(key, fs)
    return fs
