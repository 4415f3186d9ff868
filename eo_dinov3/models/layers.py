"""Building blocks of the DINOv3 ViT: patch embedding, k-bias-masked attention with RoPE, FFNs, LayerScale,
norms and the transformer block with "sample drop" stochastic depth. State-dict names follow the official code.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

from eo_dinov3.models.rope import apply_rope_to_patches


def _inplace_ok(*modules: nn.Module) -> bool:
    """Fresh activations may be updated in place (inference speed-up, same numbers) when autograd records nothing
    (``inference_mode``/``no_grad``) and no forward hook on ``modules`` (or a global one) could hold a reference to
    an activation that would change, or expect a module that the in-place path does not call."""
    if torch.is_grad_enabled() or _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _mul_(a: Tensor, b: Tensor) -> Tensor:
    """``a * b``, written into ``a`` when ``a``'s dtype is the result dtype (a fresh tensor we own)."""
    return a.mul_(b) if torch.result_type(a, b) == a.dtype else a * b


def _add_(a: Tensor, b: Tensor) -> Tensor:
    """``a + b``, written into ``a`` when ``a``'s dtype is the result dtype (a fresh tensor we own)."""
    return a.add_(b) if torch.result_type(a, b) == a.dtype else a + b


class PatchEmbed(nn.Module):
    """``[B, C, H, W] -> [B, H/p, W/p, D]`` with one strided conv (remainder pixels are dropped, as officially)."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768, device=None):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, device=device)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected an image batch [B, {self.in_chans}, H, W], got shape {list(x.shape)} "
                f"(this backbone takes {self.in_chans} bands)"
            )
        if x.shape[-2] < self.patch_size[0] or x.shape[-1] < self.patch_size[1]:
            raise ValueError(f"image {x.shape[-2]}x{x.shape[-1]} px is smaller than one {self.patch_size[0]}-px patch")
        return self.proj(x).permute(0, 2, 3, 1)

    def reset_parameters(self) -> None:
        k = 1 / (self.in_chans * self.patch_size[0] * self.patch_size[1])
        nn.init.uniform_(self.proj.weight, -math.sqrt(k), math.sqrt(k))
        if self.proj.bias is not None:
            nn.init.uniform_(self.proj.bias, -math.sqrt(k), math.sqrt(k))


class LinearKMaskedBias(nn.Linear):
    """The fused qkv Linear whose key bias is multiplied by a persistent ``bias_mask`` buffer (1, 0, 1 thirds)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if self.bias is not None:
            self.register_buffer("bias_mask", torch.empty_like(self.bias), persistent=True)
            if self.bias.device.type != "meta":
                self.reset_bias_mask()

    def reset_bias_mask(self) -> None:
        if self.bias is None:
            return
        d = self.out_features // 3
        with torch.no_grad():
            self.bias_mask.fill_(1.0)
            self.bias_mask[d : 2 * d] = 0.0

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias * self.bias_mask.to(self.bias.dtype) if self.bias is not None else None
        return F.linear(x, self.weight, bias)


class SelfAttention(nn.Module):
    """Multi-head self-attention with RoPE on the last ``P`` (patch) tokens of q and k; SDPA kernel."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        mask_k_bias: bool = False,
        device=None,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        linear = LinearKMaskedBias if mask_k_bias else nn.Linear
        self.qkv = linear(dim, dim * 3, bias=qkv_bias, device=device)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, device=device)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``x [B, N, D]``; ``rope = (sin, cos)`` each ``[P, D_h]`` for the last ``P`` tokens."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is None:
            q, k, v = qkv.unbind(0)  # [B, h, N, D_h]
        else:  # q and k rotated in one pass into one new [2, B, h, N, D_h] tensor
            q, k = apply_rope_to_patches(qkv[:2], *rope).unbind(0)
            v = qkv[2]
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))

    @staticmethod
    def _rope(q: Tensor, k: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """RoPE on the last ``P`` tokens of ``q``/``k`` ``[B, h, N, D_h]`` (prefix tokens unchanged)."""
        return apply_rope_to_patches(q, *rope), apply_rope_to_patches(k, *rope)


class Mlp(nn.Module):
    """``fc2(GELU(fc1 x))`` (exact erf GELU)."""

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True, device=None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, device=device)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias, device=device)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        if type(self.act) is nn.GELU and _inplace_ok(self.fc1, self.act):  # same kernel, no second [B, N, 4D]
            h = torch.ops.aten.gelu_(h, approximate=self.act.approximate)
        else:
            h = self.act(h)
        return self.fc2(h)


def swiglu_hidden_dim(dim: int, ffn_ratio: float, align_to: int = 8) -> int:
    """Official SwiGLU width: ``d = int(2·int(D·ratio)/3)`` rounded *up* to a multiple of ``align_to``."""
    h0 = int(dim * ffn_ratio)
    d = int(h0 * 2 / 3)
    return (d + align_to - 1) // align_to * align_to


class SwiGLUFFN(nn.Module):
    """``w3(SiLU(w1 x) ⊙ w2 x)`` with the official hidden-size rounding (see :func:`swiglu_hidden_dim`)."""

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True, device=None):
        super().__init__()
        self.w1 = nn.Linear(in_features, hidden_features, bias=bias, device=device)
        self.w2 = nn.Linear(in_features, hidden_features, bias=bias, device=device)
        self.w3 = nn.Linear(hidden_features, in_features, bias=bias, device=device)

    def forward(self, x: Tensor) -> Tensor:
        if _inplace_ok(self.w1):
            h = F.silu(self.w1(x), inplace=True)
            return self.w3(_mul_(h, self.w2(x)))
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class LayerScale(nn.Module):
    """Per-channel scale ``γ ⊙ x`` (key ``gamma``)."""

    def __init__(self, dim: int, init_values: float = 1e-5, device=None):
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values), device=device))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)


class RMSNorm(nn.Module):
    """``x·rsqrt(mean(x²)+eps)`` in fp32, cast back, times ``weight``."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


