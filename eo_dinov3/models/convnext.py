"""The DINOv3 ConvNeXt backbones (Tiny/Small/Base/Large) with the official state-dict layout and outputs.

Architecture (official ``dinov3/models/convnext.py``, itself ConvNeXt of Liu et al. 2022) for an input
``[B, C_in, H, W]`` (pixels):

* ``downsample_layers.0`` (stem): ``Conv2d(C_in, d0, 4, stride 4)`` → channels-first LayerNorm (eps 1e-6);
  ``downsample_layers.{1,2,3}``: channels-first LayerNorm → ``Conv2d(d_{i-1}, d_i, 2, stride 2)``;
* ``stages.{i}.{j}`` (block): depthwise ``Conv2d(d, d, 7, pad 3)`` → LayerNorm (channels-last, eps 1e-6) →
  ``Linear(d, 4d)`` → GELU → ``Linear(4d, d)`` → layer scale ``gamma`` (init 1e-6) → stochastic depth → residual;
* ``norm``: final ``nn.LayerNorm(d3, eps 1e-6)`` applied to ``[mean-pooled token, patch tokens]``.
  ``norms`` = ``[Identity, Identity, Identity, norm]`` (per-stage norms for :meth:`get_intermediate_layers`); the
  last entry *is* ``norm``, so the state dict holds the same tensors under ``norm.*`` and ``norms.3.*`` exactly
  as the official files do.

The final feature map has stride 32: ``x_norm_patchtokens`` ``[B, (H/32)(W/32), d3]``. ``x_norm_clstoken`` is the
normed global average pool ``[B, d3]``; there are no storage tokens (``x_storage_tokens`` ``[B, 0, d3]``).
``patch_size`` (16 in the distillation configs) only makes :meth:`get_intermediate_layers` resize the maps
(bilinear, antialiased) to the grid of a ViT with that patch size ``(H/16, W/16)``. Setting
``patch_tokens_on_patch_grid = True`` makes :meth:`forward_features` do the same resize (before the final norm) so
that ``x_norm_patchtokens`` lines up token for token with a patch-16 ViT teacher — used by multi-student
distillation for the iBOT loss (off by default: official outputs).

Masks are accepted and ignored (as in the official code): a ConvNeXt has no mask token, and distillation never
masks the student.

Parameter counts (trainable, unique): Tiny 27,820,128; Small 49,454,688; Base 87,566,464; Large 196,230,336
(the state dicts hold ``2·d3`` more elements because of the ``norms.3`` alias).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eo_dinov3.errors import CheckpointError

#: official sizes (``convnext_sizes`` in ``dinov3/models/convnext.py``)
CONVNEXT_SIZES: dict[str, dict[str, list[int]]] = {
    "tiny": dict(depths=[3, 3, 9, 3], dims=[96, 192, 384, 768]),
    "small": dict(depths=[3, 3, 27, 3], dims=[96, 192, 384, 768]),
    "base": dict(depths=[3, 3, 27, 3], dims=[128, 256, 512, 1024]),
    "large": dict(depths=[3, 3, 27, 3], dims=[192, 384, 768, 1536]),
}

#: trainable parameter counts of the official builders (unique parameters, ``norms.3`` counted once)
CONVNEXT_PARAM_COUNTS = {"tiny": 27_820_128, "small": 49_454_688, "base": 87_566_464, "large": 196_230_336}

#: official LVD-1689M weight file hashes (``dinov3_convnext_<size>_pretrain_lvd1689m-<hash>.pth``)
CONVNEXT_HASHES = {"tiny": "21b726bb", "small": "296db49d", "base": "801f2ba9", "large": "61fa432d"}

EO_CONVNEXT_FORMAT = "eo_dinov3.convnext"
_PREFIXES = ("module.", "_orig_mod.", "teacher.", "model_ema.", "student.", "backbone.")


@dataclass
class ConvNeXtConfig:
    """Constructor arguments of :class:`ConvNeXt` (official names) plus EO metadata (bands, normalisation preset,
    GSD in metres/pixel; not architectural)."""

    in_chans: int = 3
    depths: list[int] = field(default_factory=lambda: [3, 3, 9, 3])
    dims: list[int] = field(default_factory=lambda: [96, 192, 384, 768])
    drop_path_rate: float = 0.0
    layer_scale_init_value: float = 1e-6
    patch_size: int | None = None
    bands: list[str] | None = None
    normalization: str | None = None
    gsd_m: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ConvNeXtConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ConvNeXt config keys: {sorted(unknown)}")
        return cls(**d)


def convnext_config(size: str, **overrides: Any) -> ConvNeXtConfig:
    """Config of an official size (``tiny``/``small``/``base``/``large``, or ``convnext_<size>``)."""
    size = size.removeprefix("dinov3_").removeprefix("convnext_")
    if size not in CONVNEXT_SIZES:
        raise ValueError(f"unknown ConvNeXt size {size!r}; choose from {sorted(CONVNEXT_SIZES)}")
    return ConvNeXtConfig(**{**CONVNEXT_SIZES[size], **overrides})


def _drop_path(x: Tensor, drop_prob: float, training: bool) -> Tensor:
    """Per-sample stochastic depth: zero the residual branch of a sample with probability ``drop_prob`` and scale
    the kept ones by ``1/(1-drop_prob)``."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)).floor_()
    return x.div(keep) * mask


