"""Probes on cached frozen features: k-NN, logistic regression, the DINOv3 SGD linear probe, segmentation heads.

Every probe takes train / valid / test features, picks its hyper-parameter on ``valid`` and returns test-set
outputs plus the chosen value:

* :func:`knn_scores` — DINOv3 k-NN (``dinov3/eval/knn.py``): cosine similarity of L2-normalised features, the
  ``max(ks)`` nearest train samples weighted by ``softmax(sim / 0.07)``, class score for ``k`` = sum of the first
  ``k`` weights per class. No tuning.
* :func:`logreg_probe` — multinomial (or one-vs-rest sigmoid for multi-label) logistic regression, full-batch
  L-BFGS, objective ``mean CE + ||W||² / (2·C·N)`` (= scikit-learn's ``C``), ``C`` swept on valid, refit on
  train + valid (torchgeo-bench protocol). Features standardised with train statistics.
* :func:`sgd_linear_probe` — DINOv3 linear probe: ``Linear`` (init N(0, 0.01²), bias 0) on fixed features, SGD
  momentum 0.9, wd 0, cosine schedule to 0, batch 32, one classifier per learning rate trained in parallel, best
  lr on valid (paper App. D.13: 2 400 iterations, lr in [1e-5, 1]).
* :func:`seg_probe` — dense head on cached patch maps: ``linear`` = BatchNorm + 1×1 conv on the last layer's patch
  tokens; ``dpt`` = :class:`eo_dinov3.models.dpt.DPTHead` on 4 tapped layers (+ CLS readout) with a
  BatchNorm on the backbone features, logits bilinearly upsampled to the label size, CE, AdamW (wd 1e-4), cosine
  schedule, lr picked on valid mIoU. Returns per-image test confusion matrices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eo_dinov3.evaluation import scoring

DINOV3_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1, 2e-1, 5e-1, 1.0)


@dataclass
class ProbeResult:
    """Test-set output of a classification probe: ``scores [N, C]`` (probabilities for multi-label) and the
    hyper-parameter chosen on valid (``None`` for k-NN)."""

    scores: np.ndarray
    best_hparam: float | None
    valid_metric: float | None = None


def _valid_metric(scores: np.ndarray, y: np.ndarray, multilabel: bool) -> float:
    if len(y) == 0:
        return 0.0
    return scoring.micro_f1(scores, y) if multilabel else scoring.accuracy(scores, y)


# ------------------------------------------------------------------------------------------------ k-NN
@torch.no_grad()
def knn_scores(train_x: Tensor, train_y: Tensor, test_x: Tensor, n_classes: int, ks: Sequence[int] = (5, 20),
               temperature: float = 0.07, multilabel: bool = False,
               chunk: int = 1024) -> dict[int, np.ndarray]:  # fmt: skip
    """DINOv3 weighted k-NN class scores ``k -> [N_test, C]`` (multi-label: weighted label frequency in [0, 1])."""
    tr = F.normalize(train_x.float(), dim=1)
    te = F.normalize(test_x.float(), dim=1)
    kmax = min(max(ks), tr.shape[0])
    onehot = train_y.float() if multilabel else F.one_hot(train_y.long(), n_classes).float()
    out = {k: [] for k in ks}
    for s in range(0, te.shape[0], chunk):
        sims = te[s : s + chunk] @ tr.T
        top, idx = sims.topk(kmax, dim=1)
        w = (top / temperature).softmax(1)
        votes = onehot[idx] * w[..., None]  # [n, kmax, C]
        for k in ks:
            kk = min(k, kmax)
            sc = votes[:, :kk].sum(1)
            if multilabel:
                sc = sc / w[:, :kk].sum(1, keepdim=True)
            out[k].append(sc)
    return {k: torch.cat(v).numpy() if v else np.zeros((0, n_classes)) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------ logistic regression
def _standardise(train: Tensor, *others: Tensor) -> list[Tensor]:
    mu = train.mean(0, keepdim=True)
    sd = train.std(0, keepdim=True).clamp_min(1e-6) if train.shape[0] > 1 else torch.ones_like(mu)
    return [(t - mu) / sd for t in (train, *others)]


def _fit_logreg(x: Tensor, y: Tensor, n_classes: int, C: float, multilabel: bool, max_iter: int,
                init: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    N, D = x.shape
    W = torch.zeros(D, n_classes, dtype=x.dtype, device=x.device) if init is None else init[0].clone()
    b = torch.zeros(n_classes, dtype=x.dtype, device=x.device) if init is None else init[1].clone()
    W.requires_grad_(True)
    b.requires_grad_(True)
    lam = 1.0 / (C * N)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)  # fmt: skip

    def closure():
        opt.zero_grad()
        logits = x @ W + b
        if multilabel:
            loss = F.binary_cross_entropy_with_logits(logits, y.float(), reduction="sum") / N
        else:
            loss = F.cross_entropy(logits, y)
        loss = loss + 0.5 * lam * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


def _logits_to_scores(logits: Tensor, multilabel: bool) -> np.ndarray:
    return (logits.sigmoid() if multilabel else logits.softmax(1)).cpu().numpy()


def logreg_probe(train_x: Tensor, train_y: Tensor, valid_x: Tensor, valid_y: Tensor, test_x: Tensor,
                 n_classes: int, *, multilabel: bool = False, Cs: Sequence[float] | None = None,
                 max_iter: int = 100, device: str | torch.device = "cpu") -> ProbeResult:  # fmt: skip
    """L-BFGS logistic regression, ``C`` chosen on valid (default 40 values log-spaced 1e-6…1e4), refit on
    train + valid."""
    Cs = list(Cs) if Cs is not None else np.logspace(-6, 4, 40).tolist()
    dev = torch.device(device)
    xt, xv, xs = (t.to(dev, torch.float32) for t in _standardise(train_x.float(), valid_x.float(), test_x.float()))
    yt, yv = train_y.to(dev), valid_y.to(dev)
    best = (-1.0, Cs[0])
    init = None
    for C in sorted(Cs):  # warm start along the path (small C -> large C)
        W, b = _fit_logreg(xt, yt, n_classes, C, multilabel, max_iter, init)
        init = (W, b)
        m = _valid_metric(_logits_to_scores(xv @ W + b, multilabel), yv.cpu().numpy(), multilabel)
        if m > best[0] + 1e-12:
            best = (m, C)
    # refit on train + valid with the chosen C
    xa = torch.cat([train_x, valid_x]).float()
    ya = torch.cat([train_y, valid_y]).to(dev)
    xa_s, xs2 = (t.to(dev) for t in _standardise(xa, test_x.float()))
    W, b = _fit_logreg(xa_s, ya, n_classes, best[1], multilabel, max_iter)
    return ProbeResult(_logits_to_scores(xs2 @ W + b, multilabel), float(best[1]), float(best[0]))


# ------------------------------------------------------------------------------------------------ SGD linear probe
def sgd_linear_probe(train_x: Tensor, train_y: Tensor, valid_x: Tensor, valid_y: Tensor, test_x: Tensor,
                     n_classes: int, *, multilabel: bool = False, lrs: Sequence[float] = DINOV3_LRS,
                     iters: int = 2400, batch_size: int = 32, seed: int = 0,
                     device: str | torch.device = "cpu") -> ProbeResult:  # fmt: skip
    """DINOv3 linear probe (module doc); all learning rates trained in one pass over the same batches."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    L, D = len(lrs), train_x.shape[1]
    W = (torch.randn(L, D, n_classes, generator=g) * 0.01).to(dev).requires_grad_(True)
    b = torch.zeros(L, 1, n_classes, device=dev, requires_grad=True)
    xt, yt = train_x.float().to(dev), train_y.to(dev)
    lr_t = torch.tensor(lrs, dtype=torch.float32, device=dev)
    mom_w, mom_b = torch.zeros_like(W), torch.zeros_like(b)
    N = xt.shape[0]
    for it in range(iters):
        idx = torch.randint(0, N, (min(batch_size, N),), generator=g).to(dev)
        x, y = xt[idx], yt[idx]
        logits = torch.einsum("nd,ldc->lnc", x, W) + b
        if multilabel:
            loss = F.binary_cross_entropy_with_logits(logits, y.float()[None].expand_as(logits), reduction="none")
            loss = loss.sum(-1).mean(-1).sum()
        else:
            loss = F.cross_entropy(logits.reshape(-1, n_classes), y.repeat(L), reduction="none").view(L, -1)
            loss = loss.mean(1).sum()  # sum over classifiers = independent per-lr objectives
        gW, gb = torch.autograd.grad(loss, (W, b))
        scale = 0.5 * (1 + math.cos(math.pi * it / iters))  # cosine to 0
        with torch.no_grad():
            mom_w.mul_(0.9).add_(gW)
            mom_b.mul_(0.9).add_(gb)
            W.sub_(lr_t.view(L, 1, 1) * scale * mom_w)
            b.sub_(lr_t.view(L, 1, 1) * scale * mom_b)
    with torch.no_grad():
        xv = valid_x.float().to(dev)
        vlog = torch.einsum("nd,ldc->lnc", xv, W) + b
        vm = [_valid_metric(_logits_to_scores(vlog[i], multilabel), valid_y.numpy(), multilabel) for i in range(L)]
        best = int(np.nanargmax(np.nan_to_num(vm, nan=-1.0)))
        tlog = test_x.float().to(dev) @ W[best] + b[best]
    return ProbeResult(_logits_to_scores(tlog, multilabel), float(lrs[best]), float(vm[best]))