NORM_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "layernorm": lambda dim, device=None: nn.LayerNorm(dim, eps=1e-6, device=device),
    "layernormbf16": lambda dim, device=None: nn.LayerNorm(dim, eps=1e-5, device=device),
    "rmsnorm": lambda dim, device=None: RMSNorm(dim, device=device),
}

FFN_ALIGN = {"swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128}


def make_ffn(kind: str, dim: int, ffn_ratio: float, bias: bool, device=None) -> nn.Module:
    """``mlp`` (hidden ``int(D·ratio)``) or ``swiglu[32|64|128]`` (official rounding)."""
    if kind == "mlp":
        return Mlp(dim, int(dim * ffn_ratio), bias=bias, device=device)
    if kind in FFN_ALIGN:
        return SwiGLUFFN(dim, swiglu_hidden_dim(dim, ffn_ratio, FFN_ALIGN[kind]), bias=bias, device=device)
    raise ValueError(f"unknown ffn_layer {kind!r}; expected 'mlp' or one of {sorted(FFN_ALIGN)}")


class SelfAttentionBlock(nn.Module):
    """Pre-norm block ``x + γ₁·Attn(N₁x)``, ``x + γ₂·FFN(N₂x)`` with official "sample drop" stochastic depth:
    in training, each residual branch runs on a random subset of ``max(int(B(1-ρ)), 1)`` samples and is added
    back scaled by ``B/subset``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop_path: float = 0.0,
        init_values: float | None = None,
        norm_layer: str = "layernormbf16",
        ffn_layer: str = "mlp",
        mask_k_bias: bool = False,
        device=None,
    ):
        super().__init__()
        make_norm = NORM_LAYERS[norm_layer]
        self.norm1 = make_norm(dim, device=device)
        self.attn = SelfAttention(dim, num_heads, qkv_bias, proj_bias, mask_k_bias, device=device)
        self.ls1 = LayerScale(dim, init_values, device=device) if init_values else nn.Identity()
        self.norm2 = make_norm(dim, device=device)
        self.mlp = make_ffn(ffn_layer, dim, ffn_ratio, ffn_bias, device=device)
        self.ls2 = LayerScale(dim, init_values, device=device) if init_values else nn.Identity()
        self.sample_drop_ratio = drop_path

    @staticmethod
    def _scale(ls: nn.Module, y: Tensor, inplace: bool) -> Tensor:
        if inplace and type(ls) is LayerScale:
            return _mul_(y, ls.gamma)
        return ls(y)

    def _attn_branch(self, x: Tensor, rope, inplace: bool = False) -> Tensor:
        return self._scale(self.ls1, self.attn(self.norm1(x), rope=rope), inplace)

    def _ffn_branch(self, x: Tensor, inplace: bool = False) -> Tensor:
        return self._scale(self.ls2, self.mlp(self.norm2(x)), inplace)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``x [B, N, D]`` -> ``[B, N, D]``."""
        inplace = _inplace_ok(*self.modules())
        if self.training and self.sample_drop_ratio > 0.0:
            b = x.shape[0]
            s = max(int(b * (1 - self.sample_drop_ratio)), 1)
            idx1 = torch.randperm(b, device=x.device)[:s]
            x = torch.index_add(x, 0, idx1, self._attn_branch(x[idx1], rope, inplace), alpha=b / s)
            idx2 = torch.randperm(b, device=x.device)[:s]
            return torch.index_add(x, 0, idx2, self._ffn_branch(x[idx2], inplace), alpha=b / s)
        if inplace:  # same sums (IEEE addition commutes), accumulated into the fresh branch output
            x = _add_(self._attn_branch(x, rope, True), x)
            return _add_(x, self._ffn_branch(x, True))
        x = x + self._attn_branch(x, rope)
        return x + self._ffn_branch(x)
