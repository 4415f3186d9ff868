"""Canopy height models (CHM) and aligned RGB rasters from airborne lidar point clouds (LAS/LAZ).

``CHM = DSM - DTM``, in **metres**, on a north-up grid in the cloud's own CRS:

* **DSM** (surface): per cell, the highest *first* return (``returns="first"``, what an optical satellite sees from
  above) or the highest return of any order (``returns="all"``); noise classes 7 and 18 are dropped.
* **DTM** (ground): the ground-classified points (ASPRS class 2) are thinned to the lowest ground point per cell,
  triangulated (Delaunay) and linearly interpolated at every cell centre — a TIN, as LAStools ``las2dem`` and PDAL
  ``filters.delaunay`` do. A TIN honours every ground point exactly and does not create the "bull's-eye" bumps of
  inverse-distance weighting around isolated points; cells outside the hull of the ground points take the value of
  the nearest ground point.
* Heights below 0 (interpolation noise on bare ground) are set to 0. **Density-aware gap filling**
  (:func:`fill_mask`): an empty cell is filled (GDAL ``fillnodata``, inverse-distance, no smoothing) only when it
  lies within ``gap_fill_px`` pixels of data *and* at least ``min_coverage`` of the cells in the disc of radius
  ``gap_fill_px`` around it hold returns. This closes the sampling holes of a sparse cloud inside covered areas
  (at ~1.8 points/m² about half of the 0.6 m cells are empty) but leaves water, where a cloud has only isolated
  returns, as nodata: unconditional filling would turn every isolated return into a disc ``2·gap_fill_px + 1`` px
  wide that looks like a tree crown in the RGB. ``min_coverage=0`` gives the plain distance rule. Other cells stay
  nodata (NaN in the CHM, 0 in the RGB); the CHM and the RGB share one mask.
* **Units.** The grid step is ``resolution_m`` metres expressed in the CRS's linear unit (e.g. 0.6 m = 1.9685
  international feet for EPSG:2994). Vertical units come from a compound CRS's vertical axis, else the GeoTIFF
  ``VerticalUnitsGeoKey`` (4099) of the LAS header, else they are *assumed* to equal the horizontal unit (the usual
  convention for US State Plane data; the tags say which rule applied). Heights are converted to metres;
  ``VERTICAL_UNIT_SOURCE``, ``Z_TO_METRE`` and ``UNITS=metre`` are written to the tags.

The cloud is read in chunks (``laspy`` chunk iterator), so memory grows with the grid size, not the point count.
:func:`lidar_rgb_raster` rasterises the point colours (colour of the highest selected return per cell) on exactly
the same grid, giving an RGB + CHM training pair; grids are aligned to multiples of the pixel size like the
``autzen_rgb_0p6m`` sample.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eo_dinov3.errors import DataError

FOOT_M = 0.3048
US_SURVEY_FOOT_M = 1200.0 / 3937.0
_UNIT_CODES = {9001: ("metre", 1.0), 9002: ("foot", FOOT_M), 9003: ("US survey foot", US_SURVEY_FOOT_M)}
NOISE_CLASSES = (7, 18)
GROUND_CLASS = 2
CHUNK_POINTS = 2_000_000


@dataclass(frozen=True)
class LidarGrid:
    """A north-up raster grid in the cloud CRS. ``pixel`` is in CRS units; ``resolution_m`` in metres."""

    left: float
    top: float
    pixel: float
    width: int
    height: int
    resolution_m: float
    crs_wkt: str | None
    xy_to_metre: float

    @property
    def transform(self):
        from affine import Affine

        return Affine(self.pixel, 0.0, self.left, 0.0, -self.pixel, self.top)

    def cells(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flat cell index ``row * width + col`` of points and a bool for "inside the grid"."""
        col = np.floor((x - self.left) / self.pixel).astype(np.int64)
        row = np.floor((self.top - y) / self.pixel).astype(np.int64)
        inside = (col >= 0) & (col < self.width) & (row >= 0) & (row < self.height)
        return row * self.width + col, inside

    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Cell-centre coordinates ``x [W]``, ``y [H]`` in CRS units."""
        return (self.left + (np.arange(self.width) + 0.5) * self.pixel,
                self.top - (np.arange(self.height) + 0.5) * self.pixel)


@dataclass(frozen=True)
class LidarUnits:
    crs: Any  # pyproj.CRS or None
    xy_to_metre: float
    z_to_metre: float
    z_source: str


def _open(path: str | os.PathLike):
    import laspy

    if not os.path.exists(path):
        raise DataError(f"point cloud {str(path)!r} does not exist; check the path")
    if str(path).lower().endswith(".laz") and not laspy.LazBackend.detect_available():
        raise DataError("LAZ decompression is unavailable: install the lazrs backend (pip install 'laspy[lazrs]')")
    try:
        return laspy.open(str(path))
    except Exception as e:  # noqa: BLE001 - laspy raises several types for non-LAS input
        raise DataError(f"{str(path)!r} is not a readable LAS/LAZ file: {str(e).splitlines()[0][:200]}") from e


def cloud_units(header: Any, crs_override: Any = None, z_unit: str | float | None = None) -> LidarUnits:
    """CRS and horizontal/vertical unit factors (to metres) of a LAS header (see module docstring)."""
    from pyproj import CRS

    crs = CRS.from_user_input(crs_override) if crs_override is not None else header.parse_crs()
    if crs is None:
        raise DataError("the point cloud has no CRS in its header (no WKT or GeoKey VLR); pass crs=... "
                        "(--crs EPSG:XXXX) to say which CRS its coordinates are in")
    horiz = crs.sub_crs_list[0] if crs.is_compound else crs
    if horiz.is_geographic:
        raise DataError(f"the point cloud is in a geographic CRS ({horiz.name}); reproject it to a projected CRS "
                        "(e.g. pdal translate with filters.reprojection to UTM) first")
    xy = float(horiz.axis_info[0].unit_conversion_factor)
    if z_unit is not None:
        zf = {"m": 1.0, "metre": 1.0, "ft": FOOT_M, "foot": FOOT_M, "us-ft": US_SURVEY_FOOT_M}.get(z_unit, None) \
            if isinstance(z_unit, str) else float(z_unit)
        if zf is None:
            raise DataError(f"unknown z unit {z_unit!r}; use m, ft, us-ft or a factor to metres")
        return LidarUnits(crs, xy, zf, "given by the user")
    if crs.is_compound and len(crs.sub_crs_list) > 1:
        v = crs.sub_crs_list[1]
        return LidarUnits(crs, xy, float(v.axis_info[0].unit_conversion_factor),
                          f"vertical CRS {v.name} ({v.axis_info[0].unit_name})")
    for vlr in header.vlrs:
        for key in getattr(vlr, "geo_keys", []) or []:
            if key.id == 4099 and key.tiff_tag_location == 0 and key.value_offset in _UNIT_CODES:
                name, f = _UNIT_CODES[key.value_offset]
                return LidarUnits(crs, xy, f, f"VerticalUnitsGeoKey ({name})")
    return LidarUnits(crs, xy, xy, f"assumed equal to the horizontal unit ({horiz.axis_info[0].unit_name}); "
                                   "the header declares no vertical unit")


def make_grid(header: Any, units: LidarUnits, resolution_m: float) -> LidarGrid:
    """Grid covering the header bounds, pixel = ``resolution_m`` in CRS units, origin on multiples of the pixel."""
    if resolution_m <= 0:
        raise DataError(f"resolution must be positive, got {resolution_m}")
    px = resolution_m / units.xy_to_metre
    (x0, y0), (x1, y1) = header.mins[:2], header.maxs[:2]
    left, top = math.floor(x0 / px) * px, math.ceil(y1 / px) * px
    width = int(math.ceil((x1 - left) / px)) + 1
    height = int(math.ceil((top - y0) / px)) + 1
    if width * height > 400_000_000:
        raise DataError(f"a {resolution_m} m grid over this cloud has {width} x {height} cells; use a coarser "
                        "resolution or tile the cloud")
    return LidarGrid(left, top, px, width, height, resolution_m, units.crs.to_wkt(), units.xy_to_metre)


@dataclass
class _Rasters:
    dsm: np.ndarray  # [H*W] float64, -inf where empty
    rgb: np.ndarray | None  # [3, H*W] uint16
    gz: np.ndarray  # [H*W] lowest ground z, +inf where none
    gx: np.ndarray
    gy: np.ndarray
    n_points: int = 0
    n_ground: int = 0
    colour_bits16: bool = False


def _rasterise(path: str | os.PathLike, grid: LidarGrid, returns: str, with_rgb: bool) -> _Rasters:
    n = grid.width * grid.height
    r = _Rasters(np.full(n, -np.inf), np.zeros((3, n), np.uint16) if with_rgb else None,
                 np.full(n, np.inf), np.zeros(n), np.zeros(n))
    with _open(path) as reader:
        dims = set(reader.header.point_format.dimension_names)
        if with_rgb and not {"red", "green", "blue"} <= dims:
            raise DataError(f"{str(path)!r} has no point colours (point format {reader.header.point_format.id}); "
                            "an RGB raster needs a colourised cloud (formats 2, 3, 5, 7, 8, 10)")
        for pts in reader.chunk_iterator(CHUNK_POINTS):
            x, y, z = np.asarray(pts.x), np.asarray(pts.y), np.asarray(pts.z)
            cls = np.asarray(pts.classification)
            cell, inside = grid.cells(x, y)
            keep = inside & ~np.isin(cls, NOISE_CLASSES)
            r.n_points += int(keep.sum())
            # ground: lowest class-2 point per cell (thins the TIN input)
            g = keep & (cls == GROUND_CLASS)
            if g.any():
                r.n_ground += int(g.sum())
                gi = np.nonzero(g)[0]
                o = gi[np.lexsort((z[gi], cell[gi]))]
                first = np.r_[True, cell[o][1:] != cell[o][:-1]]
                o = o[first]
                better = z[o] < r.gz[cell[o]]
                o = o[better]
                r.gz[cell[o]], r.gx[cell[o]], r.gy[cell[o]] = z[o], x[o], y[o]
            # surface: highest selected return per cell (+ its colour)
            s = keep if returns == "all" else keep & (np.asarray(pts.return_number) == 1)
            if s.any():
                si = np.nonzero(s)[0]
                o = si[np.lexsort((z[si], cell[si]))]
                last = np.r_[cell[o][1:] != cell[o][:-1], True]
                o = o[last]
                better = z[o] > r.dsm[cell[o]]
                o = o[better]
                r.dsm[cell[o]] = z[o]
                if r.rgb is not None:
                    col = np.stack([np.asarray(pts.red)[o], np.asarray(pts.green)[o], np.asarray(pts.blue)[o]])
                    r.rgb[:, cell[o]] = col
    if r.rgb is not None:
        r.colour_bits16 = bool(r.rgb.max() > 255)
    return r


def tin_grid(px: np.ndarray, py: np.ndarray, pz: np.ndarray, grid: LidarGrid, chunk: int = 50_000) -> np.ndarray:
    """Linear interpolation on the Delaunay triangulation (TIN) of points ``(px, py, pz)`` at every cell centre of
    ``grid``: ``[H, W]`` float64, NaN outside the convex hull.

    Each triangle is rasterised directly (cells of its bounding box, barycentric weights, kept when inside), which
    is exact and avoids scipy's point-location walk (slow for many queries).
    """
    from scipy.spatial import Delaunay

    out = np.full((grid.height, grid.width), np.nan)
    pts = np.column_stack([px, py])
    tri = Delaunay(pts).simplices
    for t0 in range(0, len(tri), chunk):
        s = tri[t0 : t0 + chunk]
        x, y, z = px[s], py[s], pz[s]  # [T, 3]
        cf = (x - grid.left) / grid.pixel - 0.5  # fractional column of the vertex (cell-centre coordinates)
        rf = (grid.top - y) / grid.pixel - 0.5
        c0 = np.maximum(np.ceil(cf.min(1)), 0).astype(np.int64)
        c1 = np.minimum(np.floor(cf.max(1)), grid.width - 1).astype(np.int64)
        r0 = np.maximum(np.ceil(rf.min(1)), 0).astype(np.int64)
        r1 = np.minimum(np.floor(rf.max(1)), grid.height - 1).astype(np.int64)
        nc, nr = np.maximum(c1 - c0 + 1, 0), np.maximum(r1 - r0 + 1, 0)
        cnt = nc * nr
        ti = np.repeat(np.arange(len(s)), cnt)
        local = np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        cc = c0[ti] + local % nc[ti]
        rr = r0[ti] + local // nc[ti]
        qx = grid.left + (cc + 0.5) * grid.pixel
        qy = grid.top - (rr + 0.5) * grid.pixel
        x0, y0 = x[ti, 0], y[ti, 0]
        ax, ay = x[ti, 1] - x0, y[ti, 1] - y0
        bx, by = x[ti, 2] - x0, y[ti, 2] - y0
        det = ax * by - ay * bx
        ok = det != 0
        dx, dy = qx - x0, qy - y0
        with np.errstate(divide="ignore", invalid="ignore"):
            l1 = (dx * by - dy * bx) / det
            l2 = (ax * dy - ay * dx) / det
        l0 = 1.0 - l1 - l2
        eps = -1e-9
        inside = ok & (l0 >= eps) & (l1 >= eps) & (l2 >= eps)
        zi = l0 * z[ti, 0] + l1 * z[ti, 1] + l2 * z[ti, 2]
        out[rr[inside], cc[inside]] = zi[inside]
    return out


def _ground_surface(r: _Rasters, grid: LidarGrid, where: np.ndarray) -> np.ndarray:
    """DTM z (CRS z units) at the centres of the flat cells ``where`` (TIN; nearest ground point outside hull)."""
    from scipy.spatial import cKDTree

    has = np.isfinite(r.gz)
    if has.sum() < 3:
        raise DataError(f"the cloud has {int(has.sum())} ground cell(s) (class 2 points); a ground surface needs at "
                        "least 3 — classify ground first (e.g. PDAL filters.smrf or LAStools lasground)")
    gx, gy, gz = r.gx[has], r.gy[has], r.gz[has]
    out = tin_grid(gx, gy, gz, grid).ravel()[where]
    miss = ~np.isfinite(out)
    if miss.any():
        xc, yc = grid.centres()
        rows, cols = np.divmod(where[miss], grid.width)
        _, nn = cKDTree(np.column_stack([gx, gy])).query(np.column_stack([xc[cols], yc[rows]]))
        out[miss] = gz[nn]
    return out


def fill_mask(valid: np.ndarray, gap_fill_px: int, min_coverage: float = 0.5) -> np.ndarray:
    """Cells that hold data after density-aware gap filling: ``bool [H, W]``.

    ``valid`` (``bool [H, W]``) marks cells with returns. An empty cell is added when its distance to the nearest
    valid cell is ≤ ``gap_fill_px`` (pixels) and the fraction of valid cells in the disc of radius ``gap_fill_px``
    centred on it (cells outside the raster count as empty) is ≥ ``min_coverage`` (0–1). ``min_coverage=0``: plain
    distance rule; ``gap_fill_px=0``: no filling.
    """
    from scipy import ndimage

    if not 0.0 <= min_coverage <= 1.0:
        raise DataError(f"min_coverage must be in [0, 1], got {min_coverage}")
    if gap_fill_px <= 0 or valid.all() or not valid.any():
        return valid.copy()
    near = ndimage.distance_transform_edt(~valid) <= gap_fill_px
    if min_coverage <= 0:
        return valid | near
    r = int(gap_fill_px)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disc = (xx * xx + yy * yy <= r * r).astype(np.float64)
    cover = ndimage.convolve(valid.astype(np.float64), disc, mode="constant", cval=0.0) / disc.sum()
    return valid | (near & (cover >= min_coverage - 1e-9))


def _fill(band: np.ndarray, valid: np.ndarray, max_px: int, keep: np.ndarray, nodata: float) -> np.ndarray:
    """Inverse-distance fill of ``band [H, W]`` from ``valid`` cells (GDAL ``fillnodata``, search radius
    ``max_px``); cells outside ``keep`` (see :func:`fill_mask`) are set to ``nodata``."""
    from rasterio.fill import fillnodata

    out = band
    if max_px > 0 and valid.any() and not valid.all():
        out = fillnodata(band, mask=valid.astype(np.uint8), max_search_distance=float(max_px), smoothing_iterations=0)
    out = np.array(out, copy=True)
    out[~keep] = nodata
    return out


@dataclass(frozen=True)
class LidarChmResult:
    """Paths and summary numbers of :func:`chm_from_lidar`."""

    chm_path: Path
    rgb_path: Path | None
    grid: LidarGrid
    z_to_metre: float
    z_source: str
    n_points: int
    n_ground: int
    max_height_m: float
    valid_fraction: float


def chm_from_lidar(
    cloud: str | os.PathLike,
    out: str | os.PathLike,
    *,
    resolution_m: float = 0.6,
    returns: str = "first",
    gap_fill_px: int = 4,
    min_coverage: float = 0.5,
    rgb_out: str | os.PathLike | None = None,
    crs: Any = None,
    z_unit: str | float | None = None,
) -> LidarChmResult:
    """Rasterise a lidar cloud to a CHM GeoTIFF (float32 metres, NaN nodata) and optionally an aligned RGB raster.

    Args:
        cloud: LAS/LAZ path with ground classified (class 2).
        out: CHM GeoTIFF path (written atomically).
        resolution_m: pixel size in metres (converted to the CRS unit).
        returns: ``"first"`` (highest first return per cell) or ``"all"`` (highest return of any order).
        gap_fill_px: fill empty cells within this many pixels of data (0: no fill) …
        min_coverage: … when at least this fraction of the cells within ``gap_fill_px`` holds returns
            (:func:`fill_mask`; 0: fill every cell near data, which turns isolated returns into discs).
        rgb_out: also write ``[3, H, W]`` uint8 point colours on the same grid (nodata 0).
        crs: override/supply the CRS (anything pyproj accepts). z_unit: override the vertical unit
            (``"m"``, ``"ft"``, ``"us-ft"`` or a factor to metres).
    """
    from eo_dinov3 import __version__
    from eo_dinov3.data.raster_io import write_geotiff_atomic

    if returns not in ("first", "all"):
        raise DataError(f"returns must be 'first' or 'all', got {returns!r}")
    with _open(cloud) as reader:
        header = reader.header
        units = cloud_units(header, crs, z_unit)
        grid = make_grid(header, units, resolution_m)
    r = _rasterise(cloud, grid, returns, rgb_out is not None)
    surf = np.isfinite(r.dsm)
    if not surf.any():
        raise DataError(f"{str(cloud)!r} has no usable returns inside its header bounds")
    where = np.nonzero(surf)[0]
    chm = np.full(grid.width * grid.height, np.nan, np.float32)
    h = (r.dsm[where] - _ground_surface(r, grid, where)) * units.z_to_metre
    chm[where] = np.maximum(h, 0.0)
    chm = chm.reshape(grid.height, grid.width)
    valid = np.isfinite(chm)
    keep = fill_mask(valid, gap_fill_px, min_coverage)
    chm = _fill(np.nan_to_num(chm, nan=0.0), valid, gap_fill_px, keep, float("nan")).astype(np.float32)
    from rasterio.crs import CRS as RioCRS

    rcrs = RioCRS.from_wkt(grid.crs_wkt)
    unit_name = units.crs.axis_info[0].unit_name if units.crs.axis_info else "unit"
    tags = {
        "UNITS": "metre",
        "QUANTITY": "canopy height above ground (lidar CHM)",
        "Z_TO_METRE": f"{units.z_to_metre:.10g}",
        "VERTICAL_UNIT_SOURCE": units.z_source,
        "RESOLUTION_M": f"{resolution_m:g}",
        "PIXEL_SIZE_CRS_UNITS": f"{grid.pixel:.6f} {unit_name}",
        "METHOD": f"highest {returns} return per cell minus TIN ground (class 2, lowest point per cell, "
                  f"nearest ground point outside the hull); negatives -> 0; gaps <= {gap_fill_px} px filled (GDAL "
                  f"fillnodata) where >= {min_coverage:g} of the cells within {gap_fill_px} px hold returns",
        "SOURCE": os.path.basename(str(cloud)),
        "POINTS": str(r.n_points),
        "GROUND_POINTS": str(r.n_ground),
        "EO_DINOV3_VERSION": __version__,
    }
    write_geotiff_atomic(out, chm[None], crs=rcrs, transform=grid.transform, nodata=float("nan"), tags=tags)
    rgb_path = None
    if rgb_out is not None:
        rgb_path = Path(rgb_out)
        _write_rgb(r, grid, surf.reshape(grid.height, grid.width), rgb_path, gap_fill_px, min_coverage, rcrs, tags)
    fin = chm[np.isfinite(chm)]
    return LidarChmResult(Path(out), rgb_path, grid, units.z_to_metre, units.z_source, r.n_points, r.n_ground,
                          float(fin.max()) if fin.size else float("nan"), float(np.isfinite(chm).mean()))


def _write_rgb(r: _Rasters, grid: LidarGrid, has: np.ndarray, path: Path, gap_fill_px: int, min_coverage: float,
               rcrs: Any, chm_tags: dict[str, str]) -> None:
    from eo_dinov3.data.raster_io import write_geotiff_atomic

    rgb = r.rgb.reshape(3, grid.height, grid.width)
    if r.colour_bits16:  # LAS colours are 16-bit (value * 256): keep the high byte
        rgb = rgb >> 8
    rgb = np.clip(rgb, 1, 255).astype(np.uint8)  # 0 is reserved for nodata
    rgb[:, ~has] = 0
    keep = fill_mask(has, gap_fill_px, min_coverage)
    rgb = np.stack([_fill(b, has, gap_fill_px, keep, 0) for b in rgb]).astype(np.uint8)
    tags = {k: v for k, v in chm_tags.items() if k in ("RESOLUTION_M", "PIXEL_SIZE_CRS_UNITS", "SOURCE",
                                                       "EO_DINOV3_VERSION")}
    tags["RASTERISATION"] = (f"colour of the highest selected return per cell; real colours clipped to >= 1; gaps "
                             f"<= {gap_fill_px} px filled where >= {min_coverage:g} of the cells within "
                             f"{gap_fill_px} px hold returns; 0 = nodata")
    write_geotiff_atomic(path, rgb, crs=rcrs, transform=grid.transform, nodata=0, tags=tags)


def lidar_rgb_raster(cloud: str | os.PathLike, out: str | os.PathLike, *, resolution_m: float = 0.6,
                     returns: str = "first", gap_fill_px: int = 4, min_coverage: float = 0.5,
                     crs: Any = None) -> Path:
    """Rasterise point colours to a ``[3, H, W]`` uint8 GeoTIFF (nodata 0) on the grid :func:`chm_from_lidar` uses
    for the same ``resolution_m`` (so the pair is pixel-aligned)."""
    with _open(cloud) as reader:
        units = cloud_units(reader.header, crs)
        grid = make_grid(reader.header, units, resolution_m)
    r = _rasterise(cloud, grid, returns, True)
    from rasterio.crs import CRS as RioCRS

    has = np.isfinite(r.dsm).reshape(grid.height, grid.width)
    tags = {"RESOLUTION_M": f"{resolution_m:g}", "PIXEL_SIZE_CRS_UNITS": f"{grid.pixel:.6f}",
            "SOURCE": os.path.basename(str(cloud))}
    _write_rgb(r, grid, has, Path(out), gap_fill_px, min_coverage, RioCRS.from_wkt(grid.crs_wkt), tags)
    return Path(out)
