"""Near-duplicate removal by cosine threshold, within leaf clusters.

Near duplicates (overlapping tiles, repeated acquisitions of the same place, blank/cloud tiles) are close in
embedding space, hence in the same leaf cluster. Inside each leaf, points are visited in a fixed priority order
(closest to the centroid first); a point is a duplicate when an *earlier* point of its leaf has cosine similarity
``>= threshold`` (SemDeDup-style rule: decided by one vectorised pass, no sequential greedy loop). Cost per leaf of
``m`` points: ``m² D / 2`` multiply-adds in ``[block, m]`` blocks, so leaves should stay below ~10^5 points (use
more level-1 clusters for bigger archives).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from eo_dinov3.data.curation.kmeans import single_thread_if_small
from eo_dinov3.data.curation.store import as_rows


def near_duplicates(data, groups: np.ndarray, threshold: float, *, priority: np.ndarray | None = None,
                    device: torch.device | str = "cpu", block_rows: int = 4096) -> np.ndarray:
    """``[N]`` bool, True for rows that duplicate an earlier row of the same group (module docstring).

    Args:
        data: ``[N, D]`` rows (array or store).
        groups: ``[N]`` int group of each row (leaf cluster).
        threshold: cosine similarity at or above which two rows are duplicates (e.g. 0.98).
        priority: ``[N]`` sort key inside a group, smallest kept first (default: position).
    """
    src = as_rows(data)
    device = torch.device(device)
    n = src.num_rows
    groups = np.asarray(groups)
    priority = np.arange(n) if priority is None else np.asarray(priority)
    order = np.lexsort((np.arange(n), priority, groups))
    g_sorted = groups[order]
    bounds = np.flatnonzero(np.diff(g_sorted)) + 1
    dup = np.zeros(n, bool)
    for seg in np.split(order, bounds):
        if len(seg) < 2:
            continue
        e = F.normalize(torch.from_numpy(src.take(seg)).to(device), dim=1)
        is_dup = torch.zeros(len(seg), dtype=torch.bool, device=device)
        with single_thread_if_small(device, float(len(seg)) ** 2 * e.shape[1]):  # leaves are small: no thread pool
            for s in range(1, len(seg), block_rows):
                blk = e[s:s + block_rows]
                sim = blk @ e[:s + len(blk)].T  # [b, s + b]: earlier rows of the group, and the block itself
                later = torch.arange(s + len(blk), device=device)[None, :] >= torch.arange(
                    s, s + len(blk), device=device)[:, None]
                sim.masked_fill_(later, -2.0)
                is_dup[s:s + len(blk)] = sim.max(1).values >= threshold
        dup[seg] = is_dup.cpu().numpy()
    return dup
