"""Chunked k-means in torch (CPU or CUDA) with exact k-means++ initialisation; deterministic given a seed.

Data are rows ``[N, D]`` read chunk by chunk (:class:`~eo_dinov3.data.curation.store.EmbeddingStore` or
:class:`~eo_dinov3.data.curation.store.ArrayRows`). When ``N × D × 4`` bytes fit in ``resident_bytes`` the rows are
copied to the device once (fast path); otherwise every pass streams the memory-mapped shards, so peak memory is one
chunk of rows plus one ``[chunk_rows, k]`` distance block (``chunk_rows`` defaults to ``2^25 / max(k, D)``, i.e.
≈ 128 MiB of float32) plus the ``[N]`` label/distance arrays.

Squared L2 distances ``|x|² - 2 x·c + |c|²`` are computed in float32 (TF32 disabled), centroid sums are accumulated
in float64. k-means++ (Arthur & Vassilvitskii 2007) is *exact*: each new centre is drawn with probability
proportional to the squared distance of every point to its nearest chosen centre (``k`` passes over the data).
Randomness comes only from a ``torch.Generator`` seeded with ``seed`` (on CPU), so CPU results are bit-reproducible;
on CUDA, atomic float64 sums may change the last bits.
Empty clusters keep their previous centre.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from eo_dinov3.data.curation.store import as_rows

log = logging.getLogger(__name__)

DEFAULT_RESIDENT_BYTES = 4 << 30


@dataclass
class KMeansResult:
    """Output of :func:`kmeans`.

    Attributes:
        centroids: ``[k, D]`` float32.
        labels: ``[N]`` int64, nearest centroid of each row.
        dist2: ``[N]`` float32, squared L2 distance of each row to its centroid.
        inertia: sum of ``dist2`` (float64).
        n_iters: Lloyd iterations run.
    """

    centroids: np.ndarray
    labels: np.ndarray
    dist2: np.ndarray
    inertia: float
    n_iters: int


class _Rows:
    """Chunked access to the data on ``device`` (resident copy when small enough)."""

    def __init__(self, data, device: torch.device, chunk_rows: int, resident_bytes: int) -> None:
        self.src = as_rows(data)
        self.n, self.d = self.src.num_rows, self.src.dim
        self.device, self.chunk_rows = device, max(1, int(chunk_rows))
        self.resident: torch.Tensor | None = None
        if self.n * self.d * 4 <= resident_bytes:
            parts = [torch.from_numpy(np.ascontiguousarray(c)) for _, c in self.src.iter_chunks(1 << 20)]
            self.resident = torch.cat(parts).to(device) if parts else torch.zeros(0, self.d, device=device)
            self.resident_sq = (self.resident * self.resident).sum(1)

    def chunks(self):
        """``(start, x [n, D], |x|² [n])`` on the device."""
        if self.resident is not None:
            for s in range(0, self.n, self.chunk_rows):
                yield s, self.resident[s:s + self.chunk_rows], self.resident_sq[s:s + self.chunk_rows]
        else:
            for s, c in self.src.iter_chunks(self.chunk_rows):
                x = torch.from_numpy(np.ascontiguousarray(c)).to(self.device, non_blocking=True)
                yield s, x, (x * x).sum(1)

    def row(self, i: int) -> torch.Tensor:
        if self.resident is not None:
            return self.resident[i]
        return torch.from_numpy(self.src.row(i)).to(self.device)


def default_chunk_rows(k: int, dim: int) -> int:
    """Rows per distance block: ``2^25 / max(k, dim)`` (≈128 MiB of float32)."""
    return max(256, (1 << 25) // max(k, dim, 1))


def sq_dist(x: torch.Tensor, c: torch.Tensor, c2: torch.Tensor | None = None,
            x2: torch.Tensor | None = None) -> torch.Tensor:
    """Squared L2 distances ``[n, k]`` between rows ``x [n, D]`` and centres ``c [k, D]`` (float32, ≥ 0);
    ``c2 [k]`` / ``x2 [n]``: precomputed squared norms."""
    c2 = (c * c).sum(1) if c2 is None else c2
    x2 = (x * x).sum(1) if x2 is None else x2
    d = torch.addmm(x2[:, None] + c2[None, :], x, c.T, alpha=-2.0)
    return d.clamp_(min=0.0)


def assign(data, centroids: torch.Tensor | np.ndarray, *, device: torch.device | str = "cpu",
           chunk_rows: int | None = None, resident_bytes: int = DEFAULT_RESIDENT_BYTES,
           _rows: _Rows | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centre of every row: ``(labels [N] int64, dist2 [N] float32)``."""
    device = torch.device(device)
    c = torch.as_tensor(centroids, dtype=torch.float32).to(device)
    rows = _rows or _Rows(data, device, chunk_rows or default_chunk_rows(c.shape[0], c.shape[1]), resident_bytes)
    labels = np.empty(rows.n, np.int64)
    dist2 = np.empty(rows.n, np.float32)
    c2 = (c * c).sum(1)
    for s, x, x2 in rows.chunks():
        dmin, lab = sq_dist(x, c, c2, x2).min(1)
        labels[s:s + len(x)] = lab.cpu().numpy()
        dist2[s:s + len(x)] = dmin.cpu().numpy()
    return labels, dist2


