"""Balanced hierarchical sampling from a :class:`~eo_dinov3.data.curation.hierarchy.Hierarchy`.

To draw ``n`` embeddings: split ``n`` over the top-level clusters as evenly as their sizes allow
(:func:`fair_shares`: every cluster gets ``min(size, cap)`` with the largest ``cap`` that fits, the remainder
goes one by one to randomly chosen clusters above the cap), then split each cluster's share over its children the
same way, down to the leaf clusters, from which the points are drawn (``"random"``, or ``"closest"`` to the leaf
centroid). A land-cover type that fills 90 % of an archive but forms one top-level cluster therefore ends with
about ``n / k_top`` tiles.
"""

from __future__ import annotations

import numpy as np

from eo_dinov3.data.curation.hierarchy import Hierarchy
from eo_dinov3.data.manifest import derive_seed
from eo_dinov3.errors import ConfigError


def fair_shares(capacity: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Split ``target`` items over bins of ``capacity [m]`` as evenly as possible: ``[m]`` int64 with
    ``shares <= capacity``, ``shares.sum() == min(target, capacity.sum())`` and ``max - min <= 1`` among bins
    that are not full."""
    capacity = np.asarray(capacity, dtype=np.int64)
    target = int(target)
    if target < 0:
        raise ValueError("target must be >= 0")
    if capacity.sum() <= target:
        return capacity.copy()
    lo, hi = 0, int(capacity.max())  # largest cap with sum(min(cap, capacity)) <= target
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if np.minimum(capacity, mid).sum() <= target:
            lo = mid
        else:
            hi = mid - 1
    shares = np.minimum(capacity, lo)
    rest = target - int(shares.sum())
    if rest:
        above = np.flatnonzero(capacity > lo)
        shares[rng.choice(above, rest, replace=False)] += 1
    return shares


def _children(parents: np.ndarray, k_parent: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR of ``parents [k_child]``: ``order`` (children sorted by parent) and ``starts [k_parent + 1]``."""
    order = np.argsort(parents, kind="stable")
    starts = np.searchsorted(parents[order], np.arange(k_parent + 1))
    return order, starts


def leaf_targets(h: Hierarchy, n: int, *, seed: int = 0, mask: np.ndarray | None = None) -> np.ndarray:
    """Number of points to draw from every leaf cluster, ``[k_0]`` int64 (sums to ``min(n, eligible)``).

    ``mask [N]`` bool: eligible embeddings (e.g. not near-duplicates, not already retrieved)."""
    rng = np.random.Generator(np.random.PCG64(derive_seed(seed, 0xBA1)))
    sizes = [h.sizes(0, mask)]
    for lv in range(1, h.n_levels):
        sizes.append(np.bincount(h.parents[lv], weights=sizes[-1],
                                 minlength=h.centroids[lv].shape[0]).astype(np.int64))
    targets = fair_shares(sizes[-1], n, rng)
    for lv in range(h.n_levels - 1, 0, -1):  # split the shares of level lv over its children at level lv-1
        order, starts = _children(h.parents[lv], h.centroids[lv].shape[0])
        child = np.zeros(h.centroids[lv - 1].shape[0], np.int64)
        for c in np.flatnonzero(targets):
            kids = order[starts[c]:starts[c + 1]]
            child[kids] = fair_shares(sizes[lv - 1][kids], int(targets[c]), rng)
        targets = child
    return targets


def balanced_sample(h: Hierarchy, n: int, *, seed: int = 0, strategy: str = "random",
                    mask: np.ndarray | None = None) -> np.ndarray:
    """Positions (``[≤ n]`` int64, sorted) of a balanced sample of ``n`` embeddings (module docstring).

    ``strategy``: ``"random"`` draws uniformly inside each leaf cluster, ``"closest"`` takes the points nearest to
    the leaf centroid. Deterministic given ``seed``.
    """
    if strategy not in ("random", "closest"):
        raise ConfigError(f"sampling strategy must be 'random' or 'closest', not {strategy!r}")
    targets = leaf_targets(h, n, seed=seed, mask=mask)
    leaves = h.parents[0]
    if strategy == "random":
        key = np.random.Generator(np.random.PCG64(derive_seed(seed, 0x5A3))).random(len(leaves))
    else:
        key = h.dist2.astype(np.float64)
    if mask is not None:
        key = np.where(mask, key, np.inf)  # ineligible points sort last and are never reached (targets fit)
    order = np.lexsort((key, leaves))
    lab_sorted = leaves[order]
    starts = np.searchsorted(lab_sorted, np.arange(h.centroids[0].shape[0]))
    rank = np.arange(len(order)) - starts[lab_sorted]
    return np.sort(order[rank < targets[lab_sorted]])
