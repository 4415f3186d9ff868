"""Zonal statistics: a synthetic UTM CHM with known values, polygons in EPSG:4326, equal-area hectares, FAO forest."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
gpd = pytest.importorskip("geopandas")
from rasterio.transform import from_origin  # noqa: E402
from shapely.geometry import box  # noqa: E402

from eo_dinov3.canopy.stats import read_aoi, zonal_stats  # noqa: E402
from eo_dinov3.errors import DataError  # noqa: E402

X0, Y0, PX = 500000.0, 5000000.0, 0.5  # UTM 32N, central meridian 9° E (scale factor 0.9996 there)
UTM = "EPSG:32632"


def _chm(path: Path, a: np.ndarray, crs: str = UTM, transform=None) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=a.shape[1], height=a.shape[0], count=1, dtype="float32",
                       crs=crs, transform=transform or from_origin(X0, Y0, PX, PX), nodata=np.nan) as d:
        d.write(a.astype(np.float32), 1)
    return path


def _pixel_box(r0: int, r1: int, c0: int, c1: int):
    """Polygon (UTM) covering pixel rows r0..r1-1 and columns c0..c1-1."""
    return box(X0 + c0 * PX, Y0 - r1 * PX, X0 + c1 * PX, Y0 - r0 * PX)


def _true_area_ha(geom_utm) -> float:
    """Area on the ellipsoid via an equal-area projection (independent of the code under test's method)."""
    g = gpd.GeoSeries([geom_utm], crs=UTM).to_crs("EPSG:6933")  # WGS 84 / NSIDC EASE-Grid 2.0 Global (equal area)
    return float(g.area.iloc[0]) / 1e4


@pytest.fixture()
def scene(tmp_path: Path):
    """400 x 400 px: left half 10 m, right half heights 0..19 m by column (known quantiles), bottom 40 rows NaN."""
    a = np.zeros((400, 400))
    a[:, :200] = 10.0
    a[:, 200:] = np.tile((np.arange(200) % 20).astype(float), (400, 1))  # 0, 1, ..., 19 repeated
    a[360:] = np.nan
    return _chm(tmp_path / "chm.tif", a), a


def test_known_values_with_lonlat_polygons(scene) -> None:
    path, a = scene
    geoms = [_pixel_box(0, 100, 0, 100), _pixel_box(0, 360, 200, 400), _pixel_box(300, 400, 0, 100)]
    aoi = gpd.GeoDataFrame({"name": ["tall", "ramp", "half_nodata"]}, geometry=geoms, crs=UTM).to_crs("EPSG:4326")
    s = zonal_stats(path, aoi).set_index("name")
    tall, ramp, half = s.loc["tall"], s.loc["ramp"], s.loc["half_nodata"]
    assert tall.n_pixels == 100 * 100 and tall.n_valid == 10000
    assert tall.mean_m == pytest.approx(10.0) and tall.median_m == pytest.approx(10.0)
    assert tall.max_m == 10.0 and tall.cover_2m_pct == pytest.approx(100.0) and tall.cover_5m_pct == pytest.approx(100)
    # ramp: uniform over 0..19 m
    assert ramp.mean_m == pytest.approx(9.5, abs=1e-6)
    assert ramp.std_m == pytest.approx(np.std(np.arange(20)), rel=1e-6)
    assert ramp.max_m == 19.0
    assert ramp.median_m == pytest.approx(9.0, abs=0.011)  # 50 % of the area is <= 9 m
    assert ramp.p95_m == pytest.approx(18.0, abs=0.011)
    assert ramp.cover_2m_pct == pytest.approx(90.0, abs=1e-6)  # 18 of 20 values >= 2 m
    assert ramp.cover_5m_pct == pytest.approx(75.0, abs=1e-6)  # 15 of 20 values >= 5 m
    # nodata rows are counted as pixels but not as valid area
    assert half.n_pixels == 10000 and half.n_valid == 6000 and half.nodata_pct == pytest.approx(40.0)
    # hectares on the ellipsoid: UTM near the central meridian shrinks distances by 0.9996 -> areas +0.08 %
    nominal = 100 * 100 * PX * PX / 1e4
    assert tall.valid_area_ha == pytest.approx(_true_area_ha(geoms[0]), rel=2e-4)
    assert tall.valid_area_ha == pytest.approx(nominal / 0.9996**2, rel=2e-4)
    assert half.valid_area_ha == pytest.approx(0.6 * _true_area_ha(geoms[2]), rel=2e-4)
    assert ramp.canopy_area_5m_ha == pytest.approx(0.75 * ramp.valid_area_ha, rel=1e-6)
    assert s.crs.to_epsg() == 4326  # results keep the AOI's CRS


def test_fao_forest_cells(tmp_path: Path) -> None:
    """0.5 ha cells are 141 x 141 px at 0.5 m. Cell (0,0): 15 % > 5 m -> forest; cell (0,1): 5 % -> not forest;
    cell (1,0): 15 % at exactly 5 m (not > 5 m) -> not forest."""
    c = 141
    a = np.zeros((2 * c, 2 * c))
    n15, n5 = int(0.15 * c * c), int(0.05 * c * c)
    for (r, k), n, h in (((0, 0), n15, 12.0), ((0, 1), n5, 12.0), ((1, 0), n15, 5.0)):
        blk = np.zeros(c * c)
        blk[:n] = h
        a[r * c : (r + 1) * c, k * c : (k + 1) * c] = blk.reshape(c, c)
    path = _chm(tmp_path / "f.tif", a)
    aoi = gpd.GeoDataFrame(geometry=[_pixel_box(0, 2 * c, 0, 2 * c)], crs=UTM)
    s = zonal_stats(path, aoi).iloc[0]
    cell_ha = s.valid_area_ha / 4
    assert s.forest_area_ha == pytest.approx(cell_ha, rel=1e-3)
    assert s.cover_5m_pct == pytest.approx(100 * (n15 + n5 + n15) / (4 * c * c), rel=1e-6)  # >= 5 m counts 5.0


def test_web_mercator_raster_gives_true_hectares(tmp_path: Path) -> None:
    """At 60° N a 1 m EPSG:3857 pixel is 0.5 m x 0.5 m on the ground: pixel counts would overstate area 4x."""
    from pyproj import Transformer

    x, y = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True).transform(10.0, 60.0)
    path = _chm(tmp_path / "m.tif", np.full((200, 200), 8.0), crs="EPSG:3857", transform=from_origin(x, y, 1, 1))
    aoi = gpd.GeoDataFrame(geometry=[box(x, y - 200, x + 200, y)], crs="EPSG:3857")
    s = zonal_stats(path, aoi).iloc[0]
    expected = 200 * 200 * math.cos(math.radians(60.0 - 0.0009)) ** 2 / 1e4  # centre latitude ~59.9991°
    assert s.valid_area_ha == pytest.approx(expected, rel=5e-3)
    assert s.valid_area_ha < 0.3 * (200 * 200 / 1e4)


