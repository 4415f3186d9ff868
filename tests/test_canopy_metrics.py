"""Canopy-height metrics: hand-computed values, nodata masking, block-R², streaming = one-shot, raster evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from eo_dinov3.canopy.metrics import MetricAccumulator, compute_metrics, evaluate_rasters, r2_score

rasterio = pytest.importorskip("rasterio")
from rasterio.transform import from_origin  # noqa: E402

PRED = np.array([[1.0, 2.0], [3.0, 4.0]])
TRUTH = np.array([[1.0, 1.0], [5.0, 2.0]])


def test_hand_computed_values() -> None:
    m = compute_metrics(PRED, TRUTH)
    # e = [0, 1, -2, 2]
    assert m["n_pixels"] == 4
    assert m["mae"] == pytest.approx(1.25)
    assert m["rmse"] == pytest.approx(1.5)
    assert m["bias"] == pytest.approx(0.25)
    # truth mean 2.25, SS_tot = 10.75, SS_res = 9
    assert m["r2"] == pytest.approx(1 - 9 / 10.75)
    # nMAE = mean(|e| / (1 + |y|)) = (0 + 1/2 + 2/6 + 2/3) / 4
    assert m["nmae"] == pytest.approx((0 + 0.5 + 2 / 6 + 2 / 3) / 4)
    # tree cover >= 2 m: pred [F T T T], truth [F F T T] -> 2 / 3; >= 5 m: pred none, truth one -> 0
    assert m["iou_2m"] == pytest.approx(2 / 3)
    assert m["iou_5m"] == pytest.approx(0.0)
    bins = {tuple(b["bin_m"]): b for b in m["per_bin"]}
    assert bins[(0.0, 2.0)]["n_pixels"] == 2 and bins[(0.0, 2.0)]["mae"] == pytest.approx(0.5)
    assert bins[(2.0, 5.0)]["n_pixels"] == 1 and bins[(2.0, 5.0)]["mae"] == pytest.approx(2.0)
    assert bins[(5.0, 10.0)]["n_pixels"] == 1 and bins[(5.0, 10.0)]["bias"] == pytest.approx(-2.0)
    assert bins[(10.0, 15.0)]["n_pixels"] == 0 and math.isnan(bins[(10.0, 15.0)]["mae"])


def test_nodata_and_mask_are_ignored() -> None:
    pred = np.array([[1.0, 2.0, np.nan], [3.0, 4.0, 100.0]])
    truth = np.array([[1.0, 1.0, 7.0], [5.0, 2.0, 0.0]])
    mask = np.array([[True, True, True], [True, True, False]])  # the 100 m outlier is masked
    m = compute_metrics(pred, truth, mask)
    ref = compute_metrics(PRED, TRUTH)
    for k in ("n_pixels", "mae", "rmse", "bias", "r2", "nmae", "iou_2m"):
        assert m[k] == pytest.approx(ref[k]), k
    # NaN in the truth is nodata too
    assert compute_metrics(np.array([[1.0, 5.0]]), np.array([[np.nan, 5.0]]))["n_pixels"] == 1


def test_truth_outside_bins_is_not_binned() -> None:
    m = compute_metrics(np.array([[70.0, 1.0]]), np.array([[65.0, -1.0]]))
    assert sum(b["n_pixels"] for b in m["per_bin"]) == 0
    assert m["n_pixels"] == 2


def _block_raster(means: list[float], noise: bool) -> np.ndarray:
    """100 x 100 raster of four 50 x 50 constant blocks (row-major means) + an optional zero-mean checkerboard."""
    a = np.zeros((100, 100))
    for k, v in enumerate(means):
        i, j = divmod(k, 2)
        a[50 * i : 50 * i + 50, 50 * j : 50 * j + 50] = v
    if noise:
        yy, xx = np.mgrid[:100, :100]
        a += np.where((yy + xx) % 2 == 0, 1.0, -1.0)
    return a


def test_block_r2_on_constructed_blocks() -> None:
    truth = _block_raster([1, 2, 3, 4], noise=False)
    pred = _block_raster([1, 2, 3, 4], noise=True)  # block means exact, pixels off by +-1
    m = compute_metrics(pred, truth)
    assert m["block_r2"] == pytest.approx(1.0)
    assert m["n_blocks"] == 4
    assert m["r2"] < 0.5  # pixel R2 is poor
    # block means [2, 2, 3, 3] vs [1, 2, 3, 4]: SS_res 2, SS_tot 5 -> 0.6
    m2 = compute_metrics(_block_raster([2, 2, 3, 3], noise=True), truth)
    assert m2["block_r2"] == pytest.approx(0.6)


def test_block_r2_drops_incomplete_and_sparse_blocks() -> None:
    truth = np.zeros((120, 100))
    truth[:100] = _block_raster([1, 2, 3, 4], noise=False)
    truth[100:] = 50.0  # a partial block row at the bottom: not a full 50 x 50 block
    pred = truth.copy()
    pred[100:] = 0.0
    pred[:50, :50][:30] = np.nan  # block 0 is 40 % valid (< 50 %): dropped
    m = compute_metrics(pred, truth)
    assert m["n_blocks"] == 3
    assert m["block_r2"] == pytest.approx(1.0)


def test_streaming_windows_equal_one_shot() -> None:
    rng = np.random.default_rng(0)
    truth = rng.gamma(2.0, 5.0, (230, 170))
    pred = truth + rng.normal(0, 3, truth.shape)
    pred[rng.random(truth.shape) < 0.05] = np.nan
    one = compute_metrics(pred, truth)
    acc = MetricAccumulator(shape=truth.shape)
    for r0 in range(0, 230, 37):  # windows not aligned to 50-px blocks
        for c0 in range(0, 170, 61):
            acc.update(pred[r0 : r0 + 37, c0 : c0 + 61], truth[r0 : r0 + 37, c0 : c0 + 61], offset=(r0, c0))
    streamed = acc.compute()
    for k in ("n_pixels", "mae", "rmse", "bias", "r2", "nmae", "block_r2", "iou_2m", "iou_5m", "n_blocks"):
        assert streamed[k] == pytest.approx(one[k], rel=1e-9), k
    assert r2_score(pred[np.isfinite(pred)], truth[np.isfinite(pred)]) == pytest.approx(one["r2"])


def _write(path: Path, a: np.ndarray, pixel: float, crs: str = "EPSG:32633", nodata: float | None = np.nan) -> None:
    with rasterio.open(path, "w", driver="GTiff", width=a.shape[1], height=a.shape[0], count=1, dtype="float32",
                       crs=crs, transform=from_origin(400000, 6000000, pixel, pixel), nodata=nodata) as d:
        d.write(a.astype(np.float32), 1)


def test_evaluate_rasters_same_grid_and_resampled_truth(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    truth = np.repeat(np.repeat(rng.uniform(0, 30, (60, 80)), 2, 0), 2, 1)  # constant 2 x 2 blocks
    pred = truth + rng.normal(0, 2, truth.shape)
    pred[:10, :10] = np.nan
    _write(tmp_path / "pred.tif", pred, 1.0)
    _write(tmp_path / "truth.tif", truth, 1.0)
    m = evaluate_rasters(tmp_path / "pred.tif", tmp_path / "truth.tif", strip_rows=50)
    ref = compute_metrics(pred.astype(np.float32).astype(np.float64), truth.astype(np.float32).astype(np.float64))
    assert not m["truth_resampled"]
    for k in ("n_pixels", "mae", "rmse", "bias", "r2", "block_r2", "nmae"):
        assert m[k] == pytest.approx(ref[k], rel=1e-9), k
    # the same truth at 0.5 m (finer grid): averaged back onto the 1 m prediction grid
    fine = np.repeat(np.repeat(truth, 2, 0), 2, 1)
    _write(tmp_path / "truth_fine.tif", fine, 0.5)
    m2 = evaluate_rasters(tmp_path / "pred.tif", tmp_path / "truth_fine.tif")
    assert m2["truth_resampled"]
    assert m2["mae"] == pytest.approx(ref["mae"], rel=1e-5)


def test_cli_evaluate_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from eo_dinov3.cli import main

    _write(tmp_path / "p.tif", PRED, 1.0)
    _write(tmp_path / "t.tif", TRUTH, 1.0)
    assert main(["chm", "evaluate", str(tmp_path / "p.tif"), str(tmp_path / "t.tif"), "--json",
                 str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "mae" in out and "1.250" in out
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["rmse"] == pytest.approx(1.5)
    assert m["block_r2"] is None  # undefined (no full block) -> JSON null, not NaN
