"""2-D rotary position embedding (RoPE) of the DINOv3 ViT.

Layout (official ``RopePositionEmbedding``): for a ``H×W`` patch grid, patch centres ``(r+½, c+½)`` are
normalised to ``[-1, 1]`` (``separate``: rows by ``H``, columns by ``W``; ``min``/``max``: both by ``min``/``max(H, W)``).
With ``F = D_h/4`` periods ``p_j`` the angles are ``θ = 2π·coord/p_j`` for the row then the column coordinate,
giving ``D_h/2`` angles that are duplicated to ``D_h`` ("rotate-half" / NeoX pairing: channel ``i`` is rotated
with channel ``i + D_h/2``). In ``train()`` mode coordinates are augmented (shift → jitter → rescale, drawn from
the global torch RNG in the RoPE dtype). The ``periods`` buffer is persistent: always load it from checkpoints.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def rope_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map ``"fp32"``/``"bf16"``/… (official config values) or a dtype to a ``torch.dtype``."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown RoPE dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


def rope_periods(
    head_dim: int,
    *,
    base: float | None = 100.0,
    min_period: float | None = None,
    max_period: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Periods ``[D_h/4]`` in patch-box units: ``base^(4j/D_h)`` or geometric from ``min_period`` to ``max_period``."""
    if head_dim % 4 != 0:
        raise ValueError(f"RoPE needs a head dim divisible by 4, got {head_dim}")
    n = head_dim // 4
    if (base is None) == (min_period is None or max_period is None):
        raise ValueError("give either base or both min_period and max_period")
    if base is not None:
        exponents = 2 * torch.arange(n, device=device, dtype=dtype) / (head_dim // 2)
        return base**exponents
    ratio = max_period / min_period
    exponents = torch.linspace(0, 1, n, device=device, dtype=dtype)
    periods = ratio**exponents
    periods = periods / ratio
    return periods * max_period


def rotate_half(x: Tensor) -> Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dim (pairs channel ``i`` with ``i + D/2``)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate ``x [..., N, D_h]`` by angles whose sin/cos are ``[N, D_h]``: ``x·cos + rotate_half(x)·sin``."""
    return x * cos + rotate_half(x) * sin


def apply_rope_to_patches(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate the last ``P`` tokens of ``x [..., N, D_h]`` (``sin``/``cos`` ``[P, D_h]``); the first ``N - P`` tokens
    (CLS, storage) pass unchanged. Returns a new tensor in ``x.dtype``.

    Bit-for-bit the official ``cat(x_prefix, apply_rope(x_patches.to(rope_dtype), sin, cos).to(x.dtype))``, written
    with halves ``x = [x₁, x₂]``: ``[x₁·cos₁ − x₂·sin₁, x₂·cos₂ + x₁·sin₂]`` (IEEE ``a + (−b) = a − b`` exactly).
    Without autograd, and unless the RoPE dtype is narrower than ``x``'s, the halves are written straight into one
    output buffer in ``x``'s memory order (no ``rotate_half``/``cat`` temporaries, which on CPU cost page faults;
    attention on such q/k returns ``[B, N, h, D_h]``-ordered rows, so no copy before the output projection).
    ``x`` may be a strided view, e.g. ``qkv[:2]`` of shape ``[2, B, heads, N, D_h]`` to rotate q and k in one pass."""
    P = sin.shape[-2]
    prefix = x.shape[-2] - P
    half = x.shape[-1] // 2
    c1, c2, s1, s2 = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
    pat = x[..., prefix:, :]
    rdtype = sin.dtype
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or sin.requires_grad or cos.requires_grad)
    # x·table promotes x exactly only when the RoPE dtype is at least as wide (bf16 q/k with fp32 tables)
    if needs_grad or cos.dtype != rdtype or torch.promote_types(x.dtype, rdtype) != rdtype:
        pat = pat.to(rdtype)
        x1, x2 = pat[..., :half], pat[..., half:]
        rot = torch.cat((x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), dim=-1).to(x.dtype)
        return torch.cat((x[..., :prefix, :], rot), dim=-2)
    out = torch.empty_like(x, dtype=rdtype)  # x's memory order: attention returns [B, N, h, D_h]-ordered rows
    out[..., :prefix, :].copy_(x[..., :prefix, :])
    x1, x2 = pat[..., :half], pat[..., half:]
    o1, o2 = out[..., prefix:, :half], out[..., prefix:, half:]
    tmp = torch.empty_like(o1)
    torch.mul(x1, c1, out=o1)
    torch.mul(x2, s1, out=tmp)
    o1.sub_(tmp)
    torch.mul(x2, c2, out=o2)
    torch.mul(x1, s2, out=tmp)
    o2.add_(tmp)
    return out if out.dtype == x.dtype else out.to(x.dtype)


