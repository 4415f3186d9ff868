"""Chunked k-means in torch (CPU or CUDA) with exact k-means++ initialisation; deterministic given a seed.

Data are rows ``[N, D]`` read chunk by chunk (:class:`~eo_dinov3.data.curation.store.EmbeddingStore` or
:class:`~eo_dinov3.data.curation.store.ArrayRows`). When ``N × D × 4`` bytes fit in ``resident_bytes`` the rows are
copied to the device once (fast path); otherwise every pass streams the memory-mapped shards, so peak memory is one
chunk of rows plus one ``[chunk_rows, k]`` distance block (``chunk_rows`` defaults to ``2^25 / max(k, D)``, i.e.
≈ 128 MiB of float32) plus the ``[N]`` label/distance arrays.

Squared L2 distances ``|x|² - 2 x·c + |c|²`` are computed in float32 (TF32 disabled), centroid sums are accumulated
in float64. k-means++ (Arthur & Vassilvitskii 2007) is *exact* and *greedy*: for each new centre, ``2 + ln k``
candidates are drawn with probability proportional to the squared distance of every point to its nearest chosen
centre and the one that lowers the potential most is kept (``k`` passes over the data, ``2k`` when streamed), as
in scikit-learn and the reference curation code (Vo et al. 2024). ``n_init`` restarts keep the lowest inertia.
Randomness comes only from a ``torch.Generator`` seeded with ``seed`` (on CPU), so CPU results are bit-reproducible;
on CUDA, atomic float64 sums may change the last bits.
Empty clusters keep their previous centre.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from eo_dinov3.data.curation.store import as_rows

log = logging.getLogger(__name__)

DEFAULT_RESIDENT_BYTES = 4 << 30
#: below this many multiply-adds per pass (``N × k × D``) CPU k-means runs on one thread (:func:`single_thread_if_small`)
SMALL_PROBLEM_MACS = 1 << 26


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


@contextlib.contextmanager
def single_thread_if_small(device: torch.device, macs: float):
    """Run small CPU problems (``macs`` multiply-adds per pass < :data:`SMALL_PROBLEM_MACS`) on one thread.

    The upper levels of a hierarchy run thousands of tiny products (``[10³, D] × [D, 10²]``); with several OpenMP
    threads each one pays the pool's start-up and spin cost, ~50× the work itself, and far more when the cores are
    shared with other processes. Restores the previous thread count on exit."""
    prev = torch.get_num_threads()
    if device.type != "cpu" or macs >= SMALL_PROBLEM_MACS or prev == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


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
    with single_thread_if_small(device, rows.n * c.shape[0] * rows.d):
        c2 = (c * c).sum(1)
        for s, x, x2 in rows.chunks():
            dmin, lab = sq_dist(x, c, c2, x2).min(1)
            labels[s:s + len(x)] = lab.cpu().numpy()
            dist2[s:s + len(x)] = dmin.cpu().numpy()
    return labels, dist2


def kmeans_plusplus(rows: _Rows, k: int, generator: torch.Generator,
                    n_local_trials: int | None = None) -> torch.Tensor:
    """Greedy k-means++ seeding: ``[k, D]`` centres chosen among the rows.

    Every new centre is the best of ``n_local_trials`` candidates (default ``2 + ln k``, as scikit-learn and the
    reference curation code) drawn with probability proportional to the squared distance to the nearest chosen
    centre: the candidate that lowers the potential ``Σ min_c |x - c|²`` most wins. ``n_local_trials=1`` is plain
    D² sampling (Arthur & Vassilvitskii 2007), which on skewed data often spends several centres on the
    scattered points of one dense mode and leaves small modes without a centre. Two passes over the rows per
    centre when the rows are streamed, one when they are resident.
    """
    n = rows.n
    trials = max(1, int(n_local_trials) if n_local_trials else 2 + int(np.log(k)))
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [rows.row(first).float()]
    mind = torch.empty(n, dtype=torch.float32, device=rows.device)
    for s, x, x2 in rows.chunks():
        mind[s:s + len(x)] = sq_dist(x, centres[0][None], x2=x2).squeeze(1)
    resident = rows.resident is not None
    # resident rows: the [N, trials] distances of one step are kept, so updating ``mind`` needs no second pass
    buf = torch.empty(n, trials, dtype=torch.float32, device=rows.device) if resident else None
    for _ in range(1, k):
        cum = torch.cumsum(mind, 0, dtype=torch.float64)
        total = float(cum[-1])
        if total <= 0.0:  # fewer distinct points than k: pick uniformly
            cand = torch.randint(n, (trials,), generator=generator)
        else:
            u = torch.rand(trials, generator=generator, dtype=torch.float64).to(cum.device) * total
            cand = torch.searchsorted(cum, u, right=True).clamp_(max=n - 1).cpu()
        cands = torch.stack([rows.row(int(i)).float() for i in cand])  # [trials, D]
        c2 = (cands * cands).sum(1)
        pots = torch.zeros(trials, dtype=torch.float64, device=rows.device)
        for s, x, x2 in rows.chunks():
            d = torch.minimum(sq_dist(x, cands, c2, x2), mind[s:s + len(x), None])  # [n_chunk, trials]
            pots += d.sum(0, dtype=torch.float64)
            if resident:
                buf[s:s + len(x)] = d
        best = int(pots.argmin())
        if resident:
            mind.copy_(buf[:, best])
        else:  # streamed: a second pass (same arithmetic as the first, so both paths give identical bits)
            for s, x, x2 in rows.chunks():
                torch.minimum(mind[s:s + len(x)], sq_dist(x, cands, c2, x2)[:, best], out=mind[s:s + len(x)])
        centres.append(cands[best])
    return torch.stack(centres)


def _lloyd(rows: _Rows, c: torch.Tensor, n_iters: int, tol: float) -> tuple[torch.Tensor, int]:
    """Lloyd iterations from centres ``c [k, D]``; returns (centres, iterations run)."""
    k, d, device = c.shape[0], rows.d, rows.device
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
    return c, it


def kmeans(data, k: int, *, n_iters: int = 20, seed: int = 0, device: torch.device | str = "cpu",
           chunk_rows: int | None = None, tol: float = 1e-6, resident_bytes: int = DEFAULT_RESIDENT_BYTES,
           init: str = "kmeans++", n_local_trials: int | None = None, n_init: int = 1) -> KMeansResult:
    """Lloyd's k-means on rows ``data [N, D]`` (array, tensor or store).

    Args:
        k: number of clusters (``k ≤ N``).
        n_iters: maximum Lloyd iterations (stops early when the largest centre move² < ``tol``).
        seed: seeds initialisation (same seed + same data + CPU → identical result).
        device: ``"cuda"`` runs the distance blocks on the GPU.
        chunk_rows: rows per distance block (default :func:`default_chunk_rows`).
        init: ``"kmeans++"`` (greedy, :func:`kmeans_plusplus`) or ``"random"`` (k distinct rows).
        n_local_trials: candidates per k-means++ centre (default ``2 + ln k``; 1 = plain D² sampling).
        n_init: independent initialisations; the run with the lowest inertia is returned (cost × ``n_init``).
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
        if n_init < 1:
            raise ValueError(f"n_init must be >= 1, got {n_init}")
        rows = _Rows(src, device, chunk_rows or default_chunk_rows(k, d), resident_bytes)
        g = torch.Generator().manual_seed(int(seed) & 0x7FFFFFFFFFFFFFFF)
        best: KMeansResult | None = None
        with single_thread_if_small(device, n * k * d):
            for _ in range(n_init):
                if init == "kmeans++":
                    c = kmeans_plusplus(rows, k, g, n_local_trials)
                elif init == "random":
                    c = torch.stack([rows.row(int(i)) for i in torch.randperm(n, generator=g)[:k]]).float()
                else:
                    raise ValueError(f"unknown init {init!r}")
                c, it = _lloyd(rows, c, n_iters, tol)
                labels, dist2 = assign(src, c, device=device, _rows=rows)
                res = KMeansResult(c.cpu().numpy(), labels, dist2, float(dist2.astype(np.float64).sum()), it)
                if best is None or res.inertia < best.inertia:
                    best = res
        log.info("k-means k=%d N=%d D=%d (%d init): %d iterations, %.1f s", k, n, d, n_init, best.n_iters,
                 time.perf_counter() - t0)
        return best
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
