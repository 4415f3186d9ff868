"""Train a DPT canopy-height head on a **frozen** DINOv3 backbone from RGB / lidar-CHM pairs.

``python sat_training/train_canopy_head.py --config configs/canopy/autzen_demo.yaml [key=value ...]``

Pipeline:

* **Data** (:mod:`eo_dinov3.canopy.datasets`): each pair (RGB GeoTIFF + CHM raster in metres, any grid/CRS) is read
  and the CHM warped onto the image grid in memory; each pair is split spatially: ``data.split: halves`` (west =
  train, east = validation along ``split_axis``, ``data.gap_px`` unused columns between) or ``blocks`` (checkerboard
  of ``data.block_px`` blocks, ``data.fold`` picks the validation colour, ``gap_px`` between train and validation
  blocks: spatial block cross-validation). Training chips are random ``data.chip`` px windows (regions drawn in
  proportion to their area) with ≥ ``min_valid`` valid target pixels; random 90° rotations + flips are applied
  identically to image and target. ``data.autzen: true`` builds the real Autzen pair (point-colour RGB + lidar CHM
  at 0.6 m, density-aware gap filling with ``data.autzen_min_coverage``) from the samples.
* **Model**: :class:`~eo_dinov3.canopy.model.CanopyHeightModel` = frozen backbone (``backbone.arch``, random init or
  ``backbone.weights``) + :class:`~eo_dinov3.models.dpt.DPTHead` (``head.*``: regression or
  linear/log/``chmv2_mixlog`` bins). Only the head is trained (AdamW, linear warm-up + cosine, grad clipping).
* **Losses** (``loss.*`` weights, summed): ``sigloss`` (official DINOv3 depth :class:`SigLoss`:
  ``sqrt(var(g) + 0.15·mean(g)²)``, ``g = log(pred+1e-3) − log(gt+1e-3)``, variance term off for the first
  ``warm_iter`` calls), ``l1`` (masked mean absolute error, metres) and ``bin_ce`` (negative log-probability of the
  bin nearest to the true height under the head's own bin normalisation; bin heads only). Nodata pixels never count.
* **Feature cache** (``train.cache_features: memory|disk|none``): the frozen backbone's four tapped layers are
  computed once per chip view and reused every epoch, so E head epochs cost one backbone pass instead of E. The
  price: augmentation is frozen too — each training chip is cached in ``train.cache_views`` random dihedral views
  chosen once (a ViT's features are not rotation-equivariant, so features cannot be rotated afterwards), and the
  chip positions are fixed. Use ``none`` (fresh random chips + augmentation every step, one backbone pass per chip
  per step) when the backbone is cheap relative to the data or the dataset is small enough to overfit.
* **Validation** each epoch on the validation regions (chips tiling each region, predictions stitched into a
  canvas over their bounding box; pixels outside the validation regions are not scored): MAE, RMSE, bias, R²,
  block-R² (50 px blocks) with :class:`~eo_dinov3.canopy.metrics.MetricAccumulator`, next to a constant baseline
  (the mean training height; the median is logged too).
* **Outputs** in ``output_dir``: ``last.pt`` (every epoch, atomic temp + fsync + rename: head, optimizer, schedule,
  step, RNG states → exact resume) and ``best.pt`` (lowest validation MAE), ``metrics.jsonl``, TensorBoard events
  in ``tb/``, ``config.yaml``; a random-init backbone is saved once as ``backbone.pth`` and referenced (with its
  SHA-256) by the checkpoints. ``eo-dinov3 chm predict --model output_dir/best.pt`` loads a checkpoint through
  :func:`load_head_checkpoint`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eo_dinov3.errors import CheckpointError, ConfigError, DataError
from eo_dinov3.fileio import atomic_save

HEAD_CKPT_FORMAT = "eo_dinov3.canopy_head"
HEAD_CKPT_VERSION = 1

#: defaults of every config key (YAML files and ``key=value`` overrides may only set these)
DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "output_dir": "runs/canopy_head",
    "resume": True,
    "data": {
        "pairs": [],  # [{image: rgb.tif, target: chm.tif}]
        "autzen": False,  # build the Autzen RGB + lidar-CHM pair from the samples into output_dir/data
        "autzen_min_coverage": 0.5,  # gap-filling rule of that pair (eo_dinov3.canopy.lidar.fill_mask)
        "chip": 128,
        "val_fraction": 0.5,
        "gap_px": 32,
        "split_axis": "x",
        "split": "halves",  # halves (west/east or north/south by split_axis) | blocks (checkerboard, see block_px)
        "block_px": 128,  # blocks: block size in pixels (gap_px between train and validation blocks)
        "fold": 0,  # blocks: which checkerboard colour is validation (0 or 1)
        "min_valid": 0.5,
        "train_chips": 64,
        "augment": True,
        "resampling": "bilinear",
        "normalization": "chmv2",
        "max_height_m": 120.0,
    },
    "backbone": {"arch": "dinov3_vits16", "weights": None, "init_seed": 0, "overrides": {}},
    "head": {
        "taps": None,  # default: 4 evenly spaced blocks ending at the last one
        "use_backbone_norm": True,
        "readout_type": "project",
        "channels": 64,
        "post_process_channels": [32, 64, 128, 256],
        "n_hidden_channels": 32,
        "n_output_channels": 256,
        "bins_strategy": "chmv2_mixlog",
        "norm_strategy": "chmv2_mixlog",
        "min_depth": 0.001,
        "max_depth": 96.0,
    },
    "loss": {"sigloss": 0.0, "l1": 1.0, "bin_ce": 0.0, "sigloss_warm_iter": 100},
    "optim": {"lr": 1e-3, "weight_decay": 1e-4, "betas": [0.9, 0.99], "grad_clip": 35.0, "warmup_steps": 10},
    "train": {
        "epochs": 20,
        "batch_size": 8,
        "cache_features": "memory",  # memory | disk | none
        "cache_views": 2,
        "steps_per_epoch": None,  # only without cache; default ceil(train_chips / batch_size)
        "device": None,
        "num_threads": None,
    },
    "log": {"tensorboard": True},
}


# --------------------------------------------------------------------------------------------------- config
def _unknown(defaults: dict, layer: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in layer.items():
        if k not in defaults:
            out.append(prefix + str(k))
        elif isinstance(v, dict) and isinstance(defaults[k], dict) and defaults[k]:
            out += _unknown(defaults[k], v, f"{prefix}{k}.")
    return out


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Defaults ← YAML file ← ``key=value`` overrides (OmegaConf dotlist); unknown keys raise :class:`ConfigError`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cfg = OmegaConf.create(DEFAULTS)
    try:
        layers = []
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"config file not found: {path}")
            layers.append((str(path), OmegaConf.load(path)))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        if overrides:
            layers.append(("command line", OmegaConf.from_dotlist(list(overrides))))
        for source, layer in layers:
            unknown = _unknown(DEFAULTS, OmegaConf.to_container(layer))
            if unknown:
                raise ConfigError(f"unknown config key(s) {unknown} in {source} (see eo_dinov3/canopy/training.py DEFAULTS)")
            cfg = OmegaConf.merge(cfg, layer)
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid config: {str(e).splitlines()[0]}") from None
    out = OmegaConf.to_container(cfg, resolve=True)
    if out["train"]["cache_features"] not in ("memory", "disk", "none"):
        raise ConfigError("train.cache_features must be memory, disk or none")
    return out


# --------------------------------------------------------------------------------------------------- losses
class SigLoss(nn.Module):
    """Scale-invariant log loss, semantics of the official ``dinov3/eval/depth/loss.py::SigLoss``.

    ``g = log(pred + 1e-3) − log(target + 1e-3)`` over valid pixels; loss ``sqrt(0.15·mean(g)² + var(g))`` with the
    (unbiased) variance term left out for the first ``warm_iter`` calls when ``warm_up``. Inputs ``[B, 1, H, W]``
    metres, ``valid`` bool of the same shape."""

    def __init__(self, warm_up: bool = True, warm_iter: int = 100):
        super().__init__()
        self.eps = 1e-3
        self.warm_up, self.warm_iter = warm_up, warm_iter
        self.warm_up_counter = 0

    def forward(self, pred: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
        if valid is None:
            valid = torch.ones_like(target, dtype=torch.bool)
        g = torch.log(pred[valid] + self.eps) - torch.log(target[valid] + self.eps)
        dg = 0.15 * g.mean() ** 2
        if self.warm_up and self.warm_up_counter < self.warm_iter:
            self.warm_up_counter += 1
        else:
            dg = dg + torch.var(g)
        return dg.abs() if dg <= 0 else torch.sqrt(dg)


def masked_l1(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Mean ``|pred − target|`` (metres) over ``valid`` pixels (0 when none)."""
    return ((pred - target).abs() * valid).sum() / valid.sum().clamp_min(1)