class RopePositionEmbedding(nn.Module):
    """Produces ``(sin, cos)`` tables ``[H·W, D_h]`` for a patch grid (official semantics, see module doc)."""

    def __init__(
        self,
        embed_dim: int,
        *,
        num_heads: int,
        base: float | None = 100.0,
        min_period: float | None = None,
        max_period: float | None = None,
        normalize_coords: str = "separate",
        shift_coords: float | None = None,
        jitter_coords: float | None = None,
        rescale_coords: float | None = None,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if embed_dim % (4 * num_heads) != 0:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by 4*num_heads={4 * num_heads}")
        if normalize_coords not in ("min", "max", "separate"):
            raise ValueError(f"normalize_coords must be min, max or separate, got {normalize_coords!r}")
        self.head_dim = embed_dim // num_heads
        self.base = base
        self.min_period = min_period
        self.max_period = max_period
        self.normalize_coords = normalize_coords
        self.shift_coords = shift_coords
        self.jitter_coords = jitter_coords
        self.rescale_coords = rescale_coords
        self.dtype = rope_dtype(dtype)
        self.register_buffer(
            "periods", torch.empty(self.head_dim // 4, device=device, dtype=self.dtype), persistent=True
        )
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}
        if str(device) != "meta":
            self._init_weights()

    def _init_weights(self) -> None:
        p = rope_periods(
            self.head_dim,
            base=self.base,
            min_period=self.min_period,
            max_period=self.max_period,
            dtype=self.dtype,
            device=self.periods.device,
        )
        self.periods.data = p
        self._cache.clear()

    def _load_from_state_dict(self, *args, **kwargs):  # a loaded periods buffer invalidates cached tables
        self._cache.clear()
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):  # .to()/.cuda()/.half() move the buffer: drop cached tables
        self._cache.clear()
        return super()._apply(fn, recurse)

    @property
    def augments(self) -> bool:
        """True when this call would draw random coordinate augmentations (train mode and any augment set)."""
        return self.training and any(
            v is not None for v in (self.shift_coords, self.jitter_coords, self.rescale_coords)
        )

    def coords(self, H: int, W: int) -> Tensor:
        """Normalised patch-centre coordinates ``[H·W, 2]`` (row, column) in ``[-1, 1]`` (before augmentation)."""
        dd = {"device": self.periods.device, "dtype": self.dtype}
        if self.normalize_coords == "max":
            m = max(H, W)
            ch, cw = torch.arange(0.5, H, **dd) / m, torch.arange(0.5, W, **dd) / m
        elif self.normalize_coords == "min":
            m = min(H, W)
            ch, cw = torch.arange(0.5, H, **dd) / m, torch.arange(0.5, W, **dd) / m
        else:
            ch, cw = torch.arange(0.5, H, **dd) / H, torch.arange(0.5, W, **dd) / W
        coords = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), dim=-1).flatten(0, 1)
        return 2.0 * coords - 1.0

    def forward(self, *, H: int, W: int) -> tuple[Tensor, Tensor]:
        """``(sin, cos)``, each ``[H·W, D_h]`` in the RoPE dtype. Cached per grid in eval mode."""
        augment = self.augments
        # tables made under inference_mode are inference tensors, unusable later by autograd: cache them apart
        key = (H, W, torch.is_inference_mode_enabled())
        if not augment and key in self._cache and not torch.compiler.is_compiling():
            return self._cache[key]
        coords = self.coords(H, W)
        dd = {"device": coords.device, "dtype": self.dtype}
        if self.training:
            if self.shift_coords is not None:
                shift_hw = torch.empty(2, **dd).uniform_(-self.shift_coords, self.shift_coords)
                coords = coords + shift_hw[None, :]
            if self.jitter_coords is not None:
                jmax = math.log(self.jitter_coords)
                jitter_hw = torch.empty(2, **dd).uniform_(-jmax, jmax).exp()
                coords = coords * jitter_hw[None, :]
            if self.rescale_coords is not None:
                rmax = math.log(self.rescale_coords)
                rescale = torch.empty(1, **dd).uniform_(-rmax, rmax).exp()
                coords = coords * rescale
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]  # [HW, 2, F]
        angles = angles.flatten(1, 2).tile(2)  # [HW, D_h]
        out = (torch.sin(angles), torch.cos(angles))
        if not augment and not torch.compiler.is_compiling() and len(self._cache) < 64:
            self._cache[key] = out
        return out
