"""Canopy-height accuracy metrics, streamed over raster windows with bounded memory.

Definitions (all heights in metres; ``e = pred - truth`` over valid pixels only):

* ``mae = mean(|e|)``, ``rmse = sqrt(mean(e²))``, ``bias = mean(e)`` (positive = over-prediction; Tolan et al.'s
  "mean error").
* ``r2 = 1 - Σe² / Σ(truth - mean(truth))²`` (coefficient of determination against the truth mean, as sklearn).
* ``block_r2``: the same R² computed on block means of 50 × 50-pixel blocks (Tolan et al. 2024, "block-R²").
  Blocks are aligned to the raster grid (block ``(i, j)`` covers rows ``50i … 50i+49``); a block is used when it
  lies completely inside the raster and at least ``block_min_valid`` (default 50 %) of its pixels are valid in both
  rasters; its means are over those valid pixels. (Tolan's code pools 256-px crops after trimming a 3-px border;
  on a whole map the raster grid is the natural block grid.)
* ``nmae = mean(|e| / (1 + |truth|))`` — Open-Canopy's normalised MAE (``src/metrics/compute_metrics.py``).
* ``iou_2m`` / ``iou_5m``: tree-cover IoU, tree cover = height ``>=`` threshold in both rasters (Open-Canopy uses
  2 m; 5 m is the FAO tree-height threshold).
* per height bin of the *truth* ``[0,2) [2,5) [5,10) [10,15) [15,20) [20,30) [30,60)`` m: pixel count, MAE and
  bias (Open-Canopy bins by ``np.digitize`` of the label; truth outside ``[0, 60)`` falls in no bin).

:class:`MetricAccumulator` keeps only running float64 sums, the IoU counts and one small record per 50×50 block,
so a 20 000² raster pair is evaluated window by window in a few tens of MB. :func:`evaluate_rasters` is the
``eo-dinov3 chm evaluate`` engine: it aligns the truth raster to the prediction grid (a ``WarpedVRT`` when the CRS
or grid differ) and feeds aligned windows to an accumulator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HEIGHT_BINS_M: tuple[float, ...] = (0.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0)
COVER_THRESHOLDS_M: tuple[float, ...] = (2.0, 5.0)
BLOCK_PX = 50


def _valid(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    ok = np.isfinite(pred) & np.isfinite(truth)
    if mask is not None:
        ok &= mask.astype(bool)
    return ok


@dataclass
class MetricAccumulator:
    """Running sums for canopy-height metrics; call :meth:`update` per window, :meth:`compute` at the end.

    Args:
        shape: ``(height, width)`` of the full raster in pixels, used to drop incomplete edge blocks for block-R²
            (``None``: every block that appears is kept).
        block: block size in pixels for block-R² (50 as Tolan et al.).
        block_min_valid: minimum fraction of valid pixels for a block to count.
        bins: height-bin edges in metres (on the truth).
        cover_thresholds: tree-cover thresholds in metres for the IoU.
    """

    shape: tuple[int, int] | None = None
    block: int = BLOCK_PX
    block_min_valid: float = 0.5
    bins: tuple[float, ...] = HEIGHT_BINS_M
    cover_thresholds: tuple[float, ...] = COVER_THRESHOLDS_M
    _s: dict[str, float] = field(default_factory=dict, repr=False)
    _inter: np.ndarray = field(init=False, repr=False)
    _union: np.ndarray = field(init=False, repr=False)
    _bin_n: np.ndarray = field(init=False, repr=False)
    _bin_abs: np.ndarray = field(init=False, repr=False)
    _bin_err: np.ndarray = field(init=False, repr=False)
    _blocks: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._s = dict.fromkeys(("n", "e", "ae", "se", "nae", "y", "yy"), 0.0)
        self._inter = np.zeros(len(self.cover_thresholds), np.int64)
        self._union = np.zeros(len(self.cover_thresholds), np.int64)
        nb = len(self.bins) - 1
        self._bin_n = np.zeros(nb, np.int64)
        self._bin_abs = np.zeros(nb, np.float64)
        self._bin_err = np.zeros(nb, np.float64)

    def update(
        self,
        pred: np.ndarray,
        truth: np.ndarray,
        mask: np.ndarray | None = None,
        offset: tuple[int, int] = (0, 0),
    ) -> None:
        """Add one window.

        Args:
            pred: predicted heights ``[H, W]`` in metres (NaN = nodata).
            truth: reference heights ``[H, W]`` in metres (NaN = nodata).
            mask: optional ``[H, W]`` bool, ``True`` = valid (combined with the finite test).
            offset: ``(row, col)`` of the window's top-left pixel in the full raster (places block-R² blocks).
        """
        pred = np.asarray(pred, dtype=np.float64)
        truth = np.asarray(truth, dtype=np.float64)
        if pred.shape != truth.shape or pred.ndim != 2:
            raise ValueError(f"pred and truth must be equal 2-D arrays, got {pred.shape} and {truth.shape}")
        ok = _valid(pred, truth, mask)
        p, y = pred[ok], truth[ok]
        e = p - y
        s = self._s
        s["n"] += e.size
        s["e"] += e.sum()
        s["ae"] += np.abs(e).sum()
        s["se"] += (e * e).sum()
        s["nae"] += (np.abs(e) / (1.0 + np.abs(y))).sum()
        s["y"] += y.sum()
        s["yy"] += (y * y).sum()
        for k, thr in enumerate(self.cover_thresholds):
            tp, tt = p >= thr, y >= thr
            self._inter[k] += int(np.count_nonzero(tp & tt))
            self._union[k] += int(np.count_nonzero(tp | tt))
        idx = np.digitize(y, self.bins) - 1  # bin i covers [bins[i], bins[i+1])
        inb = (idx >= 0) & (idx < len(self.bins) - 1)
        nb = len(self.bins) - 1
        self._bin_n += np.bincount(idx[inb], minlength=nb)
        self._bin_abs += np.bincount(idx[inb], weights=np.abs(e[inb]), minlength=nb)
        self._bin_err += np.bincount(idx[inb], weights=e[inb], minlength=nb)
        self._update_blocks(pred, truth, ok, offset)

    def _update_blocks(self, pred: np.ndarray, truth: np.ndarray, ok: np.ndarray, offset: tuple[int, int]) -> None:
        rows, cols = np.nonzero(ok)
        if rows.size == 0:
            return
        b = self.block
        bi = (rows + offset[0]) // b
        bj = (cols + offset[1]) // b
        key = bi.astype(np.int64) * (1 << 32) + bj.astype(np.int64)
        uniq, inv = np.unique(key, return_inverse=True)
        sp = np.bincount(inv, weights=pred[ok])
        st = np.bincount(inv, weights=truth[ok])
        cnt = np.bincount(inv).astype(np.float64)
        for k, a, c, n in zip(uniq.tolist(), sp, st, cnt):
            rec = self._blocks.get(k)
            if rec is None:
                self._blocks[k] = np.array([a, c, n])
            else:
                rec += (a, c, n)

    def merge(self, other: MetricAccumulator) -> MetricAccumulator:
        """Add another accumulator's sums into this one (e.g. from parallel workers); returns ``self``."""
        for k in self._s:
            self._s[k] += other._s[k]
        self._inter += other._inter
        self._union += other._union
        self._bin_n += other._bin_n
        self._bin_abs += other._bin_abs
        self._bin_err += other._bin_err
        for k, rec in other._blocks.items():
            if k in self._blocks:
                self._blocks[k] = self._blocks[k] + rec
            else:
                self._blocks[k] = rec.copy()
        return self

    def _block_r2(self) -> tuple[float, int]:
        b = self.block
        need = self.block_min_valid * b * b
        pm, tm = [], []
        for k, (sp, st, n) in self._blocks.items():
            bi, bj = k >> 32, k & 0xFFFFFFFF
            if self.shape is not None and ((bi + 1) * b > self.shape[0] or (bj + 1) * b > self.shape[1]):
                continue
            if n < need:
                continue
            pm.append(sp / n)
            tm.append(st / n)
        if len(pm) < 2:
            return float("nan"), len(pm)
        return r2_score(np.array(pm), np.array(tm)), len(pm)

    def compute(self) -> dict[str, Any]:
        """All metrics as a JSON-friendly dict (floats; ``nan`` where undefined, e.g. no valid pixel)."""
        s = self._s
        n = s["n"]
        out: dict[str, Any] = {"n_pixels": int(n)}
        if n == 0:
            nan = float("nan")
            out.update(mae=nan, rmse=nan, bias=nan, r2=nan, nmae=nan)
        else:
            ss_tot = s["yy"] - s["y"] * s["y"] / n
            out["mae"] = s["ae"] / n
            out["rmse"] = math.sqrt(s["se"] / n)
            out["bias"] = s["e"] / n
            out["r2"] = 1.0 - s["se"] / ss_tot if ss_tot > 0 else float("nan")
            out["nmae"] = s["nae"] / n
        br2, nblocks = self._block_r2()
        out["block_r2"] = br2
        out["n_blocks"] = nblocks
        for k, thr in enumerate(self.cover_thresholds):
            u = self._union[k]
            out[f"iou_{thr:g}m"] = float(self._inter[k] / u) if u else float("nan")
        per_bin = []
        for i in range(len(self.bins) - 1):
            c = int(self._bin_n[i])
            per_bin.append(
                {
                    "bin_m": [self.bins[i], self.bins[i + 1]],
                    "n_pixels": c,
                    "mae": float(self._bin_abs[i] / c) if c else float("nan"),
                    "bias": float(self._bin_err[i] / c) if c else float("nan"),
                }
            )
        out["per_bin"] = per_bin
        return {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in out.items()}


