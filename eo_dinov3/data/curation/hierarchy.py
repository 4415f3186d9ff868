"""Hierarchical k-means with resampling steps (Vo et al. 2024, the clustering behind LVD-1689M).

Level 1 clusters the embeddings into ``k_1`` clusters; level ``l > 1`` clusters the ``k_{l-1}`` centroids of the
level below into ``k_l`` clusters (e.g. 10^4 → 10^3 → 10^2). Plain k-means puts many centroids in dense regions
(ocean, farmland …); the *resampling* steps spread them over the support of the data instead: after the initial
k-means of a level, ``n_resamples`` times

1. take at most ``sample_size`` points from each cluster (the ones closest to its centroid, or random ones),
2. run k-means (k-means++ initialisation) on the union of these samples — every cluster now weighs at most
   ``sample_size`` points, so dense regions no longer dominate — and
3. re-assign all points of the level to the new centroids.

``sample_size`` must be small relative to cluster sizes for the balancing to act (the paper uses resampling at the
upper levels, where the points are centroids; level 1 usually runs without it for cost).

Every k-means run uses greedy k-means++ seeding, and the levels above the first keep the best of
``n_init`` initialisations (default :data:`UPPER_LEVEL_N_INIT`). Both matter for balance: k-means on wide, high-
dimensional modes leaves tiny leaf clusters whose centroids are single noisy embeddings, so a dominant type reaches
the upper levels as a scattered cloud of points while a rare type is a handful of tight ones. One plain k-means++
run there tends to spend two or three centres on the cloud and merge two rare types into one cluster, which the
balanced sampler then treats as one (issue #8: a type holding 90 % of 100 000 embeddings kept 25 % of a 3-level
balanced sample instead of its fair 10 %).

A :class:`Hierarchy` stores, per level, the centroids and the parent of every element of the level below
(``parents[0]``: leaf cluster of every embedding), so the cluster of a point at any level is a composition of
look-ups.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from eo_dinov3.data.curation.kmeans import DEFAULT_RESIDENT_BYTES, assign, kmeans
from eo_dinov3.data.curation.store import as_rows
from eo_dinov3.data.manifest import derive_seed
from eo_dinov3.errors import ConfigError

log = logging.getLogger(__name__)

#: default k-means initialisations on the levels above the first (the reference code's ``num_init`` default)
UPPER_LEVEL_N_INIT = 10
#: bumped when the clustering of the same settings changes (2: greedy k-means++, ``n_init`` on upper levels), so
#: the pipeline does not reuse a hierarchy made by an older version
ALGORITHM_VERSION = 2


@dataclass(frozen=True)
class LevelConfig:
    """One level of the hierarchy.

    Attributes:
        n_clusters: ``k`` of the level.
        n_resamples: resampling steps after the initial k-means (0 = plain k-means).
        sample_size: points taken from each cluster in a resampling step.
        sample_strategy: ``"closest"`` (to the centroid) or ``"random"``.
        n_init: k-means initialisations per k-means run of the level (the lowest inertia wins); ``None``: 1 on
            the first level (the embeddings: the costly one), :data:`UPPER_LEVEL_N_INIT` on the levels above
            (they cluster centroids, so restarts are cheap, and a single k-means++ run there often merges two
            small modes while splitting a scattered dense one).
    """

    n_clusters: int
    n_resamples: int = 0
    sample_size: int = 0
    sample_strategy: str = "closest"
    n_init: int | None = None

    def __post_init__(self) -> None:
        if self.n_clusters < 1:
            raise ConfigError(f"n_clusters must be >= 1, got {self.n_clusters}")
        if self.sample_strategy not in ("closest", "random"):
            raise ConfigError(f"sample_strategy must be 'closest' or 'random', not {self.sample_strategy!r}")
        if self.n_init is not None and self.n_init < 1:
            raise ConfigError(f"n_init must be >= 1, got {self.n_init}")
        if self.n_resamples > 0 and self.sample_size < 1:
            raise ConfigError("n_resamples > 0 needs sample_size >= 1 (points per cluster in each resampling step)")


@dataclass
class Hierarchy:
    """Result of :func:`hierarchical_kmeans`.

    Attributes:
        centroids: per level ``l`` (0-based), ``[k_l, D]`` float32.
        parents: ``parents[0]``: ``[N]`` leaf cluster of every embedding; ``parents[l]``: ``[k_{l-1}]`` cluster at
            level ``l`` of every cluster of level ``l-1``.
        dist2: ``[N]`` squared L2 distance of every embedding to its leaf centroid.
    """

    centroids: list[np.ndarray]
    parents: list[np.ndarray]
    dist2: np.ndarray

    @property
    def n_levels(self) -> int:
        return len(self.centroids)

    @property
    def num_points(self) -> int:
        return int(self.parents[0].shape[0])

    def labels(self, level: int) -> np.ndarray:
        """Cluster of every embedding at ``level`` (0 = leaves), ``[N]`` int64."""
        lab = self.parents[0]
        for lv in range(1, level + 1):
            lab = self.parents[lv][lab]
        return lab

    def sizes(self, level: int, mask: np.ndarray | None = None) -> np.ndarray:
        """Number of embeddings (where ``mask``, if given) in each cluster of ``level``, ``[k_level]``."""
        lab = self.labels(level) if mask is None else self.labels(level)[mask]
        return np.bincount(lab, minlength=self.centroids[level].shape[0])

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"dist2": self.dist2}
        for lv, (c, p) in enumerate(zip(self.centroids, self.parents)):
            arrays[f"centroids_{lv}"], arrays[f"parents_{lv}"] = c, p
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
        np.savez(tmp, n_levels=np.int64(self.n_levels), **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Hierarchy":
        with np.load(path) as z:
            n = int(z["n_levels"])
            return cls([z[f"centroids_{lv}"] for lv in range(n)], [z[f"parents_{lv}"] for lv in range(n)],
                       z["dist2"])


def _resample_indices(labels: np.ndarray, key: np.ndarray, k: int, sample_size: int) -> np.ndarray:
    """At most ``sample_size`` indices per cluster: those with the smallest ``key`` (sorted by cluster, key)."""
    order = np.lexsort((key, labels))
    lab_sorted = labels[order]
    starts = np.searchsorted(lab_sorted, np.arange(k))
    rank = np.arange(len(order)) - starts[lab_sorted]
    return np.sort(order[rank < sample_size])


def kmeans_with_resampling(data, cfg: LevelConfig, *, n_iters: int, seed: int, device: torch.device | str,
                           chunk_rows: int | None = None,
                           resident_bytes: int = DEFAULT_RESIDENT_BYTES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One level: k-means then ``cfg.n_resamples`` resampling steps, every k-means run keeping the best of
    ``cfg.n_init`` initialisations (``None`` here: 1; :func:`hierarchical_kmeans` resolves it per level). Returns
    ``(centroids [k, D], labels [N], dist2 [N])``."""
    src = as_rows(data)
    k = min(cfg.n_clusters, src.num_rows)
    if k < cfg.n_clusters:
        log.warning("only %d rows for %d clusters: using k=%d", src.num_rows, cfg.n_clusters, k)
    res = kmeans(src, k, n_iters=n_iters, seed=derive_seed(seed, 0), device=device, chunk_rows=chunk_rows,
                 resident_bytes=resident_bytes, n_init=cfg.n_init or 1)
    centroids, labels, dist2 = res.centroids, res.labels, res.dist2
    rng = np.random.Generator(np.random.PCG64(derive_seed(seed, 0x5A)))
    for step in range(1, cfg.n_resamples + 1):
        key = dist2 if cfg.sample_strategy == "closest" else rng.random(len(labels))
        idx = _resample_indices(labels, key, k, cfg.sample_size)
        sample = src.take(idx)
        k_step = min(k, len(idx))
        sub = kmeans(sample, k_step, n_iters=n_iters, seed=derive_seed(seed, step), device=device,
                     chunk_rows=chunk_rows, resident_bytes=resident_bytes, n_init=cfg.n_init or 1)
        centroids = sub.centroids
        labels, dist2 = assign(src, centroids, device=device, chunk_rows=chunk_rows, resident_bytes=resident_bytes)
        log.info("resampling step %d/%d: %d sampled points, largest cluster %d", step, cfg.n_resamples, len(idx),
                 int(np.bincount(labels).max()))
    return centroids, labels, dist2


