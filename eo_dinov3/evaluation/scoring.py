"""GEO-Bench scoring: per-task metrics with bootstrap CIs, min–max normalisation, IQM aggregates.

Reproduces the official aggregation (``geobench/plot_tools.py``, also used by the GEO-Bench-2 leaderboard):

* normalise each (task, seed) score: ``(score − min_task) / (max_task − min_task)`` with ``normalizer.json``;
* IQM = ``scipy.stats.trim_mean(scores, 0.25)`` (drop ``int(0.25·n)`` values at each end of the sorted scores);
* per task: bootstrap the seeds (``repeat`` draws of ``n`` seeds with replacement, IQM of each);
* aggregate: *stratified* bootstrap — resample seeds with replacement within each task, pool all tasks, IQM.

The official code draws from numpy's global ``RandomState`` group by group in pandas ``groupby`` order (sorted
keys), repetition by repetition. :func:`bootstrap_iqm_per_task` and :func:`bootstrap_iqm_aggregate` draw in exactly
that order from a ``RandomState(seed)``, so after ``np.random.seed(seed)`` the official functions return the same
bootstrap samples (checked in ``tests/test_geobench_scoring.py`` when ``geobench`` is importable).

Test-set metrics: accuracy, micro-F1 @ 0.5 and micro-mAP (multi-label), mIoU over classes present in ground truth
∪ prediction (optionally without class 0), each with a 95 % percentile CI from bootstrapping test samples.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

# ------------------------------------------------------------------------------------------------ IQM


def iqm(scores: Sequence[float] | np.ndarray) -> float:
    """Interquartile mean, identical to ``scipy.stats.trim_mean(scores, proportiontocut=0.25)``."""
    a = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))
    n = a.size
    if n == 0:
        return float("nan")
    cut = int(0.25 * n)
    return float(a[cut : n - cut].mean())


def normalize_score(task: str, value: float, normalizer: Mapping[str, tuple[float, float]]) -> float:
    """``(value − min) / (max − min)`` for ``task`` (official ``Normalizer.__call__``)."""
    lo, hi = normalizer[task]
    return (value - lo) / (hi - lo)


def bootstrap_iqm_per_task(groups: Mapping[str, Sequence[float]], repeat: int = 100, seed: int = 0,
                           rng: np.random.RandomState | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """Official ``bootstrap_iqm``: for each repetition, for each group (sorted by key), IQM of ``n`` scores drawn
    with replacement. ``groups``: key -> scores in input order. Returns key -> ``[repeat]`` bootstrap IQMs."""
    rs = rng if rng is not None else np.random.RandomState(seed)
    keys = sorted(groups)
    arrays = {k: np.asarray(groups[k], dtype=np.float64) for k in keys}
    out = {k: np.empty(repeat) for k in keys}
    for r in range(repeat):
        for k in keys:
            a = arrays[k]
            out[k][r] = iqm(rs.choice(a, size=len(a), replace=True))
    return out


def bootstrap_iqm_aggregate(groups: Mapping[str, Sequence[float]], repeat: int = 100, seed: int = 0,
                            rng: np.random.RandomState | None = None) -> np.ndarray:  # fmt: skip
    """Official ``bootstrap_iqm_aggregate`` for one model/partition: per repetition, resample each task's seeds with
    replacement (tasks in sorted order), pool, IQM. Returns ``[repeat]``."""
    rs = rng if rng is not None else np.random.RandomState(seed)
    keys = sorted(groups)
    arrays = [np.asarray(groups[k], dtype=np.float64) for k in keys]
    out = np.empty(repeat)
    for r in range(repeat):
        pooled = [a[rs.choice(len(a), size=len(a), replace=True)] for a in arrays]
        out[r] = iqm(np.concatenate(pooled))
    return out


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    a = (1 - level) / 2 * 100
    return float(np.percentile(samples, a)), float(np.percentile(samples, 100 - a))


def aggregate_suite(per_task_seed_scores: Mapping[str, Sequence[float]],
                    normalizer: Mapping[str, tuple[float, float]] | None, repeat: int = 1000,
                    seed: int = 0) -> dict:  # fmt: skip
    """Suite summary from ``task -> per-seed scores`` (raw metric, 0–1): plain mean of per-task means (what the
    DINOv3 tables report), and — when every task has a normaliser entry — the normalised IQM with its stratified
    bootstrap 95 % CI and the per-task normalised IQM with its seed-bootstrap CI."""
    tasks = sorted(per_task_seed_scores)
    out: dict = {"tasks": tasks, "mean": float(np.mean([np.mean(per_task_seed_scores[t]) for t in tasks]))}
    if normalizer is None or not all(t in normalizer for t in tasks):
        missing = [t for t in tasks if normalizer is None or t not in normalizer]
        out["normalized"] = None
        out["normalizer_missing"] = missing
        return out
    norm = {t: [normalize_score(t, v, normalizer) for v in per_task_seed_scores[t]] for t in tasks}
    agg = bootstrap_iqm_aggregate(norm, repeat=repeat, seed=seed)
    per = bootstrap_iqm_per_task(norm, repeat=repeat, seed=seed + 1)
    lo, hi = percentile_ci(agg)
    out["normalized"] = {
        "iqm": iqm(np.concatenate([np.asarray(norm[t]) for t in tasks])),
        "ci_low": lo,
        "ci_high": hi,
        "n_boot": repeat,
        "per_task": {t: {"iqm": iqm(norm[t]), "ci_low": percentile_ci(per[t])[0], "ci_high": percentile_ci(per[t])[1]}
                     for t in tasks},  # fmt: skip
    }
    return out


# ------------------------------------------------------------------------------------------------ test metrics


def accuracy(scores: np.ndarray, y: np.ndarray) -> float:
    return float((scores.argmax(1) == y).mean()) if len(y) else float("nan")


def multilabel_counts(scores: np.ndarray, y: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Per-sample ``[N, 3]`` (TP, FP, FN) for probabilities ``scores [N, K]`` thresholded at ``threshold``."""
    pred = scores >= threshold
    t = y.astype(bool)
    return np.stack([(pred & t).sum(1), (pred & ~t).sum(1), (~pred & t).sum(1)], 1).astype(np.float64)


