"""Zonal statistics of a canopy-height raster per polygon: heights, canopy cover, hectares, FAO forest area.

:func:`zonal_stats` (used by ``eo-dinov3 chm stats`` and the app) returns one row per polygon:

* ``n_pixels`` (pixel centres inside the polygon; ``all_touched=True`` counts every touched pixel), ``n_valid``,
  ``nodata_pct``;
* ``mean_m``, ``std_m``, ``median_m``, ``p95_m``, ``max_m`` — area-weighted over valid pixels (on a projected grid
  all pixels have the same area, so this is the plain pixel statistic); quantiles come from a 1 cm histogram
  (0–200 m), so they are exact to 1 cm;
* ``cover_2m_pct``, ``cover_5m_pct`` — share of the valid area with height ``>=`` 2 m / 5 m;
* ``valid_area_ha``, ``canopy_area_2m_ha``, ``canopy_area_5m_ha``;
* ``forest_area_ha`` — FAO forest (trees higher than 5 m, canopy cover above 10 %, at least 0.5 ha): the raster is
  divided into square cells of ~0.5 ha aligned to the pixel grid (side ``round(sqrt(5000 m²) / GSD)`` px); a cell
  is forest when more than 10 % of its valid area inside the polygon is higher than 5 m, and the forest area is the
  valid area of forest cells inside the polygon. This is a grid approximation of FAO's land-use definition (no
  patch connectivity, no land-use exclusion such as orchards or urban parks).

**Areas** are computed on an equal-area basis whatever the raster CRS: each pixel's corners are projected to a
Lambert Azimuthal Equal-Area projection centred on the polygon and the polygon area of the projected pixel is used
(sampled every 64 columns, exact per row). So a Web-Mercator or EPSG:4326 CHM still gives true hectares;
EPSG:3857 pixel counts alone would overstate areas by 1/cos²(latitude).

Polygons may be in any CRS (they are reprojected to the raster CRS). The raster is read per polygon in row-strips
aligned to the forest cells, so memory does not depend on the polygon or raster size.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eo_dinov3.errors import DataError

HIST_STEP_M = 0.01
HIST_MAX_M = 200.0
AREA_SAMPLE_COLS = 64


def read_aoi(path: str | os.PathLike) -> Any:
    """Polygons from GeoJSON, GeoPackage, a shapefile or a zipped shapefile (any CRS) as a GeoDataFrame.

    Raises:
        DataError: unreadable file, no features, no CRS, or non-polygon geometries.
    """
    import geopandas as gpd

    p = str(path)
    if not os.path.exists(p):
        raise DataError(f"AOI file {p!r} does not exist; check the path")
    try:
        gdf = gpd.read_file(p)
    except Exception as e:  # noqa: BLE001 - pyogrio/fiona raise many types
        raise DataError(f"cannot read polygons from {p!r} (GeoJSON, GPKG or zipped shapefile expected): "
                        f"{str(e).splitlines()[0][:200]}") from e
    return check_aoi(gdf, p)


def check_aoi(gdf: Any, name: str = "AOI") -> Any:
    """Validate a GeoDataFrame of polygons (CRS set, polygonal, non-empty); returns it."""
    if len(gdf) == 0:
        raise DataError(f"{name} contains no features")
    if gdf.crs is None:
        raise DataError(f"{name} has no CRS; save it with a CRS (GeoJSON is EPSG:4326 by definition)")
    kinds = set(gdf.geometry.geom_type.dropna())
    if not kinds <= {"Polygon", "MultiPolygon"}:
        raise DataError(f"{name} has {sorted(kinds)} geometries; zonal statistics need Polygon/MultiPolygon")
    return gdf


def _equal_area_crs(lon: float, lat: float) -> str:
    return f"+proj=laea +lat_0={lat:.8f} +lon_0={lon:.8f} +datum=WGS84 +units=m +no_defs"


def pixel_areas_m2(transform: Any, crs: Any, rows: np.ndarray, cols: np.ndarray, ea_crs: str) -> np.ndarray:
    """Ground area ``[len(rows), len(cols)]`` in m² of pixels ``(row, col)`` (indexes in ``transform``'s grid),
    from their corners projected to the equal-area CRS ``ea_crs``."""
    from pyproj import Transformer

    tr = Transformer.from_crs(crs, ea_crs, always_xy=True)
    r = np.asarray(rows, np.float64)[:, None]
    c = np.asarray(cols, np.float64)[None, :]
    corners = [(c, r), (c + 1, r), (c + 1, r + 1), (c, r + 1)]
    xs, ys = [], []
    for cc, rr in corners:
        cc, rr = np.broadcast_arrays(cc, rr)
        x = transform.c + transform.a * cc + transform.b * rr
        y = transform.f + transform.d * cc + transform.e * rr
        ex, ey = tr.transform(x, y)
        xs.append(np.asarray(ex))
        ys.append(np.asarray(ey))
    area = np.zeros(np.broadcast_shapes(r.shape, c.shape))
    for i in range(4):
        j = (i + 1) % 4
        area += xs[i] * ys[j] - xs[j] * ys[i]
    return np.abs(area) / 2.0


@dataclass
class _Zone:
    n_pixels: int = 0
    n_valid: int = 0
    area: float = 0.0
    sum_h: float = 0.0
    sum_h2: float = 0.0
    max_h: float = -math.inf
    cover: dict[float, float] = field(default_factory=dict)
    forest: float = 0.0
    hist: np.ndarray = field(default_factory=lambda: np.zeros(int(HIST_MAX_M / HIST_STEP_M) + 1))

    def quantile(self, q: float) -> float:
        tot = self.hist.sum()
        if tot <= 0:
            return float("nan")
        cdf = np.cumsum(self.hist)
        i = int(np.searchsorted(cdf, q * tot, side="left"))
        return round(min(i, len(self.hist) - 1) * HIST_STEP_M, 6)


def _cell_px(gsd_m: float, cell_ha: float) -> int:
    return max(1, int(round(math.sqrt(cell_ha * 1e4) / gsd_m)))


def _raster_gsd_m(src: Any) -> float:
    """Approximate ground pixel size (m) for sizing forest cells (projected: scale-corrected; geographic: at centre)."""
    if src.crs.is_geographic:
        from eo_dinov3.data.raster_io import gsd_metres

        return gsd_metres(src)
    from eo_dinov3.canopy.mapping import ground_gsd

    gx, gy = ground_gsd(src)
    return (gx + gy) / 2.0


def _zone_stats(src: Any, geom: Any, ea_crs: str, cell: int, thresholds: tuple[float, ...], forest_h: float,
                forest_cover: float, all_touched: bool, strip_rows: int) -> _Zone:
    from rasterio.features import geometry_mask
    from rasterio.windows import Window, from_bounds
    from rasterio.windows import transform as win_transform

    z = _Zone(cover=dict.fromkeys(thresholds, 0.0))
    if geom is None or geom.is_empty:
        return z
    w = from_bounds(*geom.bounds, transform=src.transform)
    r0 = max(0, int(math.floor(w.row_off)) - 1)
    c0 = max(0, int(math.floor(w.col_off)) - 1)
    r1 = min(src.height, int(math.ceil(w.row_off + w.height)) + 1)
    c1 = min(src.width, int(math.ceil(w.col_off + w.width)) + 1)
    if r1 <= r0 or c1 <= c0:
        return z
    # align to the forest-cell grid
    r0, c0 = r0 // cell * cell, c0 // cell * cell
    step = max(cell, strip_rows // cell * cell)
    ncols = c1 - c0
    sample = np.unique(np.r_[np.arange(0, ncols, AREA_SAMPLE_COLS), ncols - 1])
    for rs in range(r0, r1, step):
        re = min(rs + step, r1)
        win = Window(c0, rs, ncols, re - rs)
        data = src.read(1, window=win, masked=True)
        h = np.ma.getdata(data).astype(np.float64)
        valid = ~np.ma.getmaskarray(data) & np.isfinite(h)
        inside = geometry_mask([geom], out_shape=h.shape, transform=win_transform(win, src.transform),
                               invert=True, all_touched=all_touched)
        if not inside.any():
            continue
        rows = np.arange(rs, re)
        a_s = pixel_areas_m2(src.transform, src.crs, rows, c0 + sample, ea_crs)
        area = np.empty(h.shape)
        for i in range(len(rows)):
            area[i] = np.interp(np.arange(ncols), sample, a_s[i])
        use = inside & valid
        z.n_pixels += int(inside.sum())
        z.n_valid += int(use.sum())
        hv, av = h[use], area[use]
        z.area += av.sum()
        z.sum_h += (hv * av).sum()
        z.sum_h2 += (hv * hv * av).sum()
        if hv.size:
            z.max_h = max(z.max_h, float(hv.max()))
        for t in thresholds:
            z.cover[t] += av[hv >= t].sum()
        bins = np.clip(np.floor(hv / HIST_STEP_M + 1e-9), 0, len(z.hist) - 1).astype(np.int64)
        z.hist += np.bincount(bins, weights=av, minlength=len(z.hist))
        # FAO forest on ~0.5 ha cells aligned to the pixel grid
        nr, nc = h.shape
        pr, pc = (-nr) % cell, (-nc) % cell
        ua = np.pad(np.where(use, area, 0.0), ((0, pr), (0, pc)))
        ta = np.pad(np.where(use & (h > forest_h), area, 0.0), ((0, pr), (0, pc)))
        br, bc = ua.shape[0] // cell, ua.shape[1] // cell
        cell_valid = ua.reshape(br, cell, bc, cell).sum(axis=(1, 3))
        cell_tall = ta.reshape(br, cell, bc, cell).sum(axis=(1, 3))
        forest = (cell_valid > 0) & (cell_tall > forest_cover * cell_valid)
        z.forest += cell_valid[forest].sum()
    return z


def zonal_stats(
    chm_path: str | os.PathLike,
    aoi: Any,
    *,
    cover_thresholds: tuple[float, ...] = (2.0, 5.0),
    forest_height_m: float = 5.0,
    forest_cover: float = 0.10,
    forest_cell_ha: float = 0.5,
    all_touched: bool = False,
    strip_rows: int = 1024,
) -> Any:
    """Per-polygon canopy-height statistics (see module docstring) as a GeoDataFrame in the AOI's CRS.

    Args:
        chm_path: canopy-height raster in metres (band 1; nodata/NaN honoured; any CRS).
        aoi: GeoDataFrame of polygons or a path readable by :func:`read_aoi`.
        cover_thresholds: heights (m) for canopy cover / canopy area columns.
        forest_height_m / forest_cover / forest_cell_ha: FAO forest definition (> 5 m, > 10 %, 0.5 ha cells).
        all_touched: count every pixel the polygon touches (default: pixel centres inside).
        strip_rows: rows read at a time.
    """
    import geopandas as gpd

    from eo_dinov3.canopy.mapping import open_input_raster

    gdf = read_aoi(aoi) if isinstance(aoi, (str, os.PathLike)) else check_aoi(aoi)
    with open_input_raster(chm_path) as src:
        if src.crs is None:
            raise DataError(f"{str(chm_path)!r} has no CRS; zonal statistics need a georeferenced raster")
        zones = gdf.to_crs(src.crs)
        ll = gdf.to_crs("EPSG:4326")
        cell = _cell_px(_raster_gsd_m(src), forest_cell_ha)
        rows = []
        for geom, geom_ll in zip(zones.geometry, ll.geometry):
            ctr = geom_ll.centroid if geom_ll is not None and not geom_ll.is_empty else None
            ea = _equal_area_crs(ctr.x, ctr.y) if ctr is not None else _equal_area_crs(0.0, 0.0)
            z = _zone_stats(src, geom, ea, cell, tuple(cover_thresholds), forest_height_m, forest_cover,
                            all_touched, strip_rows)
            rows.append(_row(z, cover_thresholds))
    out = gpd.GeoDataFrame(gdf.drop(columns="geometry").reset_index(drop=True).assign(**{
        k: [r[k] for r in rows] for k in rows[0]}), geometry=gdf.geometry.reset_index(drop=True), crs=gdf.crs)
    return out


def _row(z: _Zone, thresholds: tuple[float, ...]) -> dict[str, float]:
    nan = float("nan")
    a = z.area
    mean = z.sum_h / a if a > 0 else nan
    var = max(z.sum_h2 / a - mean * mean, 0.0) if a > 0 else nan
    row = {
        "n_pixels": z.n_pixels,
        "n_valid": z.n_valid,
        "nodata_pct": 100.0 * (1 - z.n_valid / z.n_pixels) if z.n_pixels else nan,
        "mean_m": mean,
        "std_m": math.sqrt(var) if a > 0 else nan,
        "median_m": z.quantile(0.5),
        "p95_m": z.quantile(0.95),
        "max_m": z.max_h if z.n_valid else nan,
    }
    for t in thresholds:
        row[f"cover_{t:g}m_pct"] = 100.0 * z.cover[t] / a if a > 0 else nan
    row["valid_area_ha"] = a / 1e4
    for t in thresholds:
        row[f"canopy_area_{t:g}m_ha"] = z.cover[t] / 1e4
    row["forest_area_ha"] = z.forest / 1e4
    return row


def write_stats(gdf: Any, out: str | os.PathLike) -> Path:
    """Write zonal statistics: ``.csv`` (attributes only), ``.geojson`` / ``.json`` or ``.gpkg`` (with geometry)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ext = out.suffix.lower()
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}{out.suffix}")
    if ext == ".csv":
        gdf.drop(columns="geometry").to_csv(tmp, index=False)
    elif ext in (".geojson", ".json"):
        gdf.to_crs("EPSG:4326").to_file(tmp, driver="GeoJSON")
    elif ext == ".gpkg":
        gdf.to_file(tmp, driver="GPKG")
    else:
        raise DataError(f"unsupported output {out.name!r}; use .csv, .geojson or .gpkg")
    os.replace(tmp, out)
    return out