def bin_log_probs(logits: Tensor, norm_strategy: str) -> Tensor:
    """Log-probabilities ``[B, K, H, W]`` of the bins under the head's normalisation (same weights as
    :class:`~eo_dinov3.models.dpt.FeaturesToDepth`): softmax, sigmoid/Σ, ``(ReLU+0.1)/Σ`` or the CHMv2 mixlog
    ``(ReLU + shift)/Σ``."""
    if norm_strategy == "softmax":
        return F.log_softmax(logits, dim=1)
    if norm_strategy == "sigmoid":
        w = torch.sigmoid(logits)
    elif norm_strategy == "linear":
        w = torch.relu(logits) + 0.1
    elif norm_strategy == "chmv2_mixlog":
        y = torch.relu(logits)
        w = y + (-y.amin(dim=1, keepdim=True)).clamp(0.0, 1e-4) + 1e-8
    else:
        raise ConfigError(f"unknown norm_strategy {norm_strategy!r}")
    return torch.log((w / w.sum(dim=1, keepdim=True)).clamp_min(1e-12))


def bin_cross_entropy(logits: Tensor, target: Tensor, valid: Tensor, bins_m: Tensor, norm_strategy: str) -> Tensor:
    """Negative log-probability of the bin whose centre (metres, ``bins_m [K]``) is nearest to the true height,
    averaged over valid pixels. ``logits [B, K, H, W]``, ``target``/``valid`` ``[B, 1, H, W]``."""
    idx = (target.nan_to_num(0.0) - bins_m.view(1, -1, 1, 1)).abs().argmin(dim=1, keepdim=True)
    nll = -bin_log_probs(logits, norm_strategy).gather(1, idx)
    return (nll * valid).sum() / valid.sum().clamp_min(1)


