"""DPT dense-prediction head for DINOv3 backbones (official ``dinov3/eval/depth`` structure and state-dict keys).

The head turns four tapped ViT layers into a full-resolution map (Ranftl et al., "Vision Transformers for Dense
Prediction"). For a ``[B, 3, H, W]`` input with an even ``H/16 × W/16`` patch grid (``h × w``):

1. **Reassemble** (:class:`ReassembleBlocks`, keys ``reassemble_blocks.*``): per level ``i`` the patch map
   ``[B, D_i, h, w]`` and its CLS token ``[B, D_i]`` go through the readout (``project``: ``GELU(Linear(2D→D))``
   on ``[patch; CLS]``; ``add``: patch + CLS; ``ignore``), optional BatchNorm, a 1×1 conv to
   ``post_process_channels[i]`` and a resample ×4 (ConvTranspose k4 s4), ×2 (ConvTranspose k2 s2), ×1, ×½ (3×3
   conv, stride 2) → ``[B, C_i, 4h, 4w]``, ``[B, C_i, 2h, 2w]``, ``[B, C_i, h, w]``, ``[B, C_i, h/2, w/2]``.
2. 3×3 conv (no bias) of every level to ``channels`` (keys ``convs.{i}.conv``).
3. **Fusion** (:class:`FeatureFusionBlock`, keys ``fusion_blocks.{i}``) from coarse to fine: add the residual
   unit of the skip level (block 0 has none), residual unit, bilinear ×2 (``align_corners=True``), 1×1 conv →
   ``[B, channels, H/2, W/2]`` after the 4th block.
4. Optional 3×3 conv + ReLU (``projection_after_fusion``, key ``project.conv``).
5. :class:`UpConvHead` (keys ``conv_depth.head.{0,2,4}``): 3×3 conv → ``channels/2``, bilinear ×2, 3×3 conv →
   ``n_hidden_channels``, ReLU, 1×1 conv → ``n_output_channels`` logits ``[B, K, H, W]``.

With an **odd** patch grid the ×½ branch rounds up and the fusion path resizes skips, so the output is not the
input size (official behaviour, kept for parity: e.g. a 5×6 grid gives 96×96 for an 80×96 input); pad inputs to
an even grid (:class:`eo_dinov3.canopy.model.CanopyHeightModel` does).

:class:`FeaturesToDepth` turns logits into values (metres for canopy height): ``K == 1`` regression
``ReLU(x) + min``; ``K > 1`` a soft-argmax over bins (``linear``/``log``/``chmv2_mixlog`` bin centres, weights
``linear``/``softmax``/``sigmoid``/``chmv2_mixlog``). CHMv2 mixlog: bins on ``[min, max/8]``, output ×8
(:func:`create_chmv2_mixlog_bins`, :func:`chmv2_mixlog_to_height`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

READOUT_TYPES = ("ignore", "add", "project")
BINS_STRATEGIES = ("linear", "log", "chmv2_mixlog")
NORM_STRATEGIES = ("linear", "softmax", "sigmoid", "chmv2_mixlog")


@dataclass
class DPTConfig:
    """Architecture of :class:`DPTHead` plus the logits → value transform and the backbone taps it expects.

    ``in_channels``: embed dim of each tapped layer (4 levels). ``backbone_out_layers``: 0-based block indices to
    tap; ``use_backbone_norm``: apply the backbone's final norm to each tapped layer. ``min_depth``/``max_depth``
    are in output units (metres for canopy height).
    """

    in_channels: tuple[int, ...] = (1024, 1024, 1024, 1024)
    channels: int = 256
    post_process_channels: tuple[int, ...] = (128, 256, 512, 1024)
    readout_type: str = "project"
    use_batchnorm: bool = False
    use_bias: bool = False
    projection_after_fusion: bool = True
    n_hidden_channels: int = 32
    n_output_channels: int = 256
    min_depth: float = 0.001
    max_depth: float = 80.0
    bins_strategy: str = "linear"
    norm_strategy: str = "linear"
    backbone_out_layers: tuple[int, ...] = (4, 11, 17, 23)
    use_backbone_norm: bool = True

    def __post_init__(self) -> None:
        self.in_channels = tuple(int(c) for c in self.in_channels)
        self.post_process_channels = tuple(int(c) for c in self.post_process_channels)
        self.backbone_out_layers = tuple(int(i) for i in self.backbone_out_layers)
        if len(self.in_channels) != 4 or len(self.post_process_channels) != 4 or len(self.backbone_out_layers) != 4:
            raise ValueError("the DPT head takes exactly 4 levels (in_channels, post_process_channels, layers)")
        if self.readout_type not in READOUT_TYPES:
            raise ValueError(f"readout_type must be one of {READOUT_TYPES}, got {self.readout_type!r}")
        if self.bins_strategy not in BINS_STRATEGIES:
            raise ValueError(f"bins_strategy must be one of {BINS_STRATEGIES}, got {self.bins_strategy!r}")
        if self.norm_strategy not in NORM_STRATEGIES:
            raise ValueError(f"norm_strategy must be one of {NORM_STRATEGIES}, got {self.norm_strategy!r}")

    @classmethod
    def chmv2(cls, embed_dim: int = 1024, **overrides: Any) -> "DPTConfig":
        """The official CHMv2 head (``dinov3/hub/depthers.py::_get_chmv2_config``) for a ViT of width ``embed_dim``:
        taps [5, 11, 17, 23] with final norm, CLS ``project`` readout, no BatchNorm, RCU bias, no post-fusion
        projection, hidden 128, 256 ``chmv2_mixlog`` bins on 0.001–96 m."""
        base = dict(
            in_channels=(embed_dim,) * 4,
            channels=256,
            post_process_channels=(128, 256, 512, 1024),
            readout_type="project",
            use_batchnorm=False,
            use_bias=True,
            projection_after_fusion=False,
            n_hidden_channels=128,
            n_output_channels=256,
            min_depth=0.001,
            max_depth=96.0,
            bins_strategy="chmv2_mixlog",
            norm_strategy="chmv2_mixlog",
            backbone_out_layers=(5, 11, 17, 23),
            use_backbone_norm=True,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_official(cls, decoder_config: dict[str, Any], embed_dim: int) -> "DPTConfig":
        """From an official ``DecoderConfig`` written as a dict (``head_kwargs`` nested; ``use_cls_token`` selects the
        ``project`` readout as in ``make_head``). Only ``type="dpt"`` is supported."""
        d = dict(decoder_config)
        if d.get("type", "dpt") != "dpt":
            raise ValueError(f"only DPT decoders are supported, got type={d.get('type')!r}")
        hk = dict(d.get("head_kwargs", {}))
        layers = d.get("backbone_out_layers", (4, 11, 17, 23))
        if isinstance(layers, str):
            raise ValueError(f"give backbone_out_layers explicitly (got {layers!r})")
        return cls(
            in_channels=(embed_dim,) * 4,
            channels=hk.get("channels", 256),
            post_process_channels=hk.get("post_process_channels", (128, 256, 512, 1024)),
            readout_type="project" if d.get("use_cls_token", False) else "ignore",
            use_batchnorm=d.get("use_batchnorm", False),
            use_bias=hk.get("use_bias", False),
            projection_after_fusion=hk.get("projection_after_fusion", True),
            n_hidden_channels=hk.get("n_hidden_channels", 32),
            n_output_channels=d.get("n_output_channels", 256),
            min_depth=d.get("min_depth", 0.001),
            max_depth=d.get("max_depth", 80.0),
            bins_strategy=d.get("bins_strategy", "linear"),
            norm_strategy=d.get("norm_strategy", "linear"),
            backbone_out_layers=layers,
            use_backbone_norm=d.get("use_backbone_norm", True),
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DPTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown DPT config keys: {sorted(unknown)}")
        return cls(**d)


# --------------------------------------------------------------------------------------------- building blocks
class ConvUnit(nn.Module):
    """A conv with optional pre- or post-activation ReLU; the conv is the child ``conv`` (official ``ConvModule``
    naming, so keys read ``<name>.conv.weight``). Kaiming-normal (fan_out, ReLU) init as officially."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        padding: int = 0,
        bias: bool = True,
        act: str | None = None,
        device=None,
    ):
        super().__init__()
        if act not in (None, "pre", "post"):
            raise ValueError(f"act must be None, 'pre' or 'post', got {act!r}")
        self.act = act
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=bias, device=device)
        if self.conv.weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.conv.weight, a=0, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.act == "pre":
            x = F.relu(x)
        x = self.conv(x)
        if self.act == "post":
            x = F.relu(x)
        return x