# ------------------------------------------------------------------------------------------------ segmentation
class LinearSegHead(nn.Module):
    """BatchNorm + 1×1 conv on a patch map ``[B, D, h, w]`` -> logits ``[B, K, h, w]``."""

    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)
        self.conv = nn.Conv2d(dim, n_classes, 1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, maps: Tensor, cls: Tensor | None = None) -> Tensor:
        return self.conv(self.bn(maps[:, -1]))


class DPTSegHead(nn.Module):
    """BatchNorm on each tapped layer + :class:`~eo_dinov3.models.dpt.DPTHead` (CLS ``project`` readout) ->
    logits ``[B, K, 16h, 16w]``; dropout 0.1 on the fused features (DINOv3 segmentation head)."""

    def __init__(self, dim: int, n_classes: int, channels: int = 256, post: Sequence[int] | None = None):
        super().__init__()
        from eo_dinov3.models.dpt import DPTConfig, DPTHead

        post = tuple(post) if post is not None else ((128, 256, 512, 1024) if dim >= 512 else (dim // 2, dim, dim, dim))
        cfg = DPTConfig(in_channels=(dim,) * 4, channels=channels, post_process_channels=post,
                        readout_type="project", use_batchnorm=False, n_output_channels=n_classes,
                        n_hidden_channels=max(32, channels // 2))  # fmt: skip
        self.bns = nn.ModuleList(nn.BatchNorm2d(dim) for _ in range(4))
        self.dpt = DPTHead(cfg)
        self.drop = nn.Dropout2d(0.1)

    def forward(self, maps: Tensor, cls: Tensor | None = None) -> Tensor:
        inputs = [(bn(maps[:, i]), cls[:, i]) for i, bn in enumerate(self.bns)]
        feat = self.drop(self.dpt.forward_features(inputs))
        return self.dpt.conv_depth(feat)


@dataclass
class SegResult:
    """Per-image test confusions ``[N, C, C]`` and the lr chosen on valid (with its valid mIoU)."""

    confusions: np.ndarray
    best_hparam: float
    valid_metric: float


def _predict_seg(head: nn.Module, maps: Tensor, cls: Tensor | None, labels: Tensor, n_classes: int,
                 dev: torch.device, batch: int = 16) -> np.ndarray:  # fmt: skip
    head.eval()
    cms = []
    with torch.no_grad():
        for s in range(0, maps.shape[0], batch):
            m = maps[s : s + batch].to(dev).float()
            c = cls[s : s + batch].to(dev).float() if cls is not None else None
            y = labels[s : s + batch]
            logits = F.interpolate(head(m, c), size=y.shape[-2:], mode="bilinear", align_corners=False)
            pred = logits.argmax(1).cpu().numpy()
            cms += [scoring.confusion(p, t, n_classes) for p, t in zip(pred, y.numpy())]
    return np.stack(cms) if cms else np.zeros((0, n_classes, n_classes), np.int64)


def seg_probe(train: tuple[Tensor, Tensor | None, Tensor], valid: tuple[Tensor, Tensor | None, Tensor],
              test: tuple[Tensor, Tensor | None, Tensor], n_classes: int, *, head: str = "linear",
              lrs: Sequence[float] = (1e-4, 3e-4, 1e-3), iters: int = 500, batch_size: int = 8, seed: int = 0,
              weight_decay: float = 1e-4, device: str | torch.device = "cpu",
              dpt_channels: int = 256) -> SegResult:  # fmt: skip
    """Train a dense head per lr on ``(maps [N, L, D, h, w], map_cls [N, L, D] | None, labels [N, H, W])``,
    choose the lr on valid mIoU, return test confusions (module doc)."""
    dev = torch.device(device)
    maps_t, cls_t, y_t = train
    D = maps_t.shape[2]
    best: tuple[float, float, nn.Module | None] = (-1.0, lrs[0], None)
    for lr in lrs:
        torch.manual_seed(seed)
        model: nn.Module = (LinearSegHead(D, n_classes) if head == "linear"
                            else DPTSegHead(D, n_classes, channels=dpt_channels)).to(dev)  # fmt: skip
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, iters))
        g = torch.Generator().manual_seed(seed)
        N = maps_t.shape[0]
        model.train()
        for _ in range(iters):
            idx = torch.randint(0, N, (min(batch_size, N),), generator=g)
            m = maps_t[idx].to(dev).float()
            c = cls_t[idx].to(dev).float() if cls_t is not None else None
            y = y_t[idx].to(dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                logits = model(m, c)
            logits = F.interpolate(logits.float(), size=y.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        vm = float(scoring.miou_from_confusion(_predict_seg(model, *valid, n_classes, dev).sum(0)))
        if vm > best[0]:
            best = (vm, lr, model)
    assert best[2] is not None
    return SegResult(_predict_seg(best[2], *test, n_classes, dev), float(best[1]), float(best[0]))