class ConvNeXtLayerNorm(nn.Module):
    """LayerNorm over channels for ``channels_last`` ``[..., C]`` or ``channels_first`` ``[B, C, H, W]`` inputs
    (keys ``weight``, ``bias``). The channels-first form uses the official explicit formula
    ``(x − μ)/sqrt(σ² + eps)`` (biased variance) so results match the official module bit for bit."""

    def __init__(self, dim: int, eps: float = 1e-6, data_format: str = "channels_last", device=None):
        super().__init__()
        if data_format not in ("channels_last", "channels_first"):
            raise ValueError(f"data_format must be channels_last or channels_first, got {data_format!r}")
        self.weight = nn.Parameter(torch.ones(dim, device=device))
        self.bias = nn.Parameter(torch.zeros(dim, device=device))
        self.eps = eps
        self.data_format = data_format
        self.normalized_shape = (dim,)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    """``x + drop_path(γ ⊙ Linear(GELU(Linear(LN(dwconv7x7(x))))))`` on ``[B, C, H, W]`` (the linears act on the
    channels-last view). Keys: ``dwconv``, ``norm``, ``pwconv1``, ``pwconv2``, ``gamma``."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6, device=None):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, device=device)
        self.norm = ConvNeXtLayerNorm(dim, eps=1e-6, device=device)
        self.pwconv1 = nn.Linear(dim, 4 * dim, device=device)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim, device=device)
        self.layer_scale_init_value = layer_scale_init_value
        self.gamma = (
            nn.Parameter(torch.full((dim,), float(layer_scale_init_value), device=device))
            if layer_scale_init_value > 0
            else None
        )
        self.drop_path = float(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        if self.gamma is not None:
            y = self.gamma * y
        return x + _drop_path(y.permute(0, 3, 1, 2), self.drop_path, self.training)


class ConvNeXt(nn.Module):
    """DINOv3 ConvNeXt backbone; construct with official keyword arguments or ``config=ConvNeXtConfig(...)``.

    Drop-in for :class:`~eo_dinov3.models.vision_transformer.DinoVisionTransformer` where the SSL code needs it:
    ``forward(x, is_training=True)`` / :meth:`forward_features` (a tensor or a list of crop batches),
    :meth:`get_intermediate_layers`, attributes ``embed_dim``, ``n_blocks`` (4 = stages), ``n_storage_tokens`` (0),
    ``patch_size``."""

    def __init__(self, config: ConvNeXtConfig | None = None, *, device: torch.device | str | None = None,
                 **kwargs: Any):
        super().__init__()
        if config is None:
            config = ConvNeXtConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = c = config
        depths, dims = list(c.depths), list(c.dims)
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"ConvNeXt needs 4 stages, got depths={depths} dims={dims}")
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(c.in_chans, dims[0], kernel_size=4, stride=4, device=device),
                           ConvNeXtLayerNorm(dims[0], data_format="channels_first", device=device))]
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(ConvNeXtLayerNorm(dims[i], data_format="channels_first", device=device),
                              nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2, device=device))
            )
        rates = torch.linspace(0, c.drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        cur = 0
        for i in range(4):
            self.stages.append(nn.Sequential(*[
                ConvNeXtBlock(dims[i], rates[cur + j], c.layer_scale_init_value, device=device)
                for j in range(depths[i])
            ]))
            cur += depths[i]
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6, device=device)
        self.head = nn.Identity()
        self.embed_dim = self.num_features = dims[-1]
        self.embed_dims = dims
        self.n_blocks = len(self.downsample_layers)
        self.chunked_blocks = False
        self.n_storage_tokens = 0
        self.norms = nn.ModuleList([nn.Identity(), nn.Identity(), nn.Identity(), self.norm])
        self.patch_size = c.patch_size
        self.input_pad_size = 4
        self.patch_tokens_on_patch_grid = False
        if str(device) != "meta":
            self.init_weights()

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """Official init: trunc-normal(0.02) conv/linear weights, zero biases, LayerNorms (1, 0), ``gamma`` at
        ``layer_scale_init_value``."""
        for m in self.modules():
            if isinstance(m, (nn.LayerNorm, ConvNeXtLayerNorm)):
                m.reset_parameters()
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, ConvNeXtBlock) and m.gamma is not None:
                nn.init.constant_(m.gamma, m.layer_scale_init_value)

    # ------------------------------------------------------------------ forward
    def _stem_to_last(self, x: Tensor) -> Tensor:
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return x

    def _resize_to_patch_grid(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        p = self.patch_size
        return F.interpolate(x, size=(hw[0] // p, hw[1] // p), mode="bilinear", antialias=True)

    def forward_features_list(self, x_list: Sequence[Tensor], masks_list: Sequence[Tensor | None] | None
                              ) -> list[dict[str, Tensor | None]]:
        """Each crop batch ``[B, C, H, W]`` → outputs dict (module doc); masks are passed through unused."""
        if masks_list is None:
            masks_list = [None] * len(x_list)
        out = []
        for x, masks in zip(x_list, masks_list):
            hw = tuple(x.shape[-2:])
            x = self._stem_to_last(x)
            pooled = x.mean([-2, -1])  # [B, C]
            if self.patch_tokens_on_patch_grid and self.patch_size is not None:
                x = self._resize_to_patch_grid(x, hw)
            x = torch.flatten(x, 2).transpose(1, 2)  # [B, h·w, C]
            x_norm = self.norm(torch.cat([pooled.unsqueeze(1), x], dim=1))
            out.append({
                "x_norm_clstoken": x_norm[:, 0],
                "x_storage_tokens": x_norm[:, 1 : self.n_storage_tokens + 1],
                "x_norm_patchtokens": x_norm[:, self.n_storage_tokens + 1 :],
                "x_prenorm": x,
                "masks": masks,
            })
        return out

    def forward_features(self, x: Tensor | Sequence[Tensor], masks: Any = None) -> dict | list[dict]:
        """A tensor → one outputs dict; a list of crop batches → a list of dicts."""
        if isinstance(x, Tensor):
            return self.forward_features_list([x], [masks])[0]
        return self.forward_features_list(list(x), masks)

    def forward(self, *args: Any, is_training: bool = False, **kwargs: Any):
        """``is_training=True`` → :meth:`forward_features` output; else ``head(x_norm_clstoken)`` ``[B, C]``."""
        ret = self.forward_features(*args, **kwargs)
        if is_training:
            return ret
        return self.head(ret["x_norm_clstoken"])

    def _intermediate(self, x: Tensor, n: int | Sequence[int]) -> list[tuple[Tensor, Tensor]]:
        hw = tuple(x.shape[-2:])
        total = len(self.downsample_layers)
        take = list(range(total - n, total)) if isinstance(n, int) else [int(i) for i in n]
        bad = [i for i in take if not 0 <= i < total]
        if bad:
            raise ValueError(f"stage indices {bad} out of range for a {total}-stage ConvNeXt")
        out = []
        for i in range(total):
            x = self.stages[i](self.downsample_layers[i](x))
            if i in take:
                patches = self._resize_to_patch_grid(x, hw) if self.patch_size is not None else x
                out.append((x.mean([-2, -1]), patches))
        return out

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        return_extra_tokens: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of the last ``n`` stages (int) or of the 0-based stages in ``n``.

        Per stage: patches ``[B, h·w, C_i]`` (``[B, C_i, h, w]`` with ``reshape``; ``h, w = H/16, W/16`` when
        ``patch_size=16``, else the stage's own stride), optionally the pooled "class token" ``[B, C_i]`` and empty
        extra tokens ``[B, 0, C_i]`` (API parity with the ViT). ``norm`` applies ``norms[i]`` (identity except the
        last stage: the final LayerNorm), as the official code does."""
        outputs = self._intermediate(x, n)
        idx = list(range(len(self.norms) - n, len(self.norms))) if isinstance(n, int) else [int(i) for i in n]
        patches_out, cls_out = [], []
        for (cls_tok, patches), i in zip(outputs, idx):
            nchw = patches.shape
            tokens = patches.flatten(-2, -1).transpose(1, 2)  # [B, h·w, C]
            if norm:
                cls_tok, tokens = self.norms[i](cls_tok), self.norms[i](tokens)
            if reshape:
                tokens = tokens.transpose(1, 2).reshape(nchw).contiguous()
            patches_out.append(tokens)
            cls_out.append(cls_tok)
        extra = [c.new_zeros(c.shape[0], 0, c.shape[-1]) for c in cls_out]
        if return_class_token and return_extra_tokens:
            return tuple(zip(patches_out, cls_out, extra))
        if return_class_token:
            return tuple(zip(patches_out, cls_out))
        if return_extra_tokens:
            return tuple(zip(patches_out, extra))
        return tuple(patches_out)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------------------