def hierarchical_kmeans(data, levels: list[LevelConfig], *, n_iters: int = 20, seed: int = 0,
                        device: torch.device | str = "cpu", chunk_rows: int | None = None,
                        resident_bytes: int = DEFAULT_RESIDENT_BYTES) -> Hierarchy:
    """Cluster ``data [N, D]`` (array, tensor or :class:`~eo_dinov3.data.curation.store.EmbeddingStore`) into the
    hierarchy ``levels`` (bottom first: ``levels[0]`` has the most clusters). Deterministic given ``seed`` (CPU)."""
    if not levels:
        raise ConfigError("hierarchical k-means needs at least one level")
    ks = [lv.n_clusters for lv in levels]
    if any(a < b for a, b in zip(ks, ks[1:])):
        raise ConfigError(f"cluster counts must not grow with the level (bottom first), got {ks}")
    centroids, parents, dist2 = [], [], None
    x = as_rows(data)
    for lv, cfg in enumerate(levels):
        t0 = time.perf_counter()
        if cfg.n_init is None:
            cfg = replace(cfg, n_init=1 if lv == 0 else UPPER_LEVEL_N_INIT)
        c, lab, d2 = kmeans_with_resampling(x, cfg, n_iters=n_iters, seed=derive_seed(seed, lv), device=device,
                                            chunk_rows=chunk_rows, resident_bytes=resident_bytes)
        centroids.append(c)
        parents.append(lab)
        if lv == 0:
            dist2 = d2
        log.info("level %d: %d clusters in %.1f s", lv + 1, c.shape[0], time.perf_counter() - t0)
        x = c
    return Hierarchy(centroids, parents, dist2)


def levels_from_config(items: list[dict]) -> list[LevelConfig]:
    """``[{n_clusters: 1000, n_resamples: 0, …}, …]`` → :class:`LevelConfig` list (ConfigError on bad keys)."""
    out = []
    for i, it in enumerate(items):
        try:
            out.append(LevelConfig(**dict(it)))
        except TypeError as e:
            raise ConfigError(f"cluster.levels[{i}]: {e}; keys: {list(LevelConfig.__dataclass_fields__)}") from None
    return out


def describe(levels: list[LevelConfig]) -> str:
    return json.dumps([asdict(lv) for lv in levels])
