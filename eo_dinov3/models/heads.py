"""DINO / iBOT projection head (official ``dinov3/layers/dino_head.py`` layout and keys).

``x [N, in_dim]`` → ``Linear(in, hidden) → GELU → (Linear(hidden, hidden) → GELU) × (nlayers−2) →
Linear(hidden, bottleneck)`` → L2 normalisation (eps 1e-12; 1e-6 for fp16) → ``last_layer = Linear(bottleneck, K,
bias=False)`` → prototype logits ``[N, K]``. No weight normalisation on the last layer (DINOv3 dropped it) and no
BatchNorm. State-dict keys for ``nlayers=3``: ``mlp.0.{weight,bias}``, ``mlp.2.{weight,bias}``,
``mlp.4.{weight,bias}``, ``last_layer.weight``. Init: truncated normal (std 0.02, cut at ±2) weights, zero biases.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _build_mlp(nlayers: int, in_dim: int, hidden_dim: int, bottleneck_dim: int, bias: bool) -> nn.Module:
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=bias), nn.GELU()]
    for _ in range(nlayers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim, bias=bias), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """Projection head shared by the DINO (CLS) and iBOT (patch) losses (separate instances for each)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        mlp_bias: bool = True,
    ):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.mlp = _build_mlp(max(nlayers, 1), in_dim, hidden_dim, bottleneck_dim, mlp_bias)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)

    def init_weights(self) -> None:
        """Official init: every Linear weight ~ trunc_normal(std=0.02), biases 0 (module order: mlp, last_layer)."""
        self.apply(_init_linear)

    def forward(self, x: Tensor, no_last_layer: bool = False, only_last_layer: bool = False) -> Tensor:
        """``[..., in_dim]`` → logits ``[..., out_dim]``; ``no_last_layer``: return the L2-normalised bottleneck
        ``[..., bottleneck]``; ``only_last_layer``: ``x`` is already the bottleneck, apply ``last_layer`` only."""
        if not only_last_layer:
            x = self.mlp(x)
            eps = 1e-6 if x.dtype == torch.float16 else 1e-12
            x = nn.functional.normalize(x, dim=-1, p=2, eps=eps)
        if not no_last_layer:
            x = self.last_layer(x)
        return x


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