def test_aoi_formats_and_errors(scene, tmp_path: Path) -> None:
    path, _ = scene
    aoi = gpd.GeoDataFrame({"id": [1]}, geometry=[_pixel_box(0, 100, 0, 100)], crs=UTM).to_crs("EPSG:4326")
    aoi.to_file(tmp_path / "a.gpkg", driver="GPKG")
    aoi.to_file(tmp_path / "a.geojson", driver="GeoJSON")
    shp = tmp_path / "shp"
    shp.mkdir()
    aoi.to_crs("EPSG:3035").to_file(shp / "a.shp")
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as z:
        for f in shp.iterdir():
            z.write(f, f.name)
    means = [zonal_stats(path, read_aoi(tmp_path / n)).iloc[0].mean_m for n in ("a.gpkg", "a.geojson", "a.zip")]
    assert means == pytest.approx([10.0] * 3)
    with pytest.raises(DataError, match="Polygon"):
        zonal_stats(path, gpd.GeoDataFrame(geometry=gpd.points_from_xy([X0], [Y0]), crs=UTM))
    with pytest.raises(DataError, match="no CRS"):
        zonal_stats(path, gpd.GeoDataFrame(geometry=[_pixel_box(0, 1, 0, 1)]))
    # a polygon outside the raster: zero pixels, NaN statistics, no crash
    far = gpd.GeoDataFrame(geometry=[box(0, 0, 10, 10)], crs=UTM)
    r = zonal_stats(path, far).iloc[0]
    assert r.n_pixels == 0 and math.isnan(r.mean_m) and r.valid_area_ha == 0


def test_cli_stats(scene, tmp_path: Path) -> None:
    import pandas as pd

    from eo_dinov3.cli import main

    path, _ = scene
    aoi = gpd.GeoDataFrame({"name": ["tall"]}, geometry=[_pixel_box(0, 100, 0, 100)], crs=UTM).to_crs("EPSG:4326")
    aoi.to_file(tmp_path / "aoi.geojson", driver="GeoJSON")
    assert main(["chm", "stats", str(path), "--aoi", str(tmp_path / "aoi.geojson"), "--out",
                 str(tmp_path / "s.csv")]) == 0
    df = pd.read_csv(tmp_path / "s.csv")
    assert list(df.name) == ["tall"] and df.mean_m.iloc[0] == pytest.approx(10.0)
    assert {"median_m", "p95_m", "max_m", "cover_2m_pct", "cover_5m_pct", "forest_area_ha", "n_pixels"} <= set(df)
    assert main(["chm", "stats", str(path), "--aoi", str(tmp_path / "aoi.geojson"), "--out",
                 str(tmp_path / "s.geojson")]) == 0
    assert gpd.read_file(tmp_path / "s.geojson").mean_m.iloc[0] == pytest.approx(10.0)
