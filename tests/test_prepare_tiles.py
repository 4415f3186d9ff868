"""prepare_tiles: tile counts and skip reasons on a generated scene, georeferencing, dedupe, resumability, dask."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from eo_dinov3.data.prepare import PrepareConfig, prepare_tiles
from eo_dinov3.data.tiles import ManifestTileDataset

TS = 32  # tile size of the generated scene (px)
REPO = Path(__file__).resolve().parents[1]


def _scene(path: Path, seed: int = 0) -> Path:
    """4 x 5 tiles of 32 px (+ a 10-px right edge that is not cut) with: tile (0,0) all nodata, tile (1,1)
    constant, tile (2,3) an exact copy of tile (2,0), tile (3,4) half nodata -> 16 tiles kept."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 256, (3, 4 * TS, 5 * TS + 10), dtype=np.uint8)
    a[:, 0:TS, 0:TS] = 0
    a[:, TS:2 * TS, TS:2 * TS] = 100
    a[:, 2 * TS:3 * TS, 3 * TS:4 * TS] = a[:, 2 * TS:3 * TS, 0:TS]
    a[:, 3 * TS:3 * TS + TS // 2, 4 * TS:5 * TS] = 0
    with rasterio.open(path, "w", driver="GTiff", width=a.shape[2], height=a.shape[1], count=3, dtype="uint8",
                       crs="EPSG:32610", transform=from_origin(500000, 4000000, 0.6, 0.6), nodata=0) as dst:
        dst.write(a)
    return path


def _mtimes(out: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in (out / "tiles").rglob("*.tif")}


def test_prepare_counts_georef_resume_and_dask(tmp_path):
    scene = _scene(tmp_path / "scene.tif")
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"not a raster at all")
    out = tmp_path / "out"
    cfg = PrepareConfig(tile_size=TS)

    # 1) dask LocalCluster, 2 workers (threads keep the test fast)
    res = prepare_tiles([scene, broken], out, cfg, workers=2, processes=False, progress=False)
    assert res.counts == {"kept": 16, "nodata": 2, "constant": 1, "duplicate": 1, "scene_error": 1}
    assert res.tasks_run == 4 and res.tasks_reused == 0 and any("not a readable raster" in e for e in res.errors)
    df = pd.read_parquet(res.manifest)
    assert len(df) == 16 and df["sha256"].is_unique
    assert {"path", "width", "height", "crs", "gsd_m", "source", "sha256"} <= set(df.columns)
    assert (df["crs"] == "EPSG:32610").all() and np.allclose(df["gsd_m"], 0.6)
    assert sorted(p.relative_to(out).as_posix() for p in (out / "tiles").rglob("*.tif")) == sorted(df["path"])
    ids = set(df["id"])
    assert not any(i.endswith("_r00000_c00000") or i.endswith("_r00001_c00001") for i in ids)  # nodata, constant
    assert any(i.endswith("_r00002_c00000") for i in ids) and not any(i.endswith("_r00002_c00003") for i in ids)

    # every tile: same pixels as the scene window, CRS + window transform, provenance tags
    with rasterio.open(scene) as src:
        for row in df.itertuples():
            with rasterio.open(out / row.path) as t:
                w = Window(row.col_off, row.row_off, TS, TS)
                np.testing.assert_array_equal(t.read(), src.read(window=w))
                assert t.crs == src.crs and t.transform == src.window_transform(w) and t.nodata == 0
                tags = t.tags()
                assert tags["EO_DINOV3_SHA256"] == row.sha256 and tags["EO_DINOV3_SOURCE"] == str(scene)
                assert tags["EO_DINOV3_WINDOW"] == f"{row.col_off},{row.row_off},{TS},{TS}"

    # 2) resume: nothing is redone or rewritten, the manifest is rebuilt identically
    before = _mtimes(out)
    res2 = prepare_tiles([scene, broken], out, cfg, workers=0, progress=False)
    assert res2.tasks_run == 0 and res2.tasks_reused == 4 and res2.counts == res.counts
    assert _mtimes(out) == before
    pd.testing.assert_frame_equal(pd.read_parquet(res2.manifest), df)

    # the scene listed second this time: markers are still reused and records keep the right order
    res2b = prepare_tiles([broken, scene], out, cfg, workers=0, progress=False)
    assert res2b.tasks_run == 0 and res2b.counts == res.counts
    pd.testing.assert_frame_equal(pd.read_parquet(res2b.manifest), df)

    # 3) a lost tile: only its task is redone, and within it the other tiles are reused, not rewritten
    lost = out / df["path"].iloc[5]
    lost.unlink()
    res3 = prepare_tiles([scene], out, cfg, workers=0, progress=False)
    assert res3.tasks_run == 1 and res3.tiles_reused >= 1 and lost.exists()
    after = _mtimes(out)
    assert {k: v for k, v in after.items() if k != str(lost)} == {k: v for k, v in before.items() if k != str(lost)}
    assert res3.counts == {k: v for k, v in res.counts.items() if k != "scene_error"}

    # 4) other parameters invalidate the markers; no dedupe keeps the duplicate
    res4 = prepare_tiles([scene], tmp_path / "nodedupe", PrepareConfig(tile_size=TS, dedupe=False), workers=0,
                         progress=False)
    assert res4.counts == {"kept": 17, "nodata": 2, "constant": 1}

    # 5) the manifest feeds ManifestTileDataset directly
    ds = ManifestTileDataset(res.manifest, infinite=False, block_rows=4)
    got = [sid for _, sid in ds]
    assert sorted(got) == sorted(df["id"]) and ds.skipped.total == 0


def test_prepare_cli_help_and_run(tmp_path):
    help_text = subprocess.run([sys.executable, str(REPO / "sat_training" / "prepare_tiles.py"), "--help"],
                               capture_output=True, text=True, check=True).stdout
    for opt in ("--tile-size", "--max-nodata", "--min-std", "--scheduler", "--workers", "--no-dedupe", "resumable"):
        assert opt in help_text.replace("Resumable", "resumable")
    from eo_dinov3.cli import main

    scene = _scene(tmp_path / "s.tif", seed=1)
    rc = main(["prepare-tiles", str(scene), "--out", str(tmp_path / "o"), "--tile-size", str(TS), "--workers", "0",
               "--no-progress", "--manifest-format", "csv"])
    assert rc == 0
    assert len(pd.read_csv(tmp_path / "o" / "manifest.csv")) == 16
    assert main(["prepare-tiles", str(tmp_path / "missing.tif"), "--out", str(tmp_path / "o2"), "--workers", "0",
                 "--no-progress"]) == 1  # nothing kept: the scene error is reported, exit status 1
    with pytest.raises(SystemExit):
        main(["prepare-tiles", "--out", str(tmp_path / "o3")])