def kmeans_plusplus(rows: _Rows, k: int, generator: torch.Generator) -> torch.Tensor:
    """Exact k-means++ seeding: ``[k, D]`` centres chosen among the rows (``k`` passes over the data)."""
    n = rows.n
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [rows.row(first).float()]
    mind = torch.empty(n, dtype=torch.float32, device=rows.device)
    for s, x, x2 in rows.chunks():
        mind[s:s + len(x)] = sq_dist(x, centres[0][None], x2=x2).squeeze(1)
    resident = rows.resident is not None
    for _ in range(1, k):
        cum = torch.cumsum(mind, 0, dtype=torch.float64)
        total = float(cum[-1])
        if total <= 0.0:  # fewer distinct points than k: pick uniformly
            idx = int(torch.randint(n, (1,), generator=generator))
        else:
            u = torch.rand(1, generator=generator, dtype=torch.float64).to(cum.device) * total
            idx = min(int(torch.searchsorted(cum, u, right=True)), n - 1)
        c = rows.row(idx).float()
        c2 = float((c * c).sum())
        if resident:  # one matrix-vector product over all rows (memory-bound: one read of the rows per centre)
            d = torch.addmv(rows.resident_sq, rows.resident, c, alpha=-2.0).add_(c2).clamp_(min=0.0)
            torch.minimum(mind, d, out=mind)
        else:
            for s, x, x2 in rows.chunks():
                d = torch.addmv(x2, x, c, alpha=-2.0).add_(c2).clamp_(min=0.0)
                torch.minimum(mind[s:s + len(x)], d, out=mind[s:s + len(x)])
        centres.append(c)
    return torch.stack(centres)


def kmeans(data, k: int, *, n_iters: int = 20, seed: int = 0, device: torch.device | str = "cpu",
           chunk_rows: int | None = None, tol: float = 1e-6, resident_bytes: int = DEFAULT_RESIDENT_BYTES,
           init: str = "kmeans++") -> KMeansResult:
    """Lloyd's k-means on rows ``data [N, D]`` (array, tensor or store).

    Args:
        k: number of clusters (``k ≤ N``).
        n_iters: maximum Lloyd iterations (stops early when the largest centre move² < ``tol``).
        seed: seeds initialisation (same seed + same data + CPU → identical result).
        device: ``"cuda"`` runs the distance blocks on the GPU.
        chunk_rows: rows per distance block (default :func:`default_chunk_rows`).
        init: ``"kmeans++"`` (exact) or ``"random"`` (k distinct rows).
    """
    device = torch.device(device)
    t0 = time.perf_counter()
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        src = as_rows(data)
        n, d = src.num_rows, src.dim
        if not 1 <= k <= n:
            raise ValueError(f"k-means needs 1 <= k <= N, got k={k}, N={n}")
        rows = _Rows(src, device, chunk_rows or default_chunk_rows(k, d), resident_bytes)
        g = torch.Generator().manual_seed(int(seed) & 0x7FFFFFFFFFFFFFFF)
        if init == "kmeans++":
            c = kmeans_plusplus(rows, k, g)
        elif init == "random":
            c = torch.stack([rows.row(int(i)) for i in torch.randperm(n, generator=g)[:k]]).float()
        else:
            raise ValueError(f"unknown init {init!r}")
        it = 0
        for it in range(1, n_iters + 1):
            sums = torch.zeros(k, d, dtype=torch.float64, device=device)
            counts = torch.zeros(k, dtype=torch.float64, device=device)
            c2 = (c * c).sum(1)
            for _, x, x2 in rows.chunks():
                lab = sq_dist(x, c, c2, x2).argmin(1)
                sums.index_add_(0, lab, x.double())
                counts += torch.bincount(lab, minlength=k).double()
            nonempty = counts > 0
            new = c.double().clone()
            new[nonempty] = sums[nonempty] / counts[nonempty, None]
            shift = float(((new - c.double()) ** 2).sum(1).max())
            c = new.float()
            if shift < tol:
                break
        labels, dist2 = assign(src, c, device=device, _rows=rows)
        log.info("k-means k=%d N=%d D=%d: %d iterations, %.1f s", k, n, d, it, time.perf_counter() - t0)
        return KMeansResult(c.cpu().numpy(), labels, dist2, float(dist2.astype(np.float64).sum()), it)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