# --------------------------------------------------------------------------------------------------- model
def default_taps(depth: int) -> list[int]:
    """4 evenly spaced 0-based blocks ending at the last one (ViT-L 24 → [5, 11, 17, 23]; ViT-S 12 → [2, 5, 8, 11])."""
    return [round(depth * (i + 1) / 4) - 1 for i in range(4)]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_backbone(bcfg: dict[str, Any]):
    """Frozen backbone from ``backbone.*``: ``weights`` (local file via :func:`eo_dinov3.checkpoints.load_backbone`)
    or a seeded random init of ``arch``."""
    from eo_dinov3.hub import build_backbone as hub_build

    overrides = dict(bcfg.get("overrides") or {})
    if bcfg.get("weights"):
        from eo_dinov3.checkpoints import load_backbone

        bb = load_backbone(bcfg["weights"], arch=bcfg.get("arch"), **overrides)
    else:
        with torch.random.fork_rng():
            torch.manual_seed(int(bcfg.get("init_seed", 0)))
            bb = hub_build(bcfg["arch"], pretrained=False, **overrides)
    return bb.eval().requires_grad_(False)


def build_model(cfg: dict[str, Any], backbone=None):
    """:class:`~eo_dinov3.canopy.model.CanopyHeightModel` (frozen backbone + fresh DPT head) from a config."""
    from eo_dinov3.canopy.model import CanopyHeightModel
    from eo_dinov3.models.dpt import DPTConfig, DPTHead

    bb = backbone if backbone is not None else build_backbone(cfg["backbone"])
    h = dict(cfg["head"])
    taps = h.pop("taps", None) or default_taps(bb.n_blocks)
    dcfg = DPTConfig(in_channels=(bb.embed_dim,) * 4, backbone_out_layers=tuple(taps), use_bias=True,
                     projection_after_fusion=False, use_batchnorm=False, **h)
    with torch.random.fork_rng():
        torch.manual_seed(int(cfg["seed"]))
        head = DPTHead(dcfg)
    return CanopyHeightModel(bb, head, normalization=cfg["data"]["normalization"], name="trained DPT head")


# --------------------------------------------------------------------------------------------------- checkpoints
def _read_head_ckpt(path: str | os.PathLike) -> dict[str, Any] | None:
    p = Path(path)
    if not p.is_file():
        return None
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    return obj if isinstance(obj, dict) and obj.get("format") == HEAD_CKPT_FORMAT else None


