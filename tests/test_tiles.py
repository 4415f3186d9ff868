"""Raster safety (raster_io), manifests and the three tile datasets, on the sample tiles and generated rasters."""

from __future__ import annotations

import os
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
from rasterio.io import MemoryFile
from rasterio.transform import Affine, from_origin
from torch.utils.data import DataLoader

from eo_dinov3.data.augmentations import DataAugmentationDINO
from eo_dinov3.data.manifest import ManifestReader, read_manifest, resolve_tile_path, write_manifest
from eo_dinov3.data.raster_io import (
    is_uri,
    nodata_fraction,
    open_raster,
    raster_info,
    read_window,
    scale_to_unit,
    valid_mask,
)
from eo_dinov3.data.tiles import ManifestTileDataset, SceneSamplerDataset, TileFolderDataset
from eo_dinov3.errors import DataError


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def _one_thread():
    """Data loading runs one torch thread per worker; in-process it avoids oversubscribing shared CPUs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def sample_tiles() -> Path:
    """Folder of the 38 sample 256-px RGB tiles with ``manifest.csv`` (fetched if absent)."""
    from eo_dinov3.data.samples import fetch_samples, sample_path

    fetch_samples(progress=False)
    manifest = sample_path("tiles")
    assert manifest.name == "manifest.csv"
    return manifest.parent


def _write(path: Path, arr: np.ndarray, *, nodata=None, transform=None, crs="EPSG:32610", **kw) -> Path:
    c, h, w = arr.shape
    transform = transform if transform is not None else from_origin(500000, 4000000, 0.6, 0.6)
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=c, dtype=arr.dtype, crs=crs,
                       transform=transform, nodata=nodata, **kw) as dst:
        dst.write(arr)
    return path


def _texture(c: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 256, (c, h, w), dtype=np.uint8)


def _sha(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


# ----------------------------------------------------------------------------------------------- raster_io
def test_open_raster_refuses_hazards_with_clear_errors(tmp_path):
    good = _write(tmp_path / "good.tif", _texture(3, 32, 32))
    with open_raster(good) as src:
        assert read_window(src).shape == (3, 32, 32)

    # VRT XML saved as .tif: plain rasterio opens it with the VRT driver and reads the other file; we refuse it.
    vrt = tmp_path / "upload.tif"
    vrt.write_text(
        f'<VRTDataset rasterXSize="32" rasterYSize="32"><VRTRasterBand dataType="Byte" band="1"><SimpleSource>'
        f'<SourceFilename relativeToVRT="0">{good}</SourceFilename><SourceBand>1</SourceBand></SimpleSource>'
        f"</VRTRasterBand></VRTDataset>"
    )
    with rasterio.open(vrt) as s:
        assert s.driver == "VRT" and s.read(1).mean() > 0  # the hazard is real
    with pytest.raises(DataError, match="VRT"):
        open_raster(vrt)

    # Sparse TIFF declaring 3 x 200000 x 200000 px (120 GB) in a few MB: refused from metadata, before any read.
    sparse = tmp_path / "sparse.tif"
    with rasterio.open(sparse, "w", driver="GTiff", width=200_000, height=200_000, count=3, dtype="uint8",
                       tiled=True, compress="deflate", sparse_ok=True, bigtiff="yes"):
        pass
    assert sparse.stat().st_size < 20 * 2**20
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="200000 x 200000"):
        open_raster(sparse)
    assert time.perf_counter() - t0 < 30  # generous: only metadata was touched (not a timing benchmark)

    rot = _write(tmp_path / "rot.tif", _texture(1, 8, 8), transform=Affine(0.5, 0.1, 5e5, 0.1, -0.5, 4e6))
    with pytest.raises(DataError, match="rotated"):
        open_raster(rot)
    south_up = _write(tmp_path / "south.tif", _texture(1, 8, 8), transform=Affine(0.5, 0, 5e5, 0, 0.5, 4e6))
    with pytest.raises(DataError, match="north-up"):
        open_raster(south_up)

    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"II*\x00" + os.urandom(500))
    with pytest.raises(DataError, match="not a readable raster"):
        open_raster(junk)
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        open_raster(empty)
    with pytest.raises(DataError, match="does not exist"):
        open_raster(tmp_path / "missing.tif")

    # Truncated DEFLATE GeoTIFF: open() succeeds, the read fails -> DataError from read_window.
    big = _write(tmp_path / "big.tif", _texture(3, 256, 256), compress="deflate", tiled=True)
    trunc = tmp_path / "trunc.tif"
    trunc.write_bytes(big.read_bytes()[: big.stat().st_size * 6 // 10])
    with pytest.raises(DataError, match="corrupt or truncated"):
        with open_raster(trunc) as src:
            read_window(src)

    # GDAL virtual file systems pass through (here /vsimem/, no network); URIs resolve relative to manifests.
    with MemoryFile(good.read_bytes(), ext=".tif") as mem:
        assert mem.name.startswith("/vsimem/") and is_uri(mem.name)
        with open_raster(mem.name) as src:
            assert read_window(src, bands=[2]).shape == (1, 32, 32)
    assert resolve_tile_path("t/a.tif", "s3://bucket/set/manifest.parquet") == "s3://bucket/set/t/a.tif"
    assert resolve_tile_path("a.tif", tmp_path / "m.csv") == str(tmp_path / "a.tif")

    with open_raster(good) as src, pytest.raises(DataError, match="band index"):
        read_window(src, bands=[4])
    with open_raster(good) as src, pytest.raises(DataError, match="budget"):
        read_window(src, max_read_bytes=100)


def test_raster_info_scaling_and_masks(tmp_path):
    arr = _texture(3, 40, 50)
    arr[:, :10, :] = 0  # 10 of 40 rows nodata in all bands
    arr[0, 20, 5] = 0  # a genuine 0 in one band only stays valid
    p = _write(tmp_path / "a.tif", arr, nodata=0)
    info = raster_info(p)
    assert (info.count, info.height, info.width, info.dtype, info.crs) == (3, 40, 50, "uint8", "EPSG:32610")
    assert info.gsd_m == pytest.approx(0.6)
    with open_raster(p) as src:
        m = valid_mask(src)
    assert nodata_fraction(m) == pytest.approx(0.25)
    assert m[20, 5]

    # Alpha band: RGBA PNG-like GeoTIFF, alpha 0 on the left half.
    rgba = np.concatenate([_texture(3, 16, 16), np.full((1, 16, 16), 255, np.uint8)])
    rgba[3, :, :8] = 0
    pa = _write(tmp_path / "rgba.tif", rgba, photometric="RGB", alpha="YES")
    with open_raster(pa) as src:
        assert nodata_fraction(valid_mask(src, bands=[1, 2, 3])) == pytest.approx(0.5)

    u8 = np.array([[[0, 51, 255]]], np.uint8)
    np.testing.assert_allclose(scale_to_unit(u8), [[[0.0, 0.2, 1.0]]])
    u16 = np.array([[[0, 5000, 10000, 20000]]], np.uint16)
    np.testing.assert_allclose(scale_to_unit(u16), [[[0.0, 0.5, 1.0, 1.0]]])  # /10000, clipped
    np.testing.assert_allclose(scale_to_unit(u16, scale="dtype"), u16 / 65535.0, rtol=1e-6)
    np.testing.assert_allclose(scale_to_unit(u16, scale=2047), np.clip(u16 / 2047.0, 0, 1), rtol=1e-6)
    ramp = np.arange(101, dtype=np.uint16)[None, None, :]
    pct = scale_to_unit(ramp, scale="percentile")
    assert pct.min() == 0.0 and pct.max() == 1.0 and 0.45 < pct[0, 0, 50] < 0.55


# ----------------------------------------------------------------------------------------------- folder
def test_tile_folder_dataset_reads_sample_tiles(sample_tiles):
    ds = TileFolderDataset(sample_tiles)
    n = len(pd.read_csv(sample_tiles / "manifest.csv"))
    assert len(ds) == n == 38
    for i in (0, 17, n - 1):
        img, sid = ds[i]
        assert img.dtype == torch.uint8 and img.shape == (3, 256, 256)
        with rasterio.open(sample_tiles / sid) as src:
            np.testing.assert_array_equal(img.numpy(), src.read([1, 2, 3]))
    assert ds.skipped.total == 0
    f32 = TileFolderDataset(sample_tiles, output_dtype="float32")[0][0]
    assert f32.dtype == torch.float32 and torch.allclose(f32, ds[0][0].float() / 255)


def test_uint16_tiles_are_scaled(tmp_path):
    refl = np.random.default_rng(3).integers(0, 12000, (3, 20, 20), dtype=np.uint16)  # reflectance x 10000
    _write(tmp_path / "s2.tif", refl)
    u8, _ = TileFolderDataset(tmp_path)[0]
    assert u8.dtype == torch.uint8
    np.testing.assert_array_equal(u8.numpy(), np.rint(np.clip(refl / 10000.0, 0, 1) * 255).astype(np.uint8))
    f, _ = TileFolderDataset(tmp_path, output_dtype="float32", scale="dtype")[0]
    torch.testing.assert_close(f, torch.from_numpy(refl.astype(np.float32) / 65535.0))


def test_bad_tiles_are_skipped_counted_and_replaced(tmp_path, sample_tiles):
    good = sorted(sample_tiles.glob("yell_r0*.tif"))[:3]
    folder = tmp_path / "tiles"
    folder.mkdir()
    for name, g in zip(("a0_good.tif", "a2_good.tif", "a7_good.tif"), good):
        shutil.copy(g, folder / name)
    (folder / "a1_corrupt.tif").write_bytes(b"II*\x00" + os.urandom(2000))
    _write(folder / "a3_oneband.tif", _texture(1, 64, 64))
    _write(folder / "a4_allnodata.tif", np.zeros((3, 64, 64), np.uint8), nodata=0)
    _write(folder / "a5_constant.tif", np.full((3, 64, 64), 117, np.uint8))
    (folder / "a6_vrt.tif").write_text(
        f'<VRTDataset rasterXSize="256" rasterYSize="256"><VRTRasterBand dataType="Byte" band="1"><SimpleSource>'
        f"<SourceFilename>{good[0]}</SourceFilename><SourceBand>1</SourceBand></SimpleSource></VRTRasterBand>"
        "</VRTDataset>")
    ds = TileFolderDataset(folder, skip_log_dir=tmp_path / "skips")
    assert len(ds) == 8
    ids = [ds[i][1] for i in range(len(ds))]  # never raises
    # A bad tile is replaced by the next good one, keeping one sample per index.
    assert ids == ["a0_good.tif", "a2_good.tif", "a2_good.tif"] + ["a7_good.tif"] * 5
    assert ds.skipped.as_dict() == {"unreadable": 2, "band_count": 1, "nodata": 1, "constant": 1}
    reasons = {sid: reason for sid, reason, _ in ds.skipped.examples}
    assert reasons["a6_vrt.tif"] == "unreadable" and reasons["a5_constant.tif"] == "constant"
    logged = (tmp_path / "skips" / "skipped-rank0-worker0.jsonl").read_text().splitlines()
    assert len(logged) == 5

    # Cloud mask band: 4th band non-zero on 40 % of the pixels -> "cloud" with max_nodata_fraction 0.1.
    cloudy = np.concatenate([_texture(3, 50, 50), np.zeros((1, 50, 50), np.uint8)])
    cloudy[3, :20, :] = 1
    cdir = tmp_path / "cloudy"
    cdir.mkdir()
    _write(cdir / "c.tif", cloudy, photometric="MINISBLACK")
    cloudy[3] = 0
    _write(cdir / "d.tif", cloudy, photometric="MINISBLACK")
    cds = TileFolderDataset(cdir, cloud_mask_band=4, max_nodata_fraction=0.1)
    assert [cds[i][1] for i in range(2)] == ["d.tif", "d.tif"] and cds.skipped.as_dict() == {"cloud": 1}
    assert TileFolderDataset(cdir, cloud_mask_band=4, max_nodata_fraction=0.5)[0][1] == "c.tif"

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    _write(only_bad / "c.tif", np.full((3, 16, 16), 5, np.uint8))
    with pytest.raises(DataError, match="consecutive bad tiles"):
        TileFolderDataset(only_bad)[0]


def test_folder_dataset_augmentation_independent_of_workers(sample_tiles):
    aug = DataAugmentationDINO(global_crops_size=32, local_crops_size=16, local_crops_number=2, satellite=True)
    ds = TileFolderDataset(sorted(sample_tiles.glob("yell_r0*.tif"))[:6], transform=aug, seed=7)

    def run(workers):
        dl = DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=lambda b: b, shuffle=False)
        return [(_sha(x["global_crops"][1]), _sha(x["local_crops"][0]), sid) for batch in dl for x, sid in batch]

    a, b = run(0), run(2)
    assert a == b and len(set(h for h, _, _ in a)) == 6
    ds.set_epoch(1)
    assert run(0) != a


# ----------------------------------------------------------------------------------------------- manifest
@pytest.fixture()
def parquet_manifest(tmp_path, sample_tiles) -> Path:
    """The sample manifest with absolute paths and an ``id`` column as Parquet with 5-row row groups."""
    df = pd.read_csv(sample_tiles / "manifest.csv")
    df["id"] = df["path"]
    df["path"] = [str(sample_tiles / p) for p in df["path"]]
    return write_manifest(df, tmp_path / "m.parquet", row_group_size=5)


def test_manifest_roundtrip_and_validation(tmp_path, sample_tiles):
    df = read_manifest(sample_tiles / "manifest.csv")
    assert {"path", "width", "height", "crs", "gsd_m"} <= set(df.columns) and len(df) == 38
    for name in ("m.parquet", "m.csv"):
        back = read_manifest(write_manifest(df, tmp_path / name))
        pd.testing.assert_frame_equal(back.reset_index(drop=True), df, check_dtype=False)
    with pytest.raises(DataError, match="lacks column"):
        write_manifest(df.drop(columns=["gsd_m"]), tmp_path / "bad.csv")
    (tmp_path / "nocol.csv").write_text("path,width\na.tif,3\n")
    with pytest.raises(DataError, match="lacks column"):
        ManifestReader(tmp_path / "nocol.csv")
    # CSV byte blocks: lines straddling block boundaries are read exactly once.
    r = ManifestReader(sample_tiles / "manifest.csv", csv_block_bytes=37)
    rows = [row["path"] for b in r.blocks for row in r.read_block(b)]
    assert rows == list(df["path"]) and r.total_rows() == 38 and r.num_blocks > 38 // 2


def test_manifest_sharding_2_ranks_x_2_workers_cover_each_row_once(parquet_manifest, sample_tiles):
    expected = sorted(pd.read_csv(sample_tiles / "manifest.csv")["path"])
    df = read_manifest(parquet_manifest)
    variants = (("parquet", dict(block_rows=3)), ("csv", dict(csv_block_bytes=120)),
                ("one-group", dict()))  # one 38-row block by default: split automatically for 4 shards
    for fmt, kw in variants:
        path = parquet_manifest
        if fmt == "csv":
            path = write_manifest(df, parquet_manifest.with_suffix(".csv"))
        elif fmt == "one-group":
            path = write_manifest(df, parquet_manifest.with_name("one.parquet"))
        by_rank = {}
        for rank in range(2):
            ds = ManifestTileDataset(path, rank=rank, world_size=2, infinite=False, epoch=3, **kw)
            by_rank[rank] = [sid for _, sid in DataLoader(ds, batch_size=None, num_workers=2)]
        assert sorted(by_rank[0] + by_rank[1]) == expected, fmt  # every row exactly once
        assert len(by_rank[0]) > 5 and len(by_rank[1]) > 5
        # Order is a pure function of (seed, epoch): identical again, different in another epoch.
        ds = ManifestTileDataset(path, rank=1, world_size=2, infinite=False, epoch=3, **kw)
        assert [sid for _, sid in DataLoader(ds, batch_size=None, num_workers=2)] == by_rank[1]
        ds.set_epoch(4)
        assert [sid for _, sid in DataLoader(ds, batch_size=None, num_workers=2)] != by_rank[1]
    tiny = write_manifest(df.head(3), parquet_manifest.with_name("tiny.parquet"))
    with pytest.raises(DataError, match="3 block"):
        next(iter(ManifestTileDataset(tiny, rank=1, world_size=4)))


def test_manifest_resume_with_set_position_is_bit_exact(parquet_manifest):
    aug = DataAugmentationDINO(global_crops_size=32, local_crops_size=16, local_crops_number=1)

    def batches(position: int, n: int):
        ds = ManifestTileDataset(parquet_manifest, transform=aug, seed=11, batch_size=3, block_rows=4,
                                 rank=0, world_size=1)
        ds.set_position(position)
        dl = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=lambda b: b,
                        generator=torch.Generator().manual_seed(0))
        it = iter(dl)
        return [[(sid, _sha(x["global_crops"][0]), _sha(x["local_crops"][0])) for x, sid in next(it)]
                for _ in range(n)]

    ref = batches(0, 16)  # 48 samples > 38 rows: crosses into epoch 1
    ids = [sid for b in ref for sid, _, _ in b]
    assert len(set(ids[:38])) > 30  # a shuffled pass over the manifest
    for m in (5, 12):  # odd and even batch counts (worker roles rotate on resume)
        assert batches(3 * m, 16 - m) == ref[m:]
    ds = ManifestTileDataset(parquet_manifest, batch_size=3, rank=0, world_size=1)
    ds.set_position(4)
    with pytest.raises(ValueError, match="multiple of batch_size"):
        ds.shard_plan(0, 2)

    # Without workers any position works (CSV manifest, single stream).
    csv = write_manifest(read_manifest(parquet_manifest), parquet_manifest.with_suffix(".csv"))
    ds = ManifestTileDataset(csv, seed=3, csv_block_bytes=300)
    it = iter(ds)
    full = [next(it)[1] for _ in range(50)]
    ds.set_position(23)
    it = iter(ds)
    assert [next(it)[1] for _ in range(27)] == full[23:]


def test_manifest_bad_rows_are_replaced_keeping_positions(tmp_path, parquet_manifest):
    df = read_manifest(parquet_manifest)
    df["cloud_fraction"] = 0.0
    df.loc[4, "path"] = str(tmp_path / "gone.tif")
    df.loc[9, "cloud_fraction"] = 0.9
    df.loc[10, "path"] = "relative/missing.tif"
    m = write_manifest(df, tmp_path / "bad.parquet", row_group_size=6)
    ds = ManifestTileDataset(m, seed=5, infinite=False, shuffle=False, block_rows=6, max_cloud_fraction=0.5)
    ids = [sid for _, sid in ds]
    assert len(ids) == 38  # one sample per row
    assert ds.skipped.as_dict() == {"unreadable": 2, "cloud": 1}
    good_ids = set(df["id"]) - {df.loc[i, "id"] for i in (4, 9, 10)}
    assert set(ids) == good_ids
    ds.set_position(9)
    assert [sid for _, sid in ds] == ids[9:]


# ----------------------------------------------------------------------------------------------- scenes
def test_scene_sampler_dataset_chips_match_the_raster(tmp_path):
    from eo_dinov3.data.samples import fetch_samples, sample_path

    fetch_samples(progress=False)
    scene = sample_path("yell_rgb_0p6m")
    half = tmp_path / "half.tif"
    with rasterio.open(scene) as src:
        arr, profile = src.read(), src.profile
        transform, w, h = src.transform, src.width, src.height
    arr[:, :, : w // 2] = 0
    profile.update(nodata=0)
    with rasterio.open(half, "w", **profile) as dst:
        dst.write(arr)
    ds = SceneSamplerDataset([scene], size=64, length=12, seed=1)
    assert len(ds) == 12
    x, sid = ds[5]
    assert x.shape == (3, 64, 64) and x.dtype == torch.uint8
    x2, sid2 = ds[5]
    assert sid2 == sid and torch.equal(x, x2)
    assert len({ds[i][1] for i in range(12)}) == 12
    clone = pickle.loads(pickle.dumps(ds))  # picklable for spawn-based workers; handles re-opened there
    assert clone._ds is None and torch.equal(clone[5][0], x)
    # The chip equals a direct window read at the chip's map coordinates.
    left, top = (float(v) for v in sid.split("@")[1].split(","))
    with rasterio.open(scene) as src:
        row, col = src.index(left + 0.01, top - 0.01)
        direct = src.read(window=((row, row + 64), (col, col + 64)))
    np.testing.assert_array_equal(x.numpy(), direct)
    # Half-nodata scene: chips over the nodata half are redrawn and counted.
    ds_half = SceneSamplerDataset(half, size=64, length=20, seed=2, max_nodata_fraction=0.0)
    for i in range(20):
        chip, _ = ds_half[i]
        assert (chip.numpy() == 0).all(axis=0).sum() == 0
    assert ds_half.skipped.counts["nodata"] > 0
    with pytest.raises(DataError, match="no usable scene"):
        SceneSamplerDataset([tmp_path / "nothing.tif"], size=64)
