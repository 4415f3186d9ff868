"""Safe raster opening and reading, shared by every raster reader of eo_dinov3.

Why not plain ``rasterio.open``? (see ``reliability.md`` §5)

* GDAL picks the driver from the file *content*: a VRT (XML) saved as ``upload.tif`` is opened by the VRT driver
  and reads *other* files. :func:`open_raster` only tries an allow-list of drivers (default GTiff/COG, PNG, JPEG;
  ``"COG"`` is read by GDAL's GTiff driver), so such a file is refused.
* ``open()`` succeeding proves nothing about the pixels: a 5 MB sparse TIFF can declare 3 × 200 000 × 200 000
  pixels (120 GB). The size is checked from the metadata *before* any pixel is read (``max_pixels`` per band for
  the whole raster, ``max_read_bytes`` for every read).
* Rotated / sheared / south-up geotransforms and GCP-only georeferencing are refused: window arithmetic and tiling
  in this project assume north-up pixel grids (warp such files first with ``gdalwarp``).
* Missing, truncated, corrupt and not-a-raster files raise :class:`~eo_dinov3.errors.DataError` with a one-line
  message (truncation usually shows only at read time, so :func:`read_window` wraps read errors too).

Paths may be local files or GDAL URIs (``s3://…``, ``https://…``, ``/vsicurl/…``, ``/vsizip/…``); rasterio maps them
to GDAL's virtual file systems. Open rasters inside each DataLoader / dask worker, never share handles across
``fork``.

Value scaling (:func:`scale_to_unit`) maps digital numbers to ``[0, 1]`` reflectance-like floats:
``uint8`` / 255; ``uint16``/``int16`` / 10 000 (Sentinel-2 L2A-style reflectance × 10 000; pass ``scale=2047`` for
11-bit Maxar DN, ``"dtype"`` for / 65 535, or ``"percentile"`` for a per-band 2–98 % stretch); floats are assumed
to be in ``[0, 1]`` already. Values are clipped to ``[0, 1]``.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window

from eo_dinov3.errors import DataError

DEFAULT_DRIVERS: tuple[str, ...] = ("GTiff", "COG", "PNG", "JPEG")
#: Default pixel budget per band for a whole raster (≈ 44 700² px; a 20 000² scene is 4e8).
DEFAULT_MAX_PIXELS: int = 2_000_000_000
#: Default budget for one read (all bands, in bytes of the file dtype).
DEFAULT_MAX_READ_BYTES: int = 2 * 1024**3

# GDAL settings applied while opening/reading: never run Python from a VRT, do not list sibling directories
# (slow on network file systems), and keep HTTP reads to what rasterio needs.
_GDAL_ENV = {"GDAL_VRT_ENABLE_PYTHON": "NO", "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}
_URI_RE = re.compile(r"^(?:[a-z][a-z0-9+.-]*://|/vsi)", re.IGNORECASE)


def is_uri(path: str | os.PathLike) -> bool:
    """True for GDAL/remote URIs (``s3://``, ``https://``, ``/vsicurl/`` …) that are not plain local paths."""
    return bool(_URI_RE.match(str(path)))


@dataclass(frozen=True)
class RasterInfo:
    """Metadata of a raster, read without touching pixels. ``gsd_m`` is the ground sampling distance in metres
    (``nan`` when the raster has no CRS; approximate at the raster centre for geographic CRSs)."""

    path: str
    driver: str
    width: int
    height: int
    count: int
    dtype: str
    crs: str | None
    transform: tuple[float, ...]
    gsd_m: float
    nodata: float | None

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(count, height, width)``."""
        return (self.count, self.height, self.width)


def _gdal_env() -> rasterio.Env:
    return rasterio.Env(**_GDAL_ENV)


def _read_driver(name: str) -> str:
    return "GTiff" if name.upper() == "COG" else name


def open_raster(
    path: str | os.PathLike,
    *,
    allowed_drivers: Sequence[str] = DEFAULT_DRIVERS,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    require_georeferenced: bool = False,
    allow_rotated: bool = False,
) -> rasterio.io.DatasetReader:
    """Open a raster for reading after checking driver, size and geotransform; use as a context manager.

    Args:
        path: local path or GDAL URI.
        allowed_drivers: GDAL driver names tried in order; anything else (VRT, HDF5, netCDF …) is refused.
        max_pixels: refuse rasters with more than this many pixels *per band* (``width * height``), checked from
            metadata before reading; ``None`` disables the check.
        require_georeferenced: refuse rasters without a CRS.
        allow_rotated: accept rotated/sheared geotransforms (default: refuse).

    Returns:
        An open ``rasterio`` dataset (``DatasetReader``).

    Raises:
        DataError: missing file, not a raster, driver not allowed, too large, rotated / GCP-only georeferencing.
    """
    spath = str(path)
    if not is_uri(spath) and not os.path.exists(spath):
        raise DataError(f"raster {spath!r} does not exist; check the path")
    if not is_uri(spath) and os.path.isdir(spath):
        raise DataError(f"{spath!r} is a directory, not a raster file")
    drivers = list(dict.fromkeys(_read_driver(d) for d in allowed_drivers))
    src = None
    last_err: Exception | None = None
    with _gdal_env(), warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        for drv in drivers:
            try:
                src = rasterio.open(spath, driver=drv)
                break
            except RasterioIOError as e:  # wrong driver for this file, or unreadable
                last_err = e
    if src is None:
        hint = ""
        if not is_uri(spath):
            try:
                with open(spath, "rb") as f:
                    head = f.read(256)
                if head.lstrip().startswith(b"<VRTDataset"):
                    hint = " (it is a GDAL VRT, which may read other files; VRT input is refused)"
                elif len(head) == 0:
                    hint = " (the file is empty)"
            except OSError:
                pass
        raise DataError(
            f"{spath!r} is not a readable raster of an allowed format {tuple(allowed_drivers)}{hint}: "
            f"{_short(last_err)}"
        )
    try:
        _check_opened(src, spath, max_pixels=max_pixels, require_georeferenced=require_georeferenced,
                      allow_rotated=allow_rotated)
    except BaseException:
        src.close()
        raise
    return src


def _short(err: Exception | None) -> str:
    msg = str(err) if err else "unknown error"
    return msg.splitlines()[0][:300]


def _check_opened(src, spath: str, *, max_pixels, require_georeferenced: bool, allow_rotated: bool) -> None:
    if src.count < 1:
        raise DataError(f"{spath!r} has no raster bands (it may hold only subdatasets); open a band file instead")
    if max_pixels is not None and src.width * src.height > max_pixels:
        raise DataError(
            f"{spath!r} declares {src.count} x {src.height} x {src.width} pixels, more than the budget of "
            f"{max_pixels:,} pixels per band; read it by windows with a larger max_pixels if it is genuine"
        )
    t = src.transform
    georef = src.crs is not None or not t.is_identity
    if not georef and src.gcps[0]:
        raise DataError(f"{spath!r} is georeferenced only by ground control points; warp it to a north-up grid "
                        "first (gdalwarp)")
    if not georef and src.rpcs is not None and require_georeferenced:
        raise DataError(f"{spath!r} has only RPC georeferencing; orthorectify it first (gdalwarp -rpc)")
    if require_georeferenced and src.crs is None:
        raise DataError(f"{spath!r} has no CRS; a georeferenced raster is required")
    if georef and not allow_rotated:
        if t.b != 0 or t.d != 0:
            raise DataError(f"{spath!r} has a rotated/sheared geotransform {tuple(t)[:6]}; warp it to a north-up "
                            "grid first (gdalwarp)")
        if t.a <= 0 or t.e >= 0:
            raise DataError(f"{spath!r} is not north-up (pixel size x={t.a}, y={t.e}); warp it first (gdalwarp)")


def raster_info(path: str | os.PathLike, **open_kwargs: Any) -> RasterInfo:
    """Metadata of ``path`` (see :class:`RasterInfo`), with the checks of :func:`open_raster`."""
    with open_raster(path, **open_kwargs) as src:
        return info_of(src)


def info_of(src) -> RasterInfo:
    """:class:`RasterInfo` of an open dataset."""
    return RasterInfo(
        path=str(src.name),
        driver=src.driver,
        width=src.width,
        height=src.height,
        count=src.count,
        dtype=str(src.dtypes[0]),
        crs=src.crs.to_string() if src.crs is not None else None,
        transform=tuple(src.transform)[:6],
        gsd_m=gsd_metres(src),
        nodata=src.nodata,
    )


def gsd_metres(src) -> float:
    """Ground sampling distance in metres (mean of x/y pixel size) of an open dataset; ``nan`` without a CRS.

    Projected CRSs use their linear unit; geographic CRSs are converted at the raster centre latitude
    (1° of latitude ≈ 111 320 m; x scaled by cos(latitude)), which is approximate.
    """
    if src.crs is None:
        return float("nan")
    t = src.transform
    px, py = abs(t.a), abs(t.e)
    if src.crs.is_geographic:
        lat = t.f + t.e * src.height / 2.0
        m = 111_320.0
        return float((px * m * np.cos(np.deg2rad(lat)) + py * m) / 2.0)
    try:
        factor = float(src.crs.linear_units_factor[1])
    except Exception:  # noqa: BLE001 - unknown units: assume metres
        factor = 1.0
    return float((px + py) / 2.0 * factor)


def _as_window(window: Window | tuple[int, int, int, int] | None, src) -> Window:
    if window is None:
        return Window(0, 0, src.width, src.height)
    if isinstance(window, Window):
        return window
    col_off, row_off, width, height = window
    return Window(col_off, row_off, width, height)


def read_window(
    src,
    window: Window | tuple[int, int, int, int] | None = None,
    bands: Sequence[int] | None = None,
    *,
    boundless: bool = False,
    fill_value: float | None = None,
    max_read_bytes: int | None = DEFAULT_MAX_READ_BYTES,
) -> np.ndarray:
    """Read ``bands`` (1-based, default all) of ``window`` (``Window`` or ``(col_off, row_off, width, height)``
    in pixels; default whole raster) as ``[C, H, W]`` in the file dtype.

    Raises:
        DataError: band index out of range, read larger than ``max_read_bytes``, corrupt/truncated data.
    """
    w = _as_window(window, src)
    idx = _band_indexes(src, bands)
    nbytes = int(w.width) * int(w.height) * len(idx) * np.dtype(src.dtypes[idx[0] - 1]).itemsize
    if max_read_bytes is not None and nbytes > max_read_bytes:
        raise DataError(f"reading {len(idx)} x {int(w.height)} x {int(w.width)} px of {src.name!r} needs "
                        f"{nbytes / 2**20:.0f} MiB, over the {max_read_bytes / 2**20:.0f} MiB budget; read by windows")
    try:
        with _gdal_env():
            return src.read(idx, window=w, boundless=boundless, fill_value=fill_value)
    except RasterioIOError as e:
        raise DataError(f"{src.name!r} is corrupt or truncated (read failed: {_short(e)})") from e


def _band_indexes(src, bands: Sequence[int] | None) -> list[int]:
    if bands is None:
        return list(range(1, src.count + 1))
    idx = [int(b) for b in bands]
    bad = [b for b in idx if b < 1 or b > src.count]
    if bad:
        raise DataError(f"{src.name!r} has {src.count} band(s); band index(es) {bad} do not exist (1-based)")
    return idx


def valid_mask(
    src,
    window: Window | tuple[int, int, int, int] | None = None,
    bands: Sequence[int] | None = None,
) -> np.ndarray:
    """``[H, W]`` bool mask, True where a pixel is valid in *at least one* selected band (GDAL masks: nodata
    value, alpha band or internal mask; all True when the raster declares none). A pixel is nodata only when every
    band is masked, so an RGB pixel with a genuine 0 in one band stays valid (``nodata=0`` on 8-bit imagery would
    otherwise also mask dark shadows/water in single bands). Alpha and internal masks apply to all bands alike.
    """
    w = _as_window(window, src)
    idx = _band_indexes(src, bands)
    if src.nodata is None and all(
        flags == [rasterio.enums.MaskFlags.all_valid] for flags in (src.mask_flag_enums[i - 1] for i in idx)
    ):
        return np.ones((int(w.height), int(w.width)), dtype=bool)
    try:
        with _gdal_env():
            m = src.read_masks(idx, window=w)
    except RasterioIOError as e:
        raise DataError(f"{src.name!r} is corrupt or truncated (mask read failed: {_short(e)})") from e
    return np.any(m > 0, axis=0)


def nodata_fraction(mask: np.ndarray) -> float:
    """Fraction of invalid pixels in a ``[H, W]`` validity mask (True = valid); 1.0 for an empty mask."""
    if mask.size == 0:
        return 1.0
    return float(1.0 - np.count_nonzero(mask) / mask.size)


def scale_to_unit(
    array: np.ndarray,
    dtype: str | np.dtype | None = None,
    *,
    scale: float | str | None = None,
    valid: np.ndarray | None = None,
    percentiles: tuple[float, float] = (2.0, 98.0),
) -> np.ndarray:
    """Map digital numbers ``[C, H, W]`` to float32 in ``[0, 1]`` (clipped).

    Args:
        array: pixel values.
        dtype: the *source* dtype deciding the default scale (default ``array.dtype``).
        scale: ``None`` (default by dtype: uint8 → 255, (u)int16/(u)int32 → 10 000, float → 1),
            a number (divide by it), ``"dtype"`` (divide by the dtype maximum, e.g. 65 535), or ``"percentile"``
            (per-band linear stretch between the ``percentiles`` of the valid pixels).
        valid: optional ``[H, W]`` validity mask used by ``"percentile"``.
    """
    dt = np.dtype(dtype if dtype is not None else array.dtype)
    x = array.astype(np.float32, copy=False)
    if scale == "percentile":
        out = np.empty_like(x, dtype=np.float32)
        for c in range(x.shape[0]):
            vals = x[c][valid] if valid is not None else x[c].ravel()
            if vals.size == 0:
                out[c] = 0.0
                continue
            lo, hi = np.percentile(vals, percentiles)
            out[c] = (x[c] - lo) / max(float(hi - lo), 1e-12)
        return np.clip(out, 0.0, 1.0)
    if scale is None:
        if dt == np.uint8:
            s = 255.0
        elif np.issubdtype(dt, np.integer):
            s = 10_000.0
        else:
            s = 1.0
    elif scale == "dtype":
        s = float(np.iinfo(dt).max) if np.issubdtype(dt, np.integer) else 1.0
    elif isinstance(scale, (int, float)):
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        s = float(scale)
    else:
        raise ValueError(f"unknown scale {scale!r}; use a number, 'dtype', 'percentile' or None")
    return np.clip(x / s, 0.0, 1.0)


def to_uint8(array: np.ndarray, *, scale: float | str | None = None, valid: np.ndarray | None = None) -> np.ndarray:
    """``[C, H, W]`` digital numbers → uint8 (uint8 input is returned unchanged; others via :func:`scale_to_unit`
    and rounding of ``x * 255``)."""
    if array.dtype == np.uint8 and scale is None:
        return array
    unit = scale_to_unit(array, scale=scale, valid=valid)
    return np.rint(unit * 255.0).astype(np.uint8)


def write_geotiff_atomic(
    path: str | os.PathLike,
    array: np.ndarray,
    *,
    crs=None,
    transform=None,
    nodata: float | None = None,
    tags: dict[str, str] | None = None,
    compress: str = "deflate",
    blocksize: int = 256,
) -> None:
    """Write ``array [C, H, W]`` as a (DEFLATE-compressed, tiled when possible) GeoTIFF atomically: temp file in the
    same folder → fsync → ``os.replace`` → fsync of the folder. A crash leaves either the old file or none.

    DEFLATE is the default because compressed tiles carry a checksum (a flipped bit in an uncompressed TIFF reads
    back silently wrong).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    c, h, w = array.shape
    profile: dict[str, Any] = dict(driver="GTiff", width=w, height=h, count=c, dtype=array.dtype, crs=crs,
                                   transform=transform, nodata=nodata)
    if compress and compress.lower() != "none":
        profile["compress"] = compress
        if np.issubdtype(array.dtype, np.integer):
            profile["predictor"] = 2
    if h % 16 == 0 and w % 16 == 0 and h >= blocksize and w >= blocksize and blocksize % 16 == 0:
        profile.update(tiled=True, blockxsize=blocksize, blockysize=blocksize)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")  # no global RNG draw
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with _gdal_env(), rasterio.open(tmp, "w", **profile) as dst:
                dst.write(array)
                if tags:
                    dst.update_tags(**tags)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a directory so a completed ``os.replace`` survives a power loss (no-op where unsupported)."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