def micro_f1_from_counts(c: np.ndarray) -> float:
    tp, fp, fn = c[..., 0], c[..., 1], c[..., 2]
    den = 2 * tp + fp + fn
    return np.where(den > 0, 2 * tp / np.maximum(den, 1e-12), 0.0)


def micro_f1(scores: np.ndarray, y: np.ndarray, threshold: float = 0.5) -> float:
    return float(micro_f1_from_counts(multilabel_counts(scores, y, threshold).sum(0)))


def micro_map(scores: np.ndarray, y: np.ndarray) -> float:
    """Micro-averaged average precision (all (sample, label) pairs pooled), as sklearn ``average="micro"``."""
    s = scores.reshape(-1)
    t = y.reshape(-1).astype(bool)
    if not t.any():
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, t = s[order], t[order]
    # precision at each distinct threshold (ties grouped, as sklearn)
    distinct = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tps = np.cumsum(t)[distinct]
    fps = (distinct + 1) - tps
    precision = tps / (tps + fps)
    recall = tps / t.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def confusion(pred: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """``[C, C]`` confusion (rows = ground truth) of integer maps of any shape."""
    idx = y.reshape(-1).astype(np.int64) * n_classes + pred.reshape(-1).astype(np.int64)
    return np.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def miou_from_confusion(cm: np.ndarray, exclude: Sequence[int] = ()) -> np.ndarray:
    """mIoU of ``[..., C, C]`` confusions over classes present in GT ∪ prediction, minus ``exclude``."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1).astype(np.float64)
    union = cm.sum(-1) + cm.sum(-2) - tp
    valid = union > 0
    if exclude:
        valid[..., list(exclude)] = False
    iou = np.where(valid, tp / np.maximum(union, 1), 0.0)
    return iou.sum(-1) / np.maximum(valid.sum(-1), 1)


def bootstrap_ci(stat: Callable[[np.ndarray], np.ndarray], n: int, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:  # fmt: skip
    """Percentile CI of ``stat(idx)`` over ``n_boot`` resamples of ``n`` test samples (``idx [n_boot, n]``;
    ``stat`` must be vectorised over the first axis)."""
    if n == 0:
        return float("nan"), float("nan")
    rs = np.random.RandomState(seed)
    idx = rs.randint(0, n, size=(n_boot, n))
    return percentile_ci(np.asarray(stat(idx), dtype=np.float64), level)


def classification_metrics(scores: np.ndarray, y: np.ndarray, *, multilabel: bool, n_boot: int = 1000,
                           seed: int = 0) -> dict[str, tuple[float, float, float]]:  # fmt: skip
    """``metric -> (value, ci_low, ci_high)``: ``accuracy`` (single-label) or ``micro_f1`` and ``micro_map``."""
    if not multilabel:
        correct = (scores.argmax(1) == y).astype(np.float64)
        return {"accuracy": (float(correct.mean()), *bootstrap_ci(lambda i: correct[i].mean(1), len(y), n_boot, seed))}
    counts = multilabel_counts(scores, y)
    f1 = (float(micro_f1_from_counts(counts.sum(0))),
          *bootstrap_ci(lambda i: micro_f1_from_counts(counts[i].sum(1)), len(y), n_boot, seed))  # fmt: skip
    nb_map = min(n_boot, 200)  # mAP needs a sort per resample
    mp = (micro_map(scores, y),
          *bootstrap_ci(lambda i: np.array([micro_map(scores[r], y[r]) for r in i]), len(y), nb_map, seed))  # fmt: skip
    return {"micro_f1": f1, "micro_map": mp}


def segmentation_metrics(per_image_cm: np.ndarray, *, with_excl0: bool, n_boot: int = 1000,
                         seed: int = 0) -> dict[str, tuple[float, float, float]]:  # fmt: skip
    """``miou`` (all classes) and optionally ``miou_excl0`` from per-image confusions ``[N, C, C]``."""
    n = per_image_cm.shape[0]
    total = per_image_cm.sum(0)
    out = {"miou": (float(miou_from_confusion(total)),
                    *bootstrap_ci(lambda i: miou_from_confusion(per_image_cm[i].sum(1)), n, n_boot, seed))}  # fmt: skip
    if with_excl0:
        out["miou_excl0"] = (float(miou_from_confusion(total, exclude=(0,))),
                             *bootstrap_ci(lambda i: miou_from_confusion(per_image_cm[i].sum(1), exclude=(0,)), n,
                                           n_boot, seed))  # fmt: skip
    return out