def r2_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """Coefficient of determination of ``pred`` against ``truth`` (1-D or any shape, float64 sums)."""
    pred = np.asarray(pred, np.float64).ravel()
    truth = np.asarray(truth, np.float64).ravel()
    ss_tot = float(((truth - truth.mean()) ** 2).sum())
    if ss_tot <= 0:
        return float("nan")
    return 1.0 - float(((pred - truth) ** 2).sum()) / ss_tot


def compute_metrics(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None, **kw: Any) -> dict[str, Any]:
    """Metrics of one in-memory pair ``[H, W]`` (metres, NaN = nodata); ``kw`` go to :class:`MetricAccumulator`."""
    acc = MetricAccumulator(shape=tuple(np.shape(pred)), **kw)  # type: ignore[arg-type]
    acc.update(pred, truth, mask)
    return acc.compute()


# --------------------------------------------------------------------------------------------- raster evaluation
def _masked_float(ds: Any, window: Any, band: int = 1) -> np.ndarray:
    """Band ``band`` of ``ds`` in ``window`` as float64 with nodata / masked pixels set to NaN."""
    arr = ds.read(band, window=window, masked=True)
    out = arr.astype(np.float64).filled(np.nan)
    return out


def evaluate_rasters(pred_path: str | Path, truth_path: str | Path, *, strip_rows: int = 500) -> dict[str, Any]:
    """Compare a predicted CHM with a reference CHM (both metres) on the prediction grid.

    The truth raster is aligned to the prediction grid: read directly when CRS, transform and size agree, else
    through a ``WarpedVRT`` (``average`` resampling when the truth is finer than the prediction, ``bilinear``
    otherwise). Windows of ``strip_rows`` full-width rows (rounded to a multiple of 50, so block-R² blocks are not
    split between windows) are streamed; memory is a few strips, whatever the raster size.

    Returns:
        the :meth:`MetricAccumulator.compute` dict plus ``pred``, ``truth``, ``truth_resampled``, ``grid``.
    """
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT
    from rasterio.windows import Window

    from eo_dinov3.canopy.mapping import open_input_raster
    from eo_dinov3.errors import DataError

    with open_input_raster(pred_path, require_crs=False) as p, open_input_raster(truth_path, require_crs=False) as t:
        if (p.crs is None) != (t.crs is None):
            raise DataError(f"one of {pred_path} / {truth_path} has no CRS; both must be georeferenced (or neither)")
        same = p.crs == t.crs and p.transform.almost_equals(t.transform) and p.shape == t.shape
        if same:
            truth_ds, resampled = t, False
        else:
            finer = abs(t.transform.a) < abs(p.transform.a) * 0.99 if p.crs == t.crs else True
            truth_ds = WarpedVRT(
                t,
                crs=p.crs,
                transform=p.transform,
                width=p.width,
                height=p.height,
                resampling=Resampling.average if finer else Resampling.bilinear,
                src_nodata=t.nodata,
                nodata=np.nan,
                dtype="float32",
            )
            resampled = True
        try:
            acc = MetricAccumulator(shape=(p.height, p.width))
            step = max(BLOCK_PX, strip_rows // BLOCK_PX * BLOCK_PX)
            for r0 in range(0, p.height, step):
                win = Window(0, r0, p.width, min(step, p.height - r0))
                acc.update(_masked_float(p, win), _masked_float(truth_ds, win), offset=(r0, 0))
        finally:
            if resampled:
                truth_ds.close()
        out = acc.compute()
        out.update(
            pred=str(pred_path),
            truth=str(truth_path),
            truth_resampled=resampled,
            grid={"crs": p.crs.to_string() if p.crs else None, "width": p.width, "height": p.height,
                  "pixel_size": [abs(p.transform.a), abs(p.transform.e)]},
        )
    return out


def format_table(m: dict[str, Any]) -> str:
    """A plain-text table of the headline metrics and the per-bin MAE."""
    lines = [
        f"{'metric':<12}{'value':>10}",
        f"{'pixels':<12}{m['n_pixels']:>10d}",
    ]
    for k, unit in (("mae", "m"), ("rmse", "m"), ("bias", "m"), ("r2", ""), ("block_r2", ""), ("nmae", "")):
        lines.append(f"{k + (' (' + unit + ')' if unit else ''):<12}{m[k]:>10.3f}")
    for k in m:
        if k.startswith("iou_"):
            lines.append(f"{k:<12}{m[k]:>10.3f}")
    lines.append("")
    lines.append(f"{'truth bin (m)':<14}{'pixels':>10}{'MAE (m)':>10}{'bias (m)':>10}")
    for b in m["per_bin"]:
        lo, hi = b["bin_m"]
        lines.append(f"{f'{lo:g}-{hi:g}':<14}{b['n_pixels']:>10d}{b['mae']:>10.3f}{b['bias']:>10.3f}")
    return "\n".join(lines)
