"""Training monitors: collapse indicators and the PCA picture of patch features.

* ``teacher_target_entropy``: mean entropy (nats) of the teacher's Sinkhorn-Knopp targets ``[.., K]``; near 0 means
  one prototype per image (fine), but the batch-mean target collapsing onto one prototype is what SK prevents.
* ``cls_std``: mean over dims of the per-dim std of L2-normalised CLS features across the batch (≈ 1/√D for
  well-spread features; → 0 when every image maps to the same point = collapse).
* ``cls_effective_rank``: ``exp(entropy of normalised singular values)`` of centred CLS features (1 = collapse).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

COLLAPSE_STD = 1e-3
COLLAPSE_RANK = 1.2


def teacher_target_entropy(targets: Tensor) -> float:
    p = targets.float().flatten(0, -2).clamp_min(1e-12)
    return float(-(p * p.log()).sum(-1).mean())


def batch_target_entropy(targets: Tensor) -> float:
    """Entropy of the batch-mean target distribution (``log K`` = uniform prototype usage)."""
    p = targets.float().flatten(0, -2).mean(0).clamp_min(1e-12)
    return float(-(p * p.log()).sum())


def cls_std(cls: Tensor) -> float:
    x = F.normalize(cls.float().flatten(0, -2), dim=-1)
    return float(x.std(0).mean()) if x.shape[0] > 1 else float("nan")


def cls_effective_rank(cls: Tensor) -> float:
    x = cls.float().flatten(0, -2)
    if x.shape[0] < 2 or not bool(torch.isfinite(x).all()):
        return float("nan")
    s = torch.linalg.svdvals(x - x.mean(0, keepdim=True))
    p = s / s.sum().clamp_min(1e-12)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def collapse_flags(metrics: dict[str, float]) -> list[str]:
    """Names of the monitors that indicate collapse (empty list = healthy)."""
    flags = []
    if metrics.get("monitor/cls_std", 1.0) < COLLAPSE_STD:
        flags.append(f"CLS std {metrics['monitor/cls_std']:.2e} < {COLLAPSE_STD}")
    if metrics.get("monitor/cls_effective_rank", 10.0) < COLLAPSE_RANK:
        flags.append(f"CLS effective rank {metrics['monitor/cls_effective_rank']:.2f} < {COLLAPSE_RANK}")
    return flags


def pca_rgb(patch_tokens: Tensor, grid: tuple[int, int]) -> np.ndarray:
    """First three principal components of ``[P, D]`` patch features as an ``[H', W', 3]`` uint8 image
    (each component min-max scaled), the classic DINO picture."""
    x = patch_tokens.float()
    x = x - x.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    comps = x @ v[:3].T  # [P, 3]
    lo, hi = comps.min(0).values, comps.max(0).values
    comps = (comps - lo) / (hi - lo).clamp_min(1e-8)
    return (comps.reshape(grid[0], grid[1], 3).numpy() * 255).astype(np.uint8)


@torch.no_grad()
def save_pca_picture(backbone, image: Tensor, path: str | Path, title: str = "") -> Path:
    """Run ``backbone`` on one normalised image ``[3, H, W]`` and save the image beside its PCA picture (PNG)."""
    import matplotlib.pyplot as plt

    was_training = backbone.training
    backbone.eval()
    p = backbone.patch_size
    H, W = image.shape[-2] // p, image.shape[-1] // p
    feats = backbone.forward_features(image[None, :, : H * p, : W * p].float())["x_norm_patchtokens"][0]
    backbone.train(was_training)
    rgb = pca_rgb(feats.cpu(), (H, W))
    img = image.float().cpu()
    img = (img - img.amin((1, 2), keepdim=True)) / (img.amax((1, 2), keepdim=True) - img.amin((1, 2), keepdim=True)).clamp_min(1e-8)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    axes[0].imshow(img.permute(1, 2, 0).numpy())
    axes[0].set_title("input tile")
    axes[1].imshow(rgb, interpolation="nearest")
    axes[1].set_title("PCA of patch features (3 comps)")
    for a in axes:
        a.axis("off")
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_dense_probe(runs: dict[str, str | Path], path: str | Path, metric: str = "probe/crown_auc") -> Path:
    """Plot the dense-probe curve of several runs against iteration (one line per run): ``dense_probe.jsonl`` for
    ``probe/crown_*`` metrics, ``knn_probe.jsonl`` (k-NN probe at checkpoints) for ``probe/crown_knn_*``."""
    import json

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, run in runs.items():
        knn = metric.startswith("probe/crown_knn")
        f = Path(run) / ("knn_probe.jsonl" if knn else "dense_probe.jsonl")
        if not f.is_file():
            flag = "evaluation.knn_probe_every_checkpoint=true" if knn else "evaluation.dense_probe_every=N"
            raise FileNotFoundError(f"{f} not found: run the training with {flag}")
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        ax.plot([r["iteration"] for r in rows], [r[metric] for r in rows], marker="o", label=label)
    ax.set_xlabel("iteration (of the phase)")
    ax.set_ylabel(metric.replace("probe/", "").replace("_", " "))
    ax.set_title("Dense-feature monitor: tree-crown probe on the NEON samples")
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
