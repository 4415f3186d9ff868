"""Lidar canopy height models: real Autzen cloud (feet, EPSG:2994), a synthetic cloud with known heights, TIN."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
laspy = pytest.importorskip("laspy")

from eo_dinov3.canopy.lidar import FOOT_M, LidarGrid, chm_from_lidar, lidar_rgb_raster, tin_grid  # noqa: E402
from eo_dinov3.errors import DataError  # noqa: E402


@pytest.fixture(scope="module")
def autzen() -> Path:
    from eo_dinov3.data import samples

    samples.fetch_samples(progress=False)
    path = samples.sample_path("autzen_laz")
    if str(path).endswith(".laz") and not laspy.LazBackend.detect_available():
        pytest.skip("no LAZ backend (lazrs) installed")
    return path


@pytest.fixture(scope="module")
def autzen_chm(autzen: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("autzen")
    return chm_from_lidar(autzen, out / "chm.tif", resolution_m=0.6, rgb_out=out / "rgb.tif"), out


def test_autzen_heights_are_metres(autzen_chm) -> None:
    r, _ = autzen_chm
    with rasterio.open(r.chm_path) as d:
        chm = d.read(1)
        tags = d.tags()
        assert d.crs.to_epsg() == 2994 and d.dtypes[0] == "float32" and np.isnan(d.nodata)
        # 0.6 m expressed in international feet
        assert d.transform.a == pytest.approx(0.6 / FOOT_M, rel=1e-12)
        assert d.transform.e == pytest.approx(-0.6 / FOOT_M, rel=1e-12)
    v = chm[np.isfinite(chm)]
    assert 0.45 * chm.size < v.size < 0.6 * chm.size  # the river (isolated returns only) stays nodata: ~51 %
    assert v.min() >= 0.0
    assert 20.0 < v.max() < 60.0  # tallest trees/lights: metres, not feet (feet would be > 65)
    tall = v[v > 3.0]
    assert 0.03 < tall.size / v.size < 0.5  # houses and trees exist, most of the area is ground/grass
    assert 5.0 < np.median(tall) < 30.0
    assert np.median(v) < 1.0  # streets, parking and lawns are ~0 m
    assert tags["UNITS"] == "metre" and float(tags["Z_TO_METRE"]) == pytest.approx(FOOT_M)
    assert "assumed" in tags["VERTICAL_UNIT_SOURCE"] and "foot" in tags["VERTICAL_UNIT_SOURCE"]
    assert r.n_ground > 1000


def test_autzen_vertical_unit_conversion(autzen: Path, autzen_chm, tmp_path: Path) -> None:
    """Declaring the z unit as metres leaves heights in feet: exactly 1/0.3048 times larger."""
    r, _ = autzen_chm
    wrong = chm_from_lidar(autzen, tmp_path / "ft.tif", z_unit="m")
    with rasterio.open(r.chm_path) as a, rasterio.open(wrong.chm_path) as b:
        ma, mb = a.read(1), b.read(1)
    ok = np.isfinite(ma) & (ma > 1.0)
    np.testing.assert_allclose(mb[ok] * FOOT_M, ma[ok], rtol=1e-4)


def test_autzen_rgb_is_aligned_training_pair(autzen: Path, autzen_chm, tmp_path: Path) -> None:
    from eo_dinov3.data import samples

    r, out = autzen_chm
    with rasterio.open(r.chm_path) as c, rasterio.open(out / "rgb.tif") as g, \
            rasterio.open(samples.sample_path("autzen_rgb_0p6m")) as s:
        assert g.count == 3 and g.dtypes[0] == "uint8"
        assert g.transform == c.transform and g.shape == c.shape and g.crs == c.crs
        assert s.transform.almost_equals(c.transform) and s.shape == c.shape  # same grid as the shipped sample
        rgb = g.read()
        chm = c.read(1)
    has = (rgb > 0).any(axis=0)
    assert (has == np.isfinite(chm)).mean() > 0.99  # colour wherever there is height
    assert rgb[:, has].std() > 10  # real colours, not a constant
    standalone = lidar_rgb_raster(autzen, tmp_path / "rgb2.tif")
    with rasterio.open(standalone) as d:
        np.testing.assert_array_equal(d.read(), rgb)


def _synthetic_las(path: Path, epsg: int = 32610) -> None:
    """A 20 m x 20 m metre-unit cloud: ground plane z = 100 + 0.1 x (class 2), a 10 m-high 4 m x 4 m 'tree'
    (class 1) over x, y in [8, 12) and a noise point (class 7) 50 m up."""
    from pyproj import CRS

    rng = np.random.default_rng(0)
    gx, gy = rng.uniform(0, 20, 4000), rng.uniform(0, 20, 4000)
    tx, ty = rng.uniform(8, 12, 800), rng.uniform(8, 12, 800)
    x = np.r_[gx, tx, 5.0] + 500000.0
    y = np.r_[gy, ty, 5.0] + 4000000.0
    z = np.r_[100 + 0.1 * gx, 100 + 0.1 * tx + 10.0, 150.0]
    cls = np.r_[np.full(4000, 2), np.full(800, 1), 7].astype(np.uint8)
    header = laspy.LasHeader(point_format=3, version="1.2")
    header.offsets = [500000.0, 4000000.0, 0.0]
    header.scales = [0.001, 0.001, 0.001]
    header.add_crs(CRS.from_epsg(epsg))
    las = laspy.LasData(header)
    las.x, las.y, las.z = x, y, z
    las.classification = cls
    las.return_number = np.ones(len(x), np.uint8)
    las.number_of_returns = np.ones(len(x), np.uint8)
    las.write(str(path))


def test_synthetic_cloud_known_heights(tmp_path: Path) -> None:
    _synthetic_las(tmp_path / "c.las")
    r = chm_from_lidar(tmp_path / "c.las", tmp_path / "chm.tif", resolution_m=1.0, gap_fill_px=0)
    with rasterio.open(r.chm_path) as d:
        chm = d.read(1)
        t = d.transform
        assert d.crs.to_epsg() == 32610 and t.a == 1.0
    cols = (np.arange(d.width) + 0.5) * t.a + t.c - 500000.0
    rows = t.f - (np.arange(d.height) + 0.5) - 4000000.0
    xx, yy = np.meshgrid(cols, rows)
    tree = (xx > 8.5) & (xx < 11.5) & (yy > 8.5) & (yy < 11.5)
    ground = ((xx < 6) | (xx > 14)) & (xx > 0.5) & (xx < 19.5) & (yy > 0.5) & (yy < 19.5)
    np.testing.assert_allclose(chm[tree], 10.0, atol=0.15)  # highest tree point per 1 m cell, minus the plane
    assert np.nanmax(chm[ground]) < 0.15  # bare ground; the 50 m noise point is ignored
    assert np.nanmax(chm) < 10.2
    assert r.z_to_metre == 1.0


def test_cloud_without_ground_is_refused(tmp_path: Path) -> None:
    _synthetic_las(tmp_path / "c.las")
    las = laspy.read(str(tmp_path / "c.las"))
    las.classification = np.ones(len(las.x), np.uint8)
    las.write(str(tmp_path / "noground.las"))
    with pytest.raises(DataError, match="ground"):
        chm_from_lidar(tmp_path / "noground.las", tmp_path / "x.tif")
    assert not (tmp_path / "x.tif").exists()
    (tmp_path / "bad.laz").write_bytes(b"not a point cloud")
    with pytest.raises(DataError, match="LAS/LAZ"):
        chm_from_lidar(tmp_path / "bad.laz", tmp_path / "x.tif")


def test_tin_grid_matches_scipy_linear_interpolation() -> None:
    from scipy.interpolate import LinearNDInterpolator

    rng = np.random.default_rng(1)
    p = rng.random((300, 2)) * 50
    z = p[:, 0] * 0.3 + p[:, 1] ** 1.5 * 0.01 + rng.random(300)
    grid = LidarGrid(0.0, 50.0, 0.7, 72, 72, 0.7, None, 1.0)
    ours = tin_grid(p[:, 0], p[:, 1], z, grid)
    xc, yc = grid.centres()
    xx, yy = np.meshgrid(xc, yc)
    ref = LinearNDInterpolator(p, z)(np.column_stack([xx.ravel(), yy.ravel()])).reshape(72, 72)
    assert np.array_equal(np.isnan(ours), np.isnan(ref))
    np.testing.assert_allclose(ours[np.isfinite(ours)], ref[np.isfinite(ref)], atol=1e-9)


def test_cli_from_lidar(autzen: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from eo_dinov3.cli import main

    assert main(["chm", "from-lidar", str(autzen), "--resolution", "1.2", "--min-coverage", "0.5",
                 "--out", str(tmp_path / "c.tif")]) == 0
    assert "heights in metres" in capsys.readouterr().out
    with rasterio.open(tmp_path / "c.tif") as d:
        assert d.transform.a == pytest.approx(1.2 / FOOT_M)


def _patch_and_isolated_las(path: Path) -> None:
    """Metre-unit cloud, flat ground z = 100 (class 2), colour (200, 50, 50): a dense 20 m x 20 m patch (25 pts/m²)
    with an empty 2 m x 2 m hole at x, y in [9, 11), and east of it, over x in [30, 50), isolated returns 5 m apart
    (like a lidar cloud over water)."""
    from pyproj import CRS

    rng = np.random.default_rng(0)
    px, py = rng.uniform(0, 20, 10000), rng.uniform(0, 20, 10000)
    keep = ~((px >= 9) & (px < 11) & (py >= 9) & (py < 11))
    px, py = px[keep], py[keep]
    ix, iy = np.meshgrid(np.arange(30.2, 50, 5.0), np.arange(2.2, 20, 5.0))
    x = np.r_[px, ix.ravel()] + 500000.0
    y = np.r_[py, iy.ravel()] + 4000000.0
    header = laspy.LasHeader(point_format=3, version="1.2")
    header.offsets = [500000.0, 4000000.0, 0.0]
    header.scales = [0.001, 0.001, 0.001]
    header.add_crs(CRS.from_epsg(32610))
    las = laspy.LasData(header)
    las.x, las.y, las.z = x, y, np.full(len(x), 100.0)
    las.classification = np.full(len(x), 2, np.uint8)
    las.return_number = np.ones(len(x), np.uint8)
    las.number_of_returns = np.ones(len(x), np.uint8)
    las.red, las.green, las.blue = (np.full(len(x), v * 256, np.uint16) for v in (200, 50, 50))
    las.write(str(path))


def test_density_aware_gap_fill(tmp_path: Path) -> None:
    """A small hole inside covered ground is filled; isolated returns stay single cells (no discs) unless
    min_coverage=0, in CHM and RGB alike."""
    from eo_dinov3.canopy.lidar import fill_mask

    _patch_and_isolated_las(tmp_path / "c.las")
    grids = {}
    for cov in (0.5, 0.0):
        r = chm_from_lidar(tmp_path / "c.las", tmp_path / f"chm{cov}.tif", resolution_m=0.5, gap_fill_px=4,
                           min_coverage=cov, rgb_out=tmp_path / f"rgb{cov}.tif")
        with rasterio.open(r.chm_path) as c, rasterio.open(r.rgb_path) as g:
            chm, rgb, t = c.read(1), g.read(), c.transform
        assert (np.isfinite(chm) == (rgb > 0).any(axis=0)).all()  # one mask for both rasters
        grids[cov] = chm, rgb
    xs = (np.arange(chm.shape[1]) + 0.5) * t.a + t.c - 500000.0
    ys = t.f - (np.arange(chm.shape[0]) + 0.5) * 0.5 - 4000000.0
    xx, yy = np.meshgrid(xs, ys)
    hole = (xx > 9.2) & (xx < 10.8) & (yy > 9.2) & (yy < 10.8)
    water = xx > 29.0
    chm, rgb = grids[0.5]
    assert hole.sum() >= 9 and np.isfinite(chm[hole]).all()  # filled: ground height, point colour
    np.testing.assert_allclose(chm[hole], 0.0, atol=1e-3)
    assert (rgb[0][hole] == 200).all()
    n_iso = 16
    assert np.isfinite(chm[water]).sum() == n_iso  # each isolated return is one cell, nothing around it
    chm0, _ = grids[0.0]
    assert np.isfinite(chm0[water]).sum() > 20 * n_iso  # the plain distance rule grows ~49-cell discs
    # the mask on its own: a 1-px hole in full coverage is filled, a lone cell is not grown, bounds checked
    v = np.ones((20, 20), bool)
    v[10, 10] = False
    assert fill_mask(v, 3, 0.5).all()
    lone = np.zeros((20, 20), bool)
    lone[5, 5] = True
    assert (fill_mask(lone, 3, 0.5) == lone).all() and fill_mask(lone, 3, 0.0).sum() == 29
    with pytest.raises(DataError, match="min_coverage"):
        fill_mask(v, 3, 1.5)