def is_head_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` is a head checkpoint written by this trainer (``last.pt`` / ``best.pt``)."""
    return _read_head_ckpt(path) is not None


def _resolve_backbone_file(ck: dict[str, Any], ckpt_path: Path) -> Path | None:
    b = ck["backbone"]
    if not b.get("weights"):
        return None
    cands = [Path(b["weights"])]
    if b.get("weights_relative"):
        cands.insert(0, ckpt_path.parent / b["weights_relative"])
    for c in cands:
        if c.is_file():
            return c
    raise CheckpointError(f"{ckpt_path}: its backbone file {b['weights']} is missing (keep backbone.pth next to the "
                          "checkpoint or pass the original backbone weights)")


def load_head_checkpoint(path: str | os.PathLike, *, device: str | torch.device | None = None):
    """A ready-to-predict :class:`~eo_dinov3.canopy.model.CanopyHeightModel` (eval mode) from ``last.pt``/``best.pt``;
    the backbone file it references is checked against the recorded SHA-256."""
    from eo_dinov3.canopy.model import CanopyHeightModel
    from eo_dinov3.models.dpt import DPTConfig, DPTHead

    p = Path(path)
    ck = _read_head_ckpt(p)
    if ck is None:
        raise CheckpointError(f"{p}: not a canopy-head checkpoint written by train_canopy_head.py")
    bfile = _resolve_backbone_file(ck, p)
    b = dict(ck["backbone"])
    if bfile is not None:
        sha = _sha256_file(bfile)
        if b.get("sha256") and sha != b["sha256"]:
            raise CheckpointError(f"{bfile}: SHA-256 differs from the backbone the head was trained on")
        b["weights"] = str(bfile)
    backbone = build_backbone(b)
    head = DPTHead(DPTConfig.from_dict({k: tuple(v) if isinstance(v, list) else v
                                        for k, v in ck["head_config"].items()}))
    head.load_state_dict(ck["head"], strict=True)
    model = CanopyHeightModel(backbone, head, normalization=ck["normalization"], gsd_m=ck.get("gsd_m"),
                              name=f"trained DPT head ({p.name}, {b.get('arch')})")
    model.training_metrics = ck.get("val_metrics", {})
    model = model.eval()
    return model.to(device) if device is not None else model


# --------------------------------------------------------------------------------------------------- trainer
@dataclass
class _Split:
    """A pair and its training / validation regions; ``val_box`` bounds the validation regions and ``val_mask``
    (``bool`` of ``val_box``'s shape) marks their pixels inside it."""

    pair: Any
    train: list
    val: list
    val_box: Any
    val_mask: np.ndarray


def _make_split(pair: Any, d: dict[str, Any]) -> _Split:
    from eo_dinov3.canopy.datasets import blocked_split, bounding_region, spatial_split

    if d["split"] == "halves":
        tr, va = spatial_split(pair.shape, d["val_fraction"], d["gap_px"], d["split_axis"])
        train, val = [tr], [va]
    elif d["split"] == "blocks":
        train, val = blocked_split(pair.shape, int(d["block_px"]), int(d["gap_px"]), int(d["fold"]))
    else:
        raise ConfigError(f"data.split must be 'halves' or 'blocks', got {d['split']!r}")
    chip = int(d["chip"])
    small = [r for r in train + val if r.height < chip or r.width < chip]
    if small:
        raise ConfigError(f"{pair.name}: split regions of {small[0].height}x{small[0].width} px are smaller than "
                          f"data.chip={chip}; use a larger data.block_px or a smaller data.chip / data.gap_px")
    box = bounding_region(val)
    mask = np.zeros((box.height, box.width), bool)
    for r in val:
        mask[r.row0 - box.row0 : r.row1 - box.row0, r.col0 - box.col0 : r.col1 - box.col0] = True
    return _Split(pair, train, val, box, mask)


def build_autzen_pair(folder: str | os.PathLike, resolution_m: float = 0.6,
                      min_coverage: float = 0.5) -> tuple[Path, Path]:
    """Real RGB + CHM pair from the Autzen lidar sample (``autzen_laz``), both rasterised from the cloud by
    :func:`eo_dinov3.canopy.lidar.chm_from_lidar` on one grid at ``resolution_m``: the colour of the highest first
    return per cell and the lidar CHM (first returns minus TIN ground), with density-aware gap filling
    (``min_coverage``, see :func:`eo_dinov3.canopy.lidar.fill_mask`; 0 = the plain 4-px distance fill of the
    ``autzen_rgb_0p6m`` sample, whose discs around isolated returns over the river look like tree crowns).
    Returns ``(rgb_path, chm_path)``. Note: the CHM is a normalised surface model — buildings count as "height" as
    well as trees."""
    from eo_dinov3.canopy.lidar import chm_from_lidar
    from eo_dinov3.data.samples import sample_path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tag = f"{resolution_m:g}m_cov{min_coverage:g}"
    chm, rgb = folder / f"autzen_chm_{tag}.tif", folder / f"autzen_rgb_{tag}.tif"
    if not (chm.is_file() and rgb.is_file()):
        chm_from_lidar(sample_path("autzen_laz"), chm, resolution_m=resolution_m, min_coverage=min_coverage,
                       rgb_out=rgb)
    return rgb, chm


class HeadTrainer:
    """Everything :func:`train` does, step by step (see the module docstring)."""

    def __init__(self, cfg: dict[str, Any], log=print):
        from eo_dinov3.canopy.datasets import load_pair

        self.cfg, self.log = cfg, log
        self.out = Path(cfg["output_dir"])
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg["train"].get("num_threads"):
            torch.set_num_threads(int(cfg["train"]["num_threads"]))
        self.device = torch.device(cfg["train"].get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        d = cfg["data"]
        pairs = [dict(p) for p in d["pairs"]]
        if d["autzen"]:
            img, chm = build_autzen_pair(self.out / "data", min_coverage=float(d["autzen_min_coverage"]))
            pairs.append({"image": str(img), "target": str(chm)})
        if not pairs:
            raise ConfigError("no training data: set data.pairs=[{image: ..., target: ...}] or data.autzen=true")
        self.splits = []
        for p in pairs:
            pr = load_pair(p["image"], p["target"], resampling=d["resampling"], max_height_m=d["max_height_m"])
            self.splits.append(_make_split(pr, d))
        tr_vals = np.concatenate([s.pair.target[r.row0:r.row1, r.col0:r.col1].ravel()
                                  for s in self.splits for r in s.train])
        tr_vals = tr_vals[np.isfinite(tr_vals)]
        if tr_vals.size == 0:
            raise DataError("the training regions hold no valid height")
        self.train_mean, self.train_median = float(tr_vals.mean()), float(np.median(tr_vals))

        self.model = build_model(cfg).to(self.device)
        self.model.backbone.eval()
        self.chip = int(d["chip"])
        if self.chip % self.model.pad_multiple:
            raise ConfigError(f"data.chip must be a multiple of {self.model.pad_multiple} px, got {self.chip}")
        self._backbone_record()
        o = cfg["optim"]
        self.params = [p for p in self.model.head.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=o["lr"], betas=tuple(o["betas"]), weight_decay=o["weight_decay"])
        self.losses = cfg["loss"]
        self.sigloss = SigLoss(warm_up=True, warm_iter=int(self.losses["sigloss_warm_iter"]))
        bins = self.model.features_to_height.bins(cfg["head"]["n_output_channels"], device=self.device)
        self.bins_m = bins * (8.0 if cfg["head"]["norm_strategy"] == "chmv2_mixlog" else 1.0)
        if self.losses["bin_ce"] and cfg["head"]["n_output_channels"] < 2:
            raise ConfigError("loss.bin_ce needs a bin head (head.n_output_channels > 1)")
        self.rng = np.random.default_rng(int(cfg["seed"]))
        self.epoch, self.step = 0, 0
        self.best_mae = math.inf
        self.cache: dict[str, list] = {}
        self.steps_per_epoch = self._steps_per_epoch()
        total = max(1, self.steps_per_epoch * int(cfg["train"]["epochs"]))
        warm = int(o["warmup_steps"])
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / max(1, warm)) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
        self.writer = None
        if cfg["log"]["tensorboard"]:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.out / "tb"))
            except ImportError:  # pragma: no cover
                self.log("tensorboard not installed: logging to metrics.jsonl only")

    # ---------------------------------------------------------------- setup helpers
    def _backbone_record(self) -> None:
        b = dict(self.cfg["backbone"])
        if b.get("weights"):
            path = Path(b["weights"]).resolve()
            self.backbone_info = {**b, "weights": str(path), "weights_relative": None, "sha256": _sha256_file(path)}
        else:
            from eo_dinov3.checkpoints import save_backbone

            path = self.out / "backbone.pth"
            if not path.is_file():
                save_backbone(self.model.backbone, path, format="eo")
            self.backbone_info = {**b, "weights": str(path.resolve()), "weights_relative": path.name,
                                  "sha256": _sha256_file(path), "random_init": True}
            # the saved file is what the checkpoints reference: check it equals the live backbone
            ref = build_backbone({**b, "weights": str(path)}).state_dict()
            live = self.model.backbone.state_dict()
            if any(not torch.equal(ref[k].cpu(), v.cpu()) for k, v in live.items()):
                raise CheckpointError(f"{path} does not match the backbone built from backbone.init_seed (delete it)")

    def _steps_per_epoch(self) -> int:
        t = self.cfg["train"]
        n = int(self.cfg["data"]["train_chips"])
        if t["cache_features"] != "none":
            n *= max(1, int(t["cache_views"]))
        elif t.get("steps_per_epoch"):
            return int(t["steps_per_epoch"])
        return max(1, math.ceil(n / int(t["batch_size"])))

    # ---------------------------------------------------------------- backbone features
    @torch.no_grad()
    def encode(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Frozen tapped features of a normalised batch (chip sizes are multiples of the pad unit: no padding)."""
        x = x.to(self.device)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else _null()
        with ctx:
            feats = self.model.encode(x)
        return [(p.float(), c.float()) for p, c in feats]

    def _cache_path(self, kind: str) -> Path:
        key = json.dumps([self.cfg["data"], self.backbone_info.get("sha256"), self.cfg["backbone"],
                          self.cfg["head"]["taps"], self.cfg["head"]["use_backbone_norm"],
                          self.cfg["train"]["cache_views"], self.cfg["seed"]], sort_keys=True, default=str)
        return self.out / "feature_cache" / f"{kind}_{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"

    def _build_cache(self, kind: str, chips_fn) -> list:
        mode = self.cfg["train"]["cache_features"]
        if kind in self.cache:
            return self.cache[kind]
        path = self._cache_path(kind)
        if mode == "disk" and path.is_file():
            self.cache[kind] = torch.load(path, map_location="cpu", weights_only=True)
            return self.cache[kind]
        from eo_dinov3.canopy.datasets import chips_to_tensors

        t0 = time.perf_counter()
        items = []
        bs = int(self.cfg["train"]["batch_size"])
        chips = chips_fn()
        for i in range(0, len(chips), bs):
            group = chips[i : i + bs]
            x, y = chips_to_tensors([c for c, _ in group], self.cfg["data"]["normalization"])
            feats = self.encode(x)
            for j, (c, meta) in enumerate(group):
                items.append({"feats": [(p[j].half().cpu(), cl[j].half().cpu()) for p, cl in feats],
                              "target": y[j], "meta": meta})
        self.log(f"cached {kind} features of {len(items)} chip views in {time.perf_counter() - t0:.1f} s")
        if mode == "disk":
            atomic_save(items, path)
        self.cache[kind] = items
        return items

    def _train_chip_list(self) -> list:
        from eo_dinov3.canopy.datasets import ChipSampler

        d, t = self.cfg["data"], self.cfg["train"]
        rng = np.random.default_rng(int(self.cfg["seed"]) + 1)
        samplers, p = self._samplers(rng, augment=False)
        out = []
        for _ in range(int(d["train_chips"])):
            s = samplers[int(rng.choice(len(samplers), p=p))]
            base = s.sample()
            for v in range(max(1, int(t["cache_views"]))):
                k, flip = (0, False) if (v == 0 or not d["augment"]) else (int(rng.integers(4)), bool(rng.integers(2)))
                out.append((s.crop(base.row, base.col, k, flip), None))
        del ChipSampler
        return out

    def _samplers(self, rng, augment: bool) -> tuple[list, np.ndarray]:
        """One chip sampler per training region and the probability of drawing from each (∝ its area)."""
        from eo_dinov3.canopy.datasets import ChipSampler

        regions = [(s, r) for s in self.splits for r in s.train]
        samplers = [ChipSampler(s.pair, r, self.chip, min_valid=self.cfg["data"]["min_valid"], augment=augment,
                                seed=int(rng.integers(1 << 31))) for s, r in regions]
        area = np.array([r.height * r.width for _, r in regions], np.float64)
        return samplers, area / area.sum()

    def _val_chip_list(self) -> list:
        from eo_dinov3.canopy.datasets import ChipSampler, grid_chips

        out = []
        for si, s in enumerate(self.splits):
            for region in s.val:
                sampler = ChipSampler(s.pair, region, self.chip, augment=False)
                for r, c in grid_chips(region, self.chip):
                    out.append((sampler.crop(r, c), (si, r, c)))
        return out

    # ---------------------------------------------------------------- one step
    def head_forward(self, feats: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """Logits ``[B, K, c, c]`` and heights ``[B, 1, c, c]`` (metres) of the trainable head."""
        logits = self.model.head(feats)
        return logits, self.model.features_to_height(logits.float())

    def loss(self, logits: Tensor, pred: Tensor, target: Tensor) -> tuple[Tensor, dict[str, float]]:
        valid = torch.isfinite(target)
        y = target.nan_to_num(0.0)
        parts: dict[str, Tensor] = {}
        if self.losses["l1"]:
            parts["l1"] = self.losses["l1"] * masked_l1(pred, y, valid)
        if self.losses["sigloss"]:
            parts["sigloss"] = self.losses["sigloss"] * self.sigloss(pred, y, valid)
        if self.losses["bin_ce"]:
            parts["bin_ce"] = self.losses["bin_ce"] * bin_cross_entropy(
                logits.float(), y, valid, self.bins_m, self.cfg["head"]["norm_strategy"])
        if not parts:
            raise ConfigError("all loss weights are 0: set loss.l1, loss.sigloss or loss.bin_ce")
        total = sum(parts.values())
        return total, {k: float(v.detach()) for k, v in parts.items()}

    def _train_batches(self):
        t, bs = self.cfg["train"], int(self.cfg["train"]["batch_size"])
        if t["cache_features"] != "none":
            items = self._build_cache("train", self._train_chip_list)
            order = self.rng.permutation(len(items))
            for i in range(0, len(order), bs):
                group = [items[j] for j in order[i : i + bs]]
                feats = [(torch.stack([g["feats"][lv][0] for g in group]).float().to(self.device),
                          torch.stack([g["feats"][lv][1] for g in group]).float().to(self.device)) for lv in range(4)]
                yield feats, torch.stack([g["target"] for g in group]).to(self.device)
        else:
            from eo_dinov3.canopy.datasets import chips_to_tensors

            samplers, p = self._samplers(self.rng, augment=bool(self.cfg["data"]["augment"]))
            for _ in range(self.steps_per_epoch):
                chips = [samplers[int(self.rng.choice(len(samplers), p=p))].sample() for _ in range(bs)]
                x, y = chips_to_tensors(chips, self.cfg["data"]["normalization"])
                yield self.encode(x), y.to(self.device)

    def train_epoch(self) -> float:
        self.model.head.train()
        total, n = 0.0, 0
        clip = float(self.cfg["optim"]["grad_clip"] or 0)
        for feats, y in self._train_batches():
            ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else _null()
            with ctx:
                logits, pred = self.head_forward(feats)
            loss, parts = self.loss(logits, pred, y)
            if not torch.isfinite(loss):
                raise DataError(f"non-finite loss at step {self.step} ({parts}); lower optim.lr")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, clip)
            self.opt.step()
            self.sched.step()
            self.step += 1
            total += float(loss.detach())
            n += 1
            if self.writer:
                self.writer.add_scalar("train/loss", float(loss.detach()), self.step)
                for k, v in parts.items():
                    self.writer.add_scalar(f"train/{k}", v, self.step)
                self.writer.add_scalar("train/lr", self.sched.get_last_lr()[0], self.step)
        return total / max(1, n)

    # ---------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        """Metrics of the head and of the constant baselines on the validation regions."""
        from eo_dinov3.canopy.datasets import chips_to_tensors
        from eo_dinov3.canopy.metrics import MetricAccumulator

        self.model.head.eval()
        canvases = [np.full((s.val_box.height, s.val_box.width), np.nan, np.float32) for s in self.splits]
        bs = int(self.cfg["train"]["batch_size"])
        if self.cfg["train"]["cache_features"] != "none":
            items = self._build_cache("val", self._val_chip_list)
            batches = []
            for i in range(0, len(items), bs):
                group = items[i : i + bs]
                feats = [(torch.stack([g["feats"][lv][0] for g in group]).float().to(self.device),
                          torch.stack([g["feats"][lv][1] for g in group]).float().to(self.device)) for lv in range(4)]
                batches.append((feats, [g["meta"] for g in group]))
        else:
            chips = self._val_chip_list()
            batches = []
            for i in range(0, len(chips), bs):
                group = chips[i : i + bs]
                x, _ = chips_to_tensors([c for c, _ in group], self.cfg["data"]["normalization"])
                batches.append((self.encode(x), [m for _, m in group]))
        for feats, metas in batches:
            _, pred = self.head_forward(feats)
            pred = pred.float().cpu().numpy()[:, 0]
            for p, (si, r, c) in zip(pred, metas):
                v = self.splits[si].val_box
                canvases[si][r - v.row0 : r - v.row0 + self.chip, c - v.col0 : c - v.col0 + self.chip] = p
        acc = MetricAccumulator(shape=None)
        base_mean, base_median = MetricAccumulator(), MetricAccumulator()
        for s, canvas in zip(self.splits, canvases):
            b = s.val_box
            truth = np.where(s.val_mask, s.pair.target[b.row0 : b.row1, b.col0 : b.col1], np.nan).astype(np.float32)
            part = MetricAccumulator(shape=truth.shape)
            part.update(canvas, truth)
            acc.merge(part)
            acc.shape = truth.shape if len(self.splits) == 1 else None
            base_mean.update(np.full_like(truth, self.train_mean), truth)
            base_median.update(np.full_like(truth, self.train_median), truth)
        m = acc.compute()
        keys = ("mae", "rmse", "bias", "r2", "block_r2", "nmae", "iou_2m", "iou_5m", "n_pixels", "n_blocks")
        out = {k: m[k] for k in keys if k in m}
        bm, bmed = base_mean.compute(), base_median.compute()
        out.update(baseline_mean_mae=bm["mae"], baseline_mean_rmse=bm["rmse"], baseline_median_mae=bmed["mae"],
                   train_mean_m=self.train_mean)
        self.last_canvases = canvases
        return out

    # ---------------------------------------------------------------- checkpoints
    def state(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "format": HEAD_CKPT_FORMAT,
            "version": HEAD_CKPT_VERSION,
            "epoch": self.epoch,
            "step": self.step,
            "head": {k: v.detach().cpu() for k, v in self.model.head.state_dict().items()},
            "head_config": self.model.head.config.to_dict(),
            "backbone": self.backbone_info,
            "normalization": self.model.normalization.name,
            "gsd_m": 0.6,
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "sigloss_counter": self.sigloss.warm_up_counter,
            "best_mae": self.best_mae,
            "rng": {"torch": torch.get_rng_state(), "numpy": json.dumps(self.rng.bit_generator.state)},
            "config_json": json.dumps(self.cfg, default=str),
            "val_metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        }

    def maybe_resume(self) -> bool:
        path = self.out / "last.pt"
        if not (self.cfg["resume"] and path.is_file()):
            return False
        ck = _read_head_ckpt(path)
        if ck is None:
            raise CheckpointError(f"{path}: not a canopy-head checkpoint; delete it or set resume=false")
        if ck["head_config"] != self.model.head.config.to_dict() or ck["backbone"]["sha256"] != self.backbone_info["sha256"]:
            raise CheckpointError(f"{path} was written for another head/backbone; use a new output_dir or resume=false")
        self.model.head.load_state_dict(ck["head"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.sigloss.warm_up_counter = int(ck["sigloss_counter"])
        self.epoch, self.step, self.best_mae = int(ck["epoch"]), int(ck["step"]), float(ck["best_mae"])
        torch.set_rng_state(ck["rng"]["torch"])
        self.rng.bit_generator.state = json.loads(ck["rng"]["numpy"])
        self.log(f"resumed from {path} after epoch {self.epoch} (step {self.step})")
        return True

    # ---------------------------------------------------------------- loop
    def run(self) -> dict[str, Any]:
        from omegaconf import OmegaConf

        (self.out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(self.cfg)))
        self.maybe_resume()
        epochs = int(self.cfg["train"]["epochs"])
        metrics: dict[str, Any] = {}
        jsonl = self.out / "metrics.jsonl"
        while self.epoch < epochs:
            t0 = time.perf_counter()
            train_loss = self.train_epoch()
            self.epoch += 1
            metrics = self.validate()
            rec = {"epoch": self.epoch, "step": self.step, "train_loss": train_loss,
                   "epoch_s": time.perf_counter() - t0, **{f"val_{k}": v for k, v in metrics.items()}}
            with open(jsonl, "a") as f:
                f.write(json.dumps(rec, default=float) + "\n")
            if self.writer:
                for k, v in metrics.items():
                    if isinstance(v, (int, float)) and math.isfinite(v):
                        self.writer.add_scalar(f"val/{k}", v, self.epoch)
                self.writer.flush()
            self.log(f"epoch {self.epoch}/{epochs} loss {train_loss:.4f} | val MAE {metrics['mae']:.3f} m RMSE "
                     f"{metrics['rmse']:.3f} R² {metrics['r2']:.3f} block-R² {metrics['block_r2']:.3f} | constant-mean "
                     f"MAE {metrics['baseline_mean_mae']:.3f} m | {rec['epoch_s']:.1f} s")
            if metrics["mae"] < self.best_mae:
                self.best_mae = metrics["mae"]
                atomic_save(self.state(metrics), self.out / "best.pt")
            atomic_save(self.state(metrics), self.out / "last.pt")
        if self.writer:
            self.writer.close()
        return metrics


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def train(cfg: dict[str, Any], log=print) -> dict[str, Any]:
    """Train a head with a resolved config (:func:`load_config`); returns the last validation metrics."""
    return HeadTrainer(cfg, log=log).run()


# --------------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (e.g. configs/canopy/autzen_demo.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=5 backbone.weights=PATH")


def _cli(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    m = train(cfg)
    out = Path(cfg["output_dir"])
    print(f"best checkpoint: {out / 'best.pt'} (use: eo-dinov3 chm predict IMAGE --model {out / 'best.pt'} --out chm.tif)")
    print(f"final val MAE {m['mae']:.3f} m vs constant-mean baseline {m['baseline_mean_mae']:.3f} m "
          f"(constant-median {m['baseline_median_mae']:.3f} m)")
    return 0


def register_train_head(chm_subparsers: Any) -> None:
    """Add ``train-head`` to the ``eo-dinov3 chm`` sub-commands (call from ``eo_dinov3/canopy/cli.py::register``)."""
    p = chm_subparsers.add_parser("train-head", help="train a DPT canopy-height head on a frozen backbone")
    add_arguments(p)
    p.set_defaults(func=_cli)


def main(argv: Sequence[str] | None = None) -> int:
    from eo_dinov3.errors import EODinoError

    p = argparse.ArgumentParser(description="Train a canopy-height DPT head on frozen DINOv3 features.")
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return _cli(args)
    except EODinoError as e:
        print(f"error: {e}")
        return 2


__all__ = [
    "DEFAULTS",
    "SigLoss",
    "masked_l1",
    "bin_log_probs",
    "bin_cross_entropy",
    "default_taps",
    "load_config",
    "build_model",
    "build_backbone",
    "build_autzen_pair",
    "HeadTrainer",
    "train",
    "is_head_checkpoint",
    "load_head_checkpoint",
    "register_train_head",
    "main",
]