def _strip(sd: dict[str, Any]) -> dict[str, Tensor]:
    """Drop wrapper prefixes, heads and non-tensors from a (possibly training-export) state dict."""
    out = {}
    for k, v in sd.items():
        if not isinstance(v, Tensor):
            continue
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        if k.startswith(("dino_head.", "ibot_head.", "dino_loss.", "ibot_patch_loss.")):
            continue
        out[k] = v
    return out


def infer_convnext_config(sd: dict[str, Tensor]) -> ConvNeXtConfig:
    """Architecture from the official keys: ``dims`` from the stem / downsampling convs, ``depths`` from the block
    indices under ``stages.{i}``, layer scale from the presence of ``gamma``."""
    try:
        stem = sd["downsample_layers.0.0.weight"]
        dims = [int(stem.shape[0])] + [int(sd[f"downsample_layers.{i}.1.weight"].shape[0]) for i in (1, 2, 3)]
    except KeyError as e:
        raise CheckpointError(f"not a ConvNeXt state dict: missing key {e.args[0]} (expected the official "
                              "dinov3 ConvNeXt layout: downsample_layers.*, stages.*, norm.*)") from None
    depths = []
    for i in range(4):
        ids = {int(k.split(".")[2]) for k in sd if k.startswith(f"stages.{i}.")}
        depths.append(max(ids) + 1 if ids else 0)
    has_gamma = any(k.endswith(".gamma") for k in sd)
    return ConvNeXtConfig(in_chans=int(stem.shape[1]), depths=depths, dims=dims,
                          layer_scale_init_value=1e-6 if has_gamma else 0.0)


