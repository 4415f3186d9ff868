"""Retrieval: the tiles of an archive most similar to a seed set (e.g. forest tiles of one region).

The score of an archive embedding ``x`` is ``max_j cos(x, q_j)`` over the seed embeddings ``q [S, D]`` (all vectors
are L2-normalised, so cosine = dot product). The whole archive is scored chunk by chunk (``[N]`` float32 scores
kept in memory, 4 bytes per tile) and the ``k`` best eligible tiles are returned.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from eo_dinov3.data.curation.store import as_rows


def seed_scores(data, queries: np.ndarray, *, device: torch.device | str = "cpu",
                chunk_rows: int = 65_536) -> np.ndarray:
    """``[N]`` float32: maximum cosine similarity of every row of ``data`` to the rows of ``queries [S, D]``."""
    src = as_rows(data)
    device = torch.device(device)
    q = F.normalize(torch.as_tensor(np.asarray(queries), dtype=torch.float32), dim=1).to(device)
    out = np.empty(src.num_rows, np.float32)
    rows = max(1, min(chunk_rows, (1 << 25) // max(1, q.shape[0])))
    for s, x in src.iter_chunks(rows):
        xt = F.normalize(torch.from_numpy(np.ascontiguousarray(x)).to(device), dim=1)
        out[s:s + len(x)] = (xt @ q.T).max(1).values.cpu().numpy()
    return out


def retrieve_nearest(data, queries: np.ndarray, k: int, *, mask: np.ndarray | None = None,
                     device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows most similar to the seed set: ``(positions [≤ k] int64, scores [≤ k] float32)``, best first.

    ``mask [N]`` bool: eligible rows. Ties are broken by position (deterministic)."""
    scores = seed_scores(data, queries, device=device)
    eligible = np.flatnonzero(mask) if mask is not None else np.arange(len(scores))
    k = min(int(k), len(eligible))
    if k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    s = scores[eligible]
    order = np.lexsort((eligible, -s))[:k]
    return eligible[order].astype(np.int64), s[order]