class ReassembleBlocks(nn.Module):
    """Tokens of 4 layers → 4-level pyramid ``[B, C_i, h·4/2^i, w·4/2^i]`` (readout, optional BN, 1×1 conv,
    resample ×4, ×2, ×1, ×½)."""

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: Sequence[int],
        readout_type: str = "project",
        use_batchnorm: bool = False,
        device=None,
    ):
        super().__init__()
        if readout_type not in READOUT_TYPES:
            raise ValueError(f"readout_type must be one of {READOUT_TYPES}, got {readout_type!r}")
        self.readout_type = readout_type
        self.projects = nn.ModuleList(
            ConvUnit(cin, cout, 1, bias=True, device=device) for cin, cout in zip(in_channels, out_channels)
        )
        c = out_channels
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(c[0], c[0], kernel_size=4, stride=4, padding=0, device=device),
                nn.ConvTranspose2d(c[1], c[1], kernel_size=2, stride=2, padding=0, device=device),
                nn.Identity(),
                nn.Conv2d(c[3], c[3], kernel_size=3, stride=2, padding=1, device=device),
            ]
        )
        if readout_type == "project":
            self.readout_projects = nn.ModuleList(
                nn.Sequential(nn.Linear(2 * cin, cin, device=device), nn.GELU()) for cin in in_channels
            )
        # official: SyncBatchNorm (same state-dict keys); plain BatchNorm2d here so that it also runs on 1 CPU
        self.batchnorm_layers = nn.ModuleList(
            nn.BatchNorm2d(cin, device=device) if use_batchnorm else nn.Identity() for cin in in_channels
        )

    def forward(self, inputs: Sequence[tuple[Tensor, Tensor]]) -> list[Tensor]:
        """``inputs``: 4 × (patch map ``[B, D, h, w]``, CLS ``[B, D]``)."""
        out = []
        for i, (x, cls_token) in enumerate(inputs):
            shape = x.shape
            if self.readout_type == "project":
                x = x.flatten(2).transpose(1, 2)  # [B, hw, D]
                x = self.readout_projects[i](torch.cat((x, cls_token.unsqueeze(1).expand_as(x)), dim=-1))
                x = x.transpose(1, 2).reshape(shape)
            elif self.readout_type == "add":
                x = (x.flatten(2) + cls_token.unsqueeze(-1)).reshape(shape)
            x = self.batchnorm_layers[i](x)
            x = self.projects[i](x)
            x = self.resize_layers[i](x)
            out.append(x)
        return out