def convnext_size_name(cfg: ConvNeXtConfig) -> str:
    """``tiny``/``small``/``base``/``large`` when ``cfg`` is an official size, else ``custom``."""
    for name, s in CONVNEXT_SIZES.items():
        if list(cfg.depths) == s["depths"] and list(cfg.dims) == s["dims"]:
            return name
    return "custom"


def _read(path: Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (any unreadable/unsafe file)
        raise CheckpointError(f"cannot read {path} as a weights-only torch checkpoint: "
                              f"{str(e).splitlines()[0][:200]}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    if obj.get("format") == EO_CONVNEXT_FORMAT:
        return obj["state_dict"], obj.get("config")
    for key in ("teacher", "model_ema", "model", "state_dict"):
        if key in obj and isinstance(obj[key], dict):
            return obj[key], None
    return obj, None


def _resolve(weights: str | os.PathLike, size: str | None) -> Path:
    w = str(weights)
    if w.upper() in ("LVD1689M", "SAT493M"):
        if size is None:
            raise CheckpointError(f"weights={w} needs the ConvNeXt size to find the official file name")
        if w.upper() == "SAT493M":
            raise CheckpointError("Meta released no SAT-493M ConvNeXt weights (only LVD-1689M)")
        name = f"dinov3_convnext_{size}_pretrain_lvd1689m-{CONVNEXT_HASHES[size]}.pth"
        dirs = [os.environ.get("DINOV3_WEIGHTS_DIR"), Path(torch.hub.get_dir()) / "checkpoints"]
        for d in dirs:
            if d and (Path(d) / name).is_file():
                return Path(d) / name
        raise CheckpointError(f"{name} not found in $DINOV3_WEIGHTS_DIR or the torch hub cache; download it from "
                              "Meta and pass weights=<local path> (eo_dinov3 never downloads)")
    p = Path(w).expanduser()
    if not p.is_file():
        raise CheckpointError(f"ConvNeXt weights file not found: {p}")
    return p


def load_convnext(
    weights: str | os.PathLike,
    *,
    size: str | None = None,
    device: torch.device | str | None = None,
    **overrides: Any,
) -> ConvNeXt:
    """Build the ConvNeXt stored in the LOCAL file ``weights`` and load it strictly.

    Accepts Meta's hub ``.pth`` (plain state dict), a training export (``{"teacher": {"backbone.*", heads}}``,
    prefixes stripped, heads ignored), or our ``save_convnext(format="eo")`` file (config recorded). The
    architecture comes from the recorded config or the tensor shapes; ``size`` (``tiny``…) is then checked against
    it. A file without the ``norms.3.*`` alias is accepted (it is the same tensor as ``norm.*``).
    ``overrides``: :class:`ConvNeXtConfig` fields (``drop_path_rate``, ``patch_size`` …)."""
    if size is not None:
        size = size.removeprefix("dinov3_").removeprefix("convnext_")
        if size not in CONVNEXT_SIZES:
            raise CheckpointError(f"unknown ConvNeXt size {size!r}; choose from {sorted(CONVNEXT_SIZES)}")
    path = _resolve(weights, size)
    raw, recorded = _read(path)
    sd = _strip(raw)
    cfg = ConvNeXtConfig.from_dict(recorded) if recorded else infer_convnext_config(sd)
    cfg = dataclasses.replace(cfg, **overrides)
    found = convnext_size_name(cfg)
    if size is not None and found != size:
        raise CheckpointError(f"{path} holds a ConvNeXt with depths={list(cfg.depths)} dims={list(cfg.dims)} "
                              f"({found}), not convnext_{size}")
    if "norm.weight" in sd and "norms.3.weight" not in sd:
        sd["norms.3.weight"], sd["norms.3.bias"] = sd["norm.weight"], sd["norm.bias"]
    model = ConvNeXt(cfg, device="meta")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    bad_shapes = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or bad_shapes:
        raise CheckpointError(
            f"{path} does not fit a ConvNeXt with depths={list(cfg.depths)} dims={list(cfg.dims)}: "
            f"missing {missing[:4]}{'…' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
            f"{'…' if len(unexpected) > 4 else ''}, wrong shapes {bad_shapes[:4]}")
    if not torch.equal(sd["norm.weight"], sd["norms.3.weight"]) or not torch.equal(sd["norm.bias"],
                                                                                   sd["norms.3.bias"]):
        raise CheckpointError(f"{path}: norm.* and norms.3.* differ (they are one module in the official model)")
    sd = {k: (v.to(expected[k].dtype) if v.dtype != expected[k].dtype else v) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    model.norms[3] = model.norm  # assign=True replaced the tensors of the two aliases separately
    if device is not None:
        model.to(device)
    return model


def export_convnext_state_dict(model: ConvNeXt) -> dict[str, Tensor]:
    """The official hub state dict (``downsample_layers.*``, ``stages.*``, ``norm.*``, ``norms.3.*``), detached
    CPU contiguous copies."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_convnext(model: ConvNeXt, path: str | os.PathLike, *, format: str = "official") -> Path:
    """Write ``model`` as ``official`` (plain state dict, Meta's hub format) or ``eo`` (``{"format":
    "eo_dinov3.convnext", "version": 1, "config", "state_dict"}``, records bands/normalisation/GSD). Atomic."""
    if format not in ("official", "eo"):
        raise ValueError(f"unknown format {format!r}; choose official or eo")
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = export_convnext_state_dict(model)
    payload: Any = sd if format == "official" else {
        "format": EO_CONVNEXT_FORMAT, "version": 1, "config": model.config.to_dict(), "state_dict": sd}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path
