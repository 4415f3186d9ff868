"""Tree-crown dense probe on the NEON sample images: is a 16-px patch mostly tree crown?

A small, real, fast (seconds on a CPU) test of *frozen patch features*, used to compare backbones (e.g. a pretraining
run's teacher against its random init) and as a dense-feature monitor during training.

Data (``eo_dinov3.data.samples``): the four NEON RGB scenes at native 0.1 m (``yell``, ``yell2``, ``osbs``, ``sjer``)
and the hand-annotated deepforest tree-crown boxes of ``crowns_pixel.csv`` (pixel boxes of the native images).

1. **Crown mask.** The union of the boxes is rasterised at native resolution (1 inside any box).
2. **GSD.** Image and mask are area-averaged to ``gsd_m`` (default **0.15 m**, the GSD of the sample pretraining
   tiles). Crowns in these scenes are 3.5–4 m wide (median box 35–41 px at 0.1 m; SJER oaks ≈ 8 m), i.e. ≈ 25 px
   ≈ 1.6 patches of 16 px at 0.15 m: a crown covers one to four patches, so the labels describe patch-scale objects
   and each crown contributes a few labelled patches. At native 0.1 m a crown spans ≈ 2.5 patches but the probe
   costs 2.2× more; from ≈ 0.3 m on a crown is smaller than one patch and the label degrades to "this ≥ 4.8 m cell
   lies in a dense stand" (the positive fraction barely changes with GSD because the boxes of neighbouring crowns
   overlap into stands: train 0.21 / 0.21 / 0.19 / 0.18 at 0.1 / 0.15 / 0.2 / 0.3 m); at 0.6 m (SAT-493M) a crown
   is ≈ 6 px.
3. **Labels.** Per 16-px patch the crown fraction (mean of the resampled mask over the patch); label 1 when
   ``≥ 0.5``. Images are cropped at the bottom/right to a multiple of the patch size.
4. **Features.** Each image is cut into chips of at most ``chip_px`` (224) pixels — the patch grid is split as evenly
   as possible, so every patch is seen exactly once, in a chip of 128–224 px per side (the ViT's RoPE takes any
   multiple of 16) — normalised with :func:`eo_dinov3.data.normalization.normalize` and passed through
   ``backbone.forward_features(x)["x_norm_patchtokens"]`` in eval mode, no grad.
5. **Probe.** Split by **region**, never by patch (``split="region"``, default): in every scene the top half of the
   patch rows trains and the bottom half tests, with a 2-patch (4.8 m at 0.15 m) guard band between them (one row
   dropped on each side) so that no crown straddles train and test; all four sites appear in both, and the positive
   fraction is similar in both halves (0.19–0.60 per scene). ``split="image"`` holds out whole images instead: train
   on ``yell`` (574 crowns), test on ``yell2`` (another tile of the same site), ``osbs`` (Florida) and ``sjer``
   (California oak savanna) — a harder, cross-site test in which colour statistics shift. Features are standardised
   with the training mean/std, then a class-balanced L2 logistic regression (scikit-learn, ``C = 0.1``, fixed — no
   tuning on the test patches) is fitted on the training patches; balanced accuracy (threshold 0.5) and ROC-AUC are
   computed on the test patches (pooled, and per scene). ``classifier="knn"`` replaces the logistic regression by a
   weighted k-NN vote as in DINO's k-NN evaluation: cosine similarity of L2-normalised features, the ``k = 20``
   nearest training patches vote with weight ``exp(sim / 0.07)``; the score is the weighted positive fraction and the
   decision threshold is the training positive fraction (class prior), so balanced accuracy is meaningful with
   imbalanced labels. No fitting, no hyper-parameter tuned on the test patches.

Caveat: the sample pretraining tiles are cut from these same four scenes, so a backbone pretrained on them has seen
the test images without labels (transductive self-supervision) — fine for comparing backbones trained on the same
tiles, not a claim of generalisation to new sites.

:class:`PatchColourBaseline` is a backbone stand-in whose "features" are the mean normalised RGB of each patch: a
colour-only reference (crowns are darker green than grass and soil). A backbone whose features are worth anything for
dense tasks should beat it.
"""

from __future__ import annotations