class PreActResidualConvUnit(nn.Module):
    """``z + conv2(ReLU(conv1(ReLU(z))))`` with 3×3 convs (keys ``conv1.conv``, ``conv2.conv``)."""

    def __init__(self, channels: int, bias: bool = False, device=None):
        super().__init__()
        self.conv1 = ConvUnit(channels, channels, 3, padding=1, bias=bias, act="pre", device=device)
        self.conv2 = ConvUnit(channels, channels, 3, padding=1, bias=bias, act="pre", device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x)) + x


class FeatureFusionBlock(nn.Module):
    """RefineNet-style fusion: ``f + RCU₁(skip)`` (skip bilinearly resized, ``align_corners=False``, if its size
    differs), ``RCU₂``, bilinear ×2 (``align_corners=True``), 1×1 conv. ``with_skip=False`` (the deepest block)
    has no ``res_conv_unit1``."""

    def __init__(self, channels: int, bias: bool = False, with_skip: bool = True, device=None):
        super().__init__()
        self.project = ConvUnit(channels, channels, 1, bias=True, device=device)
        self.res_conv_unit1 = PreActResidualConvUnit(channels, bias, device=device) if with_skip else None
        self.res_conv_unit2 = PreActResidualConvUnit(channels, bias, device=device)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if skip is not None:
            if self.res_conv_unit1 is None:
                raise ValueError("this fusion block has no skip branch")
            if skip.shape != x.shape:
                skip = F.interpolate(skip, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = x + self.res_conv_unit1(skip)
        x = self.res_conv_unit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.project(x)


class UpConvHead(nn.Module):
    """``[B, C, h, w] → [B, K, 2h, 2w]``: 3×3 conv C→C/2, bilinear ×2 (``align_corners=True``), 3×3 conv →
    hidden, ReLU, 1×1 conv → K (keys ``head.0``, ``head.2``, ``head.4``)."""

    def __init__(self, channels: int, n_output_channels: int, n_hidden_channels: int = 32, device=None):
        super().__init__()
        self.n_output_channels = n_output_channels
        self.head = nn.Sequential(
            nn.Conv2d(channels, channels // 2, kernel_size=3, padding=1, device=device),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(channels // 2, n_hidden_channels, kernel_size=3, padding=1, device=device),
            nn.ReLU(),
            nn.Conv2d(n_hidden_channels, n_output_channels, kernel_size=1, device=device),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x)


class DPTHead(nn.Module):
    """DPT decoder: 4 × (patch map ``[B, D_i, h, w]``, CLS ``[B, D_i]``) → logits ``[B, K, 16h, 16w]`` (even grid).

    State-dict keys are the official ones (``reassemble_blocks.*``, ``convs.*``, ``fusion_blocks.*``,
    ``[project.*]``, ``conv_depth.*``): an official decoder file loads strictly.
    """

    def __init__(self, config: DPTConfig | None = None, *, device=None, **kwargs: Any):
        super().__init__()
        if config is None:
            config = DPTConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = c = config
        self.reassemble_blocks = ReassembleBlocks(
            c.in_channels, c.post_process_channels, c.readout_type, c.use_batchnorm, device=device
        )
        self.convs = nn.ModuleList(
            ConvUnit(ch, c.channels, 3, padding=1, bias=False, device=device) for ch in c.post_process_channels
        )
        self.fusion_blocks = nn.ModuleList(
            FeatureFusionBlock(c.channels, c.use_bias, with_skip=i > 0, device=device) for i in range(4)
        )
        self.project = (
            ConvUnit(c.channels, c.channels, 3, padding=1, bias=True, act="post", device=device)
            if c.projection_after_fusion
            else nn.Identity()
        )
        self.conv_depth = UpConvHead(c.channels, c.n_output_channels, c.n_hidden_channels, device=device)

    def forward_features(
        self, inputs: Sequence[tuple[Tensor, Tensor]], *, return_intermediates: bool = False
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Fused map ``[B, channels, H/2, W/2]``; with ``return_intermediates`` also a dict
        ``reassemble.{0-3}`` (pyramid levels) and ``fusion{0-3}`` (fusion-block outputs)."""
        if len(inputs) != 4:
            raise ValueError(f"the DPT head expects 4 tapped layers, got {len(inputs)}")
        levels = self.reassemble_blocks(inputs)
        feats = [conv(f) for conv, f in zip(self.convs, levels)]
        out = self.fusion_blocks[0](feats[-1])
        fused = [out]
        for i in range(1, 4):
            out = self.fusion_blocks[i](out, feats[-(i + 1)])
            fused.append(out)
        out = self.project(out)
        if not return_intermediates:
            return out
        inter = {f"reassemble.{i}": t for i, t in enumerate(levels)}
        inter.update({f"fusion{i}": t for i, t in enumerate(fused)})
        return out, inter

    def forward(self, inputs: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        """Logits ``[B, n_output_channels, H, W]`` (``H, W`` = 16 × the patch grid when it is even)."""
        return self.conv_depth(self.forward_features(inputs))


# --------------------------------------------------------------------------------------------- logits → values
def create_chmv2_mixlog_bins(
    min_depth: float, max_depth: float, n_bins: int, device: torch.device | str | None = None
) -> Tensor:
    """CHMv2 bin centres ``[n_bins]`` on the internal ÷8 scale ``[min, max/8]``: a per-bin blend of log- and
    linearly-spaced ladders, weight sliding from all-log (first bin) to all-linear (last bin)."""
    top = max_depth / 8.0
    linear = torch.linspace(min_depth, top, n_bins, device=device)
    # log of float32 0-d tensors (not math.log) so the bins are bit-identical to the official ones
    log = torch.exp(
        torch.linspace(torch.log(torch.tensor(min_depth)), torch.log(torch.tensor(top)), n_bins, device=device)
    )
    t = torch.linspace(1.0, 0.0, n_bins, device=device)
    return t * log + (1.0 - t) * linear


def chmv2_mixlog_to_height(
    logits: Tensor, bins: Tensor, max_clamp_value: float = 1e-4, eps_shift: float = 1e-8, eps: float = 1e-12
) -> Tensor:
    """CHMv2 output transform: logits ``[B, K, H, W]`` → heights ``[B, 1, H, W]`` in **metres**.

    ``y = ReLU(logits)``, shifted by ``clamp(−min_k y, 0, 1e-4) + 1e-8``, normalised to sum 1 over bins (no
    softmax); ``8 · Σ_k w_k · max(bin_k, eps)`` (≥ eps before ×8). Range ≈ 0.008–96 m for the default bins."""
    y = torch.relu(logits)
    shift = (-y.amin(dim=1, keepdim=True)).clamp(0.0, max_clamp_value) + eps_shift
    y = y + shift
    denom = torch.nan_to_num(y.sum(dim=1, keepdim=True), nan=1.0, posinf=1.0, neginf=1.0).clamp_min(eps)
    w = y / denom
    out = (w * bins.view(1, -1, 1, 1).clamp_min(eps)).sum(dim=1, keepdim=True).clamp_min(eps)
    return out * 8.0


def make_bins(strategy: str, min_depth: float, max_depth: float, n_bins: int, device=None) -> Tensor:
    """Bin centres ``[n_bins]``: ``linear`` (linspace), ``log`` (exp of a log-linspace) or ``chmv2_mixlog``."""
    if strategy == "linear":
        return torch.linspace(min_depth, max_depth, n_bins, device=device)
    if strategy == "log":
        lo, hi = torch.log(torch.tensor(min_depth)), torch.log(torch.tensor(max_depth))
        return torch.exp(torch.linspace(lo, hi, n_bins, device=device))
    if strategy == "chmv2_mixlog":
        return create_chmv2_mixlog_bins(min_depth, max_depth, n_bins, device=device)
    raise ValueError(f"bins_strategy must be one of {BINS_STRATEGIES}, got {strategy!r}")


class FeaturesToDepth(nn.Module):
    """Logits ``[B, K, H, W]`` → values ``[B, 1, H, W]`` in the units of ``min_depth``/``max_depth`` (metres).

    ``K == 1``: regression ``ReLU(x) + min_depth``. ``K > 1``: ``Σ_k w_k · bin_k`` with bins from
    :func:`make_bins` and weights ``linear`` (``(ReLU(x)+0.1)/Σ``), ``softmax``, ``sigmoid/Σ`` or the CHMv2
    ``chmv2_mixlog`` transform (:func:`chmv2_mixlog_to_height`, includes the ×8). No parameters."""

    def __init__(
        self,
        min_depth: float = 0.001,
        max_depth: float = 80.0,
        bins_strategy: str = "linear",
        norm_strategy: str = "linear",
    ):
        super().__init__()
        if bins_strategy not in BINS_STRATEGIES:
            raise ValueError(f"bins_strategy must be one of {BINS_STRATEGIES}, got {bins_strategy!r}")
        if norm_strategy not in NORM_STRATEGIES:
            raise ValueError(f"norm_strategy must be one of {NORM_STRATEGIES}, got {norm_strategy!r}")
        self.min_depth = min_depth
        self.max_depth = max_depth
        self.bins_strategy = bins_strategy
        self.norm_strategy = norm_strategy

    @classmethod
    def from_config(cls, config: DPTConfig) -> "FeaturesToDepth":
        return cls(config.min_depth, config.max_depth, config.bins_strategy, config.norm_strategy)

    def bins(self, n_bins: int, device=None) -> Tensor:
        return make_bins(self.bins_strategy, self.min_depth, self.max_depth, n_bins, device=device)

    def forward(self, x: Tensor) -> Tensor:
        n_bins = x.shape[1]
        if n_bins == 1:
            return torch.relu(x) + self.min_depth
        bins = self.bins(n_bins, device=x.device)
        if self.norm_strategy == "chmv2_mixlog":
            return chmv2_mixlog_to_height(x, bins)
        if self.norm_strategy == "linear":
            w = torch.relu(x) + 0.1
            w = w / w.sum(dim=1, keepdim=True)
        elif self.norm_strategy == "softmax":
            w = torch.softmax(x, dim=1)
        else:
            w = torch.sigmoid(x)
            w = w / w.sum(dim=1, keepdim=True)
        return torch.einsum("bkhw,k->bhw", w, bins).unsqueeze(1)

    def extra_repr(self) -> str:
        return (
            f"min={self.min_depth}, max={self.max_depth}, bins={self.bins_strategy}, norm={self.norm_strategy}"
        )


__all__ = [
    "DPTConfig",
    "DPTHead",
    "FeaturesToDepth",
    "ReassembleBlocks",
    "FeatureFusionBlock",
    "PreActResidualConvUnit",
    "UpConvHead",
    "ConvUnit",
    "create_chmv2_mixlog_bins",
    "chmv2_mixlog_to_height",
    "make_bins",
]