import csv
import functools
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eo_dinov3.data.normalization import normalize
from eo_dinov3.errors import DataError

SCENES: tuple[str, ...] = ("yell", "yell2", "osbs", "sjer")
TRAIN_SCENES: tuple[str, ...] = ("yell",)
TEST_SCENES: tuple[str, ...] = ("yell2", "osbs", "sjer")
DEFAULT_GSD_M = 0.15
POSITIVE_THRESHOLD = 0.5
PROBE_C = 0.1
KNN_K = 20
KNN_TEMPERATURE = 0.07
CLASSIFIERS = ("logreg", "knn")


def knn_scores(train_x: Tensor, train_y: Tensor, test_x: Tensor, *, k: int = KNN_K,
               temperature: float = KNN_TEMPERATURE, chunk: int = 4096) -> Tensor:
    """Weighted k-NN vote (DINO's k-NN evaluation) for a binary label.

    Args:
        train_x: ``[N, D]`` features; train_y: ``[N]`` labels in {0, 1}; test_x: ``[M, D]`` features.
        k: neighbours (capped at ``N``); temperature: weights ``exp(cos / temperature)``.

    Returns:
        ``[M]`` float64: per test row, ``Σ w_i y_i / Σ w_i`` over its ``k`` nearest training rows by cosine similarity.
    """
    tr = F.normalize(train_x.float(), dim=1)
    te = F.normalize(test_x.float(), dim=1)
    y = train_y.to(torch.float64)
    k = min(int(k), tr.shape[0])
    out = []
    for s in range(0, te.shape[0], chunk):
        sim, idx = (te[s : s + chunk] @ tr.T).topk(k, dim=1)
        w = torch.exp((sim.double() - 1.0) / temperature)  # shifted by the max possible cosine: no overflow
        out.append((w * y[idx]).sum(1) / w.sum(1))
    return torch.cat(out)


@dataclass(frozen=True)
class CrownScene:
    """One scene resampled to ``gsd_m``: ``image [3, H, W]`` float32 in ``[0, 1]`` and ``crown_fraction
    [H/p, W/p]`` (fraction of each ``p × p`` patch inside a crown box), ``H, W`` multiples of the patch size ``p``."""

    key: str
    gsd_m: float
    patch_size: int
    image: Tensor
    crown_fraction: Tensor
    n_boxes: int

    @property
    def labels(self) -> Tensor:
        """Per-patch labels ``[H/p, W/p]`` int64: crown fraction ≥ 0.5."""
        return (self.crown_fraction >= POSITIVE_THRESHOLD).long()


def _native_gsd(transform: Any) -> float:
    return float(math.sqrt(abs(transform.a * transform.e - transform.b * transform.d)))


def _read_boxes(csv_path: str, image_key: str) -> list[tuple[int, int, int, int]]:
    with open(csv_path, newline="") as fh:
        return [
            (int(float(r["xmin"])), int(float(r["ymin"])), int(float(r["xmax"])), int(float(r["ymax"])))
            for r in csv.DictReader(fh)
            if r["image_key"] == image_key
        ]


@functools.lru_cache(maxsize=16)
def load_scene(key: str, gsd_m: float = DEFAULT_GSD_M, patch_size: int = 16) -> CrownScene:
    """Scene ``key`` (one of :data:`SCENES`) with its crown mask, resampled (area average) to ``gsd_m`` metres."""
    import rasterio

    from eo_dinov3.data.samples import sample_path

    if key not in SCENES:
        raise DataError(f"unknown crown scene {key!r}; choose from {SCENES}")
    tif = sample_path(f"{key}_rgb_native")
    with rasterio.open(tif) as src:
        rgb = src.read()  # [3, H, W] uint8
        native = _native_gsd(src.transform)
    boxes = _read_boxes(str(sample_path("crowns_pixel")), f"{key}_rgb_native")
    H, W = rgb.shape[1:]
    mask = np.zeros((H, W), dtype=np.float32)
    for x0, y0, x1, y1 in boxes:
        mask[max(y0, 0) : min(y1, H), max(x0, 0) : min(x1, W)] = 1.0
    stack = torch.cat([torch.from_numpy(rgb).float() / 255.0, torch.from_numpy(mask)[None]])[None]
    scale = native / gsd_m
    size = (max(patch_size, round(H * scale)), max(patch_size, round(W * scale)))
    stack = F.interpolate(stack, size=size, mode="area")[0] if size != (H, W) else stack[0]
    h, w = (size[0] // patch_size) * patch_size, (size[1] // patch_size) * patch_size
    stack = stack[:, :h, :w]
    frac = F.avg_pool2d(stack[3:4], patch_size)[0]
    return CrownScene(key, gsd_m, patch_size, stack[:3].contiguous(), frac.contiguous(), len(boxes))


def _even_splits(n: int, max_len: int) -> list[slice]:
    """Split ``range(n)`` into ``ceil(n / max_len)`` contiguous parts of near-equal length."""
    parts = max(1, math.ceil(n / max_len))
    edges = [round(i * n / parts) for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


@torch.inference_mode()
def patch_features(backbone: nn.Module, image: Tensor, *, normalization: str = "sat493m", chip_px: int = 224,
                   device: torch.device | str | None = None, batch_size: int = 16) -> Tensor:
    """Frozen patch features ``[H/p, W/p, D]`` of ``image [3, H, W]`` (``[0, 1]``, ``H, W`` multiples of ``p``).

    The patch grid is split into near-equal chips of at most ``chip_px`` pixels; chips of the same shape are batched.
    ``backbone.forward_features(x)["x_norm_patchtokens"]`` must return ``[B, h·w, D]`` for ``x [B, 3, h·p, w·p]``."""
    p = int(backbone.patch_size)
    dev = torch.device(device) if device is not None else next(backbone.parameters(), torch.empty(0)).device
    gh, gw = image.shape[-2] // p, image.shape[-1] // p
    max_len = max(1, chip_px // p)
    chips = [(r, c) for r in _even_splits(gh, max_len) for c in _even_splits(gw, max_len)]
    by_shape: dict[tuple[int, int], list[tuple[slice, slice]]] = {}
    for r, c in chips:
        by_shape.setdefault((r.stop - r.start, c.stop - c.start), []).append((r, c))
    out: Tensor | None = None
    for (h, w), group in by_shape.items():
        for i in range(0, len(group), batch_size):
            part = group[i : i + batch_size]
            x = torch.stack([image[:, r.start * p : r.stop * p, c.start * p : c.stop * p] for r, c in part])
            x = normalize(x.to(dev), normalization)
            feats = backbone.forward_features(x)["x_norm_patchtokens"].float()
            feats = feats.reshape(len(part), h, w, -1).cpu()
            if out is None:
                out = torch.empty(gh, gw, feats.shape[-1])
            for (r, c), f in zip(part, feats):
                out[r, c] = f
    assert out is not None
    return out


class PatchColourBaseline(nn.Module):
    """Backbone stand-in: each patch's feature is its mean (normalised) RGB, ``[B, N, 3]``; no parameters that learn.
    A colour-only reference for the crown probe."""

    def __init__(self, patch_size: int = 16):
        super().__init__()
        self.patch_size = patch_size

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        pooled = F.avg_pool2d(x, self.patch_size)  # [B, 3, h, w]
        return {"x_norm_patchtokens": pooled.flatten(2).transpose(1, 2)}


def _split_rows(n_rows: int, guard: int = 2) -> tuple[slice, slice]:
    """Top-half / bottom-half patch-row slices with ``guard`` rows dropped between them."""
    mid = n_rows // 2
    lo, hi = guard // 2, guard - guard // 2
    return slice(0, max(mid - lo, 1)), slice(min(mid + hi, n_rows - 1), n_rows)


def crown_probe(backbone: nn.Module, *, normalization: str = "sat493m", device: torch.device | str | None = None,
                seed: int = 0, split: str = "region", gsd_m: float = DEFAULT_GSD_M, chip_px: int = 224,
                C: float = PROBE_C, classifier: str = "logreg", k: int = KNN_K) -> dict[str, Any]:
    """Fit a linear probe (``classifier="logreg"``) or run a weighted k-NN vote (``"knn"``, ``k`` neighbours) for
    "patch is ≥ 50 % tree crown" on frozen patch features; score it on held-out regions (``split="region"``: bottom
    halves of all scenes) or images (``split="image"``: yell2, osbs, sjer).

    ``backbone`` has ``patch_size`` and ``forward_features(x) -> {"x_norm_patchtokens": [B, N, D]}`` (e.g.
    :class:`eo_dinov3.models.vision_transformer.DinoVisionTransformer`); it runs in eval mode without gradients and
    its train/eval mode is restored afterwards. ``device``: where to run it (default: where its parameters are).

    Returns ``balanced_accuracy`` and ``auc`` (pooled test patches), ``per_image`` ({scene: {auc,
    balanced_accuracy, n_patches, positive_fraction}} on its test part), ``n_train_patches``, ``n_test_patches``,
    ``train_positive_fraction``, ``test_positive_fraction``, ``feature_dim``, ``split``, ``gsd_m``, ``classifier``,
    ``C`` (logreg) or ``k`` (knn), ``seconds``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    if split not in ("region", "image"):
        raise ValueError(f"split must be 'region' or 'image', got {split!r}")
    if classifier not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {classifier!r}")
    t0 = time.perf_counter()
    p = int(backbone.patch_size)
    scenes = [load_scene(k, gsd_m, p) for k in SCENES]
    was_training = backbone.training
    backbone.eval()
    try:
        feats = [patch_features(backbone, s.image, normalization=normalization, chip_px=chip_px, device=device)
                 for s in scenes]
    finally:
        backbone.train(was_training)

    train_x, train_y, test_x, test_y, test_keys = [], [], [], [], []
    for s, f in zip(scenes, feats):
        y = s.labels
        if split == "region":
            top, bottom = _split_rows(y.shape[0])
            parts = [(top, True), (bottom, False)]
        else:
            parts = [(slice(None), s.key in TRAIN_SCENES)]
        for rows, is_train in parts:
            x_part = f[rows].reshape(-1, f.shape[-1]).double().numpy()
            y_part = y[rows].reshape(-1).numpy()
            if is_train:
                train_x.append(x_part)
                train_y.append(y_part)
            else:
                test_x.append(x_part)
                test_y.append(y_part)
                test_keys.append(s.key)
    x_tr, y_tr = np.concatenate(train_x), np.concatenate(train_y)
    x_te, y_te = np.concatenate(test_x), np.concatenate(test_y)
    for name, y in (("training", y_tr), ("test", y_te)):
        if y.min() == y.max():
            raise DataError(f"the crown probe's {name} patches are all one class at {gsd_m} m GSD; use a finer gsd_m")
    if classifier == "knn":
        score = knn_scores(torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), k=k).numpy()
        pred = (score >= y_tr.mean()).astype(np.int64)
    else:
        mu, sd = x_tr.mean(0), x_tr.std(0)
        sd[sd < 1e-6] = 1.0
        x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd
        clf = LogisticRegression(C=C, class_weight="balanced", max_iter=2000, random_state=seed)
        clf.fit(x_tr, y_tr)
        score = clf.predict_proba(x_te)[:, 1]
        pred = (score >= 0.5).astype(np.int64)
    per_image: dict[str, dict[str, float]] = {}
    start = 0
    for key, y_part in zip(test_keys, test_y):
        n = y_part.size
        sl = slice(start, start + n)
        start += n
        both = 0 < y_part.sum() < n
        per_image[key] = {
            "n_patches": int(n),
            "positive_fraction": float(y_part.mean()),
            "auc": float(roc_auc_score(y_part, score[sl])) if both else float("nan"),
            "balanced_accuracy": float(balanced_accuracy_score(y_part, pred[sl])) if both else float("nan"),
        }
    return {
        "balanced_accuracy": float(balanced_accuracy_score(y_te, pred)),
        "auc": float(roc_auc_score(y_te, score)),
        "per_image": per_image,
        "n_train_patches": int(y_tr.size),
        "n_test_patches": int(y_te.size),
        "train_positive_fraction": float(y_tr.mean()),
        "test_positive_fraction": float(y_te.mean()),
        "feature_dim": int(x_tr.shape[1]),
        "split": split,
        "gsd_m": gsd_m,
        "classifier": classifier,
        **({"k": min(int(k), int(y_tr.size))} if classifier == "knn" else {"C": C}),
        "seconds": time.perf_counter() - t0,
    }
