"""Services behind the Streamlit canopy-height app (``apps/canopy_map.py``); no Streamlit import here.

The app is a thin UI; everything it computes lives in this module so it is reusable and testable:

* **Settings** (:func:`load_settings`): data folder, official CHMv2 weight paths, cache folder, upload limit, from
  a TOML settings file and ``EO_DINOV3_*`` environment variables.
* **Models** (:class:`ModelSpec`, :func:`load_model`): the offline ``demo`` model (random weights, labelled
  :data:`DEMO_LABEL` wherever its numbers appear), the official CHMv2 head + SAT-493M backbone from local files,
  a Hugging Face CHMv2 folder, or a head trained with ``train_canopy_head.py`` (official head layout + backbone).
* **Inputs**: :func:`save_upload` (size limit, TIFF magic bytes, server-chosen file name) and
  :func:`validate_raster` (the checks of ``eo-dinov3 chm predict``: driver allow-list, pixel budget, north-up,
  ≥ 3 bands, projected CRS, GSD vs the model's); :func:`list_data_files` / :func:`resolve_data_file` browse a
  configured data folder without ever leaving it (no ``..``, no symlink escapes).
* **Inference** (:func:`run_chm`): :func:`eo_dinov3.canopy.mapping.predict_raster` with a per-batch progress
  callback and ETA, cached on disk per ``(file SHA-256, model key, run parameters)``; an interrupted run resumes.
* **Display**: :func:`raster_overlay` warps a decimated copy of the RGB / CHM to Web Mercator (≤ ``max_side`` px;
  the analysis stays on the native grid), :func:`colorize` maps metres to RGBA (NaN transparent),
  :func:`build_map` assembles a folium map whose Leaflet/Leaflet.draw code is inlined from the Leaflet files ``eo-dinov3 samples fetch`` puts under the samples root (works
  offline; no basemap unless asked), :func:`sample_height` reads the CHM at a clicked lon/lat.
* **Areas of interest**: :func:`aoi_from_geojson`, :func:`read_aoi_bytes` → :func:`area_table` (the columns of
  ``eo-dinov3 chm stats`` + polygon area), :func:`height_histogram`, :func:`cover_overlay`.
* **Exports**: :func:`stats_csv_bytes`, :func:`stats_geojson_bytes`, :func:`map_png` (RGB + CHM, legend in
  metres, scale bar, title), the CHM COG itself.
* **Honesty panel** (:func:`honesty_rows`): model and weights hash, input vs model GSD, imagery date from tags,
  share of heights above :data:`SUSPECT_HEIGHT_M`, demo vs real model.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import shutil
import threading
import time
import tomllib
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eo_dinov3.errors import CheckpointError, ConfigError, DataError

#: shown next to every number a demo model produced
DEMO_LABEL = "DEMO — not a real canopy-height model"
#: heights above this (m) are flagged as suspect (towers, buildings, artefacts; CHMv2 users clip > 60 m)
SUSPECT_HEIGHT_M = 60.0
#: default top of the colour ramp (m)
DEFAULT_VMAX_M = 40.0
#: colour map of the height layer
CMAP = "viridis"
RASTER_SUFFIXES = (".tif", ".tiff")
AOI_SUFFIXES = (".geojson", ".json", ".gpkg", ".zip")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
SETTINGS_ENV = "EO_DINOV3_APP_SETTINGS"


# ------------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class AppSettings:
    """App configuration. Paths are absolute or ``None``; ``max_upload_mb`` is the upload limit in MB."""

    data_dir: Path | None = None
    head: Path | None = None
    backbone: Path | None = None
    hf: Path | None = None
    cache_dir: Path = Path.home() / ".cache" / "eo_dinov3" / "app"
    max_upload_mb: int = 200
    tile: int = 512
    overlap: int = 64
    batch_size: int = 4
    device: str | None = None
    allow_model_paths: bool = True
    source: str = "defaults"


_ENV_KEYS = {
    "data_dir": "EO_DINOV3_DATA_DIR",
    "head": "EO_DINOV3_CHM_HEAD",
    "backbone": "EO_DINOV3_CHM_BACKBONE",
    "hf": "EO_DINOV3_CHM_HF",
    "cache_dir": "EO_DINOV3_APP_CACHE",
    "max_upload_mb": "EO_DINOV3_MAX_UPLOAD_MB",
    "device": "EO_DINOV3_DEVICE",
    "allow_model_paths": "EO_DINOV3_ALLOW_MODEL_PATHS",
}


def load_settings(env: dict[str, str] | None = None) -> AppSettings:
    """Settings from a TOML file (``$EO_DINOV3_APP_SETTINGS``, else ``~/.config/eo_dinov3/app.toml`` when present;
    keys = the :class:`AppSettings` field names) overridden by the environment variables ``EO_DINOV3_DATA_DIR``,
    ``EO_DINOV3_CHM_HEAD``, ``EO_DINOV3_CHM_BACKBONE``, ``EO_DINOV3_CHM_HF``, ``EO_DINOV3_APP_CACHE``,
    ``EO_DINOV3_MAX_UPLOAD_MB``, ``EO_DINOV3_DEVICE``, ``EO_DINOV3_ALLOW_MODEL_PATHS`` (``false`` on a shared server:
    only the weight paths of the settings can be used, users cannot type server paths).

    Raises:
        ConfigError: unreadable settings file or unknown key.
    """
    env = dict(os.environ if env is None else env)
    values: dict[str, Any] = {}
    sources = []
    path = env.get(SETTINGS_ENV) or str(Path.home() / ".config" / "eo_dinov3" / "app.toml")
    if env.get(SETTINGS_ENV) or Path(path).is_file():
        try:
            values.update(tomllib.loads(Path(path).read_text()))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read app settings {path!r}: {e}; fix or unset ${SETTINGS_ENV}") from None
        sources.append(path)
    names = {f.name for f in dataclasses.fields(AppSettings)} - {"source"}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"unknown keys {sorted(unknown)} in {path}; allowed: {sorted(names)}")
    for k, var in _ENV_KEYS.items():
        if env.get(var):
            values[k] = env[var]
            sources.append(f"${var}")
    out: dict[str, Any] = {}
    for k, v in values.items():
        if k in ("data_dir", "head", "backbone", "hf", "cache_dir"):
            out[k] = Path(v).expanduser().resolve()
        elif k in ("max_upload_mb", "tile", "overlap", "batch_size"):
            out[k] = int(v)
        elif k == "allow_model_paths":
            out[k] = v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")
        else:
            out[k] = v
    return AppSettings(**out, source=", ".join(sources) or "defaults")


# --------------------------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelSpec:
    """Which model to run. ``kind``: ``"demo"`` | ``"chmv2"`` (official head + backbone ``.pth``) | ``"trained"``
    (a head from ``train_canopy_head.py`` in the official head layout + its backbone) | ``"hf"`` (HF CHMv2 folder
    or ``.safetensors`` in ``head``)."""

    kind: str = "demo"
    head: str | None = None
    backbone: str | None = None

    def key(self) -> str:
        """Identity of the model for caching: kind + absolute paths + file sizes and mtimes."""
        parts = [self.kind]
        for p in (self.head, self.backbone):
            if p:
                q = Path(p).expanduser()
                st = q.stat() if q.exists() else None
                parts.append(f"{q.resolve()}:{st.st_size if st else 0}:{st.st_mtime_ns if st else 0}")
        return "|".join(parts)


@dataclass(frozen=True)
class ModelInfo:
    """What the UI shows about a model."""

    name: str
    kind: str
    is_demo: bool
    weights_sha256: str
    gsd_m: float
    normalization: str
    files: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """Name with the demo warning when it applies."""
        return f"{self.name} [{DEMO_LABEL}]" if self.is_demo else self.name


@dataclass
class LoadedModel:
    model: Any
    info: ModelInfo
    spec: ModelSpec


def _local_file(p: str | None, what: str, *, allow_dir: bool = False) -> Path:
    from eo_dinov3.data.raster_io import is_uri

    if not p:
        raise ConfigError(f"no {what} given; enter its local path in the sidebar or set it in the settings")
    if is_uri(p):
        raise ConfigError(f"{what} must be a local file, not {p!r} (nothing is downloaded)")
    q = Path(p).expanduser()
    if not (q.is_file() or (allow_dir and q.is_dir())):
        raise CheckpointError(f"{what} {str(q)!r} does not exist; check the path")
    return q


def _is_trained_head(path: str | os.PathLike) -> bool:
    from eo_dinov3.canopy.training import is_head_checkpoint

    return Path(path).is_file() and is_head_checkpoint(path)


def load_model(spec: ModelSpec, device: str | None = None) -> LoadedModel:
    """Build the model of ``spec`` on CPU (weights loaded with ``weights_only=True``; nothing downloaded).

    Raises:
        ConfigError / CheckpointError: missing paths, files that do not fit the CHMv2 architecture.
    """
    from eo_dinov3.canopy.mapping import model_provenance

    if spec.kind == "demo":
        from eo_dinov3.canopy.cli import demo_model

        model, files = demo_model(), ()
    elif spec.kind == "trained" and spec.head and _is_trained_head(spec.head):
        from eo_dinov3.canopy.training import load_head_checkpoint

        head = _local_file(spec.head, "trained head checkpoint")
        model = load_head_checkpoint(head)  # train_canopy_head.py output: records its backbone
        model.name = f"trained head ({head.name})"
        files = (str(head),)
    elif spec.kind in ("chmv2", "trained"):
        from eo_dinov3.canopy.model import build_chmv2

        what = "CHMv2 head" if spec.kind == "chmv2" else "trained head checkpoint"
        head = _local_file(spec.head, what)
        bb = _local_file(spec.backbone, "SAT-493M backbone")
        model = build_chmv2(weights=head, backbone_weights=bb)
        model.name = f"{'CHMv2' if spec.kind == 'chmv2' else 'trained head'} ({head.name} + {bb.name})"
        files = (str(head), str(bb))
    elif spec.kind == "hf":
        from eo_dinov3.canopy.model import build_chmv2

        head = _local_file(spec.head, "Hugging Face CHMv2 folder", allow_dir=True)
        model = build_chmv2(weights=head)
        model.name = f"CHMv2 HF ({head.name})"
        files = (str(head),)
    else:
        raise ConfigError(f"unknown model kind {spec.kind!r}; use demo, chmv2, trained or hf")
    model.eval()
    prov = model_provenance(model)
    model.weights_sha256 = prov["WEIGHTS_SHA256"]  # hash once; predict_raster reuses it
    info = ModelInfo(
        name=str(getattr(model, "name", spec.kind)),
        kind=spec.kind,
        is_demo=bool(getattr(model, "is_demo", False)),
        weights_sha256=prov["WEIGHTS_SHA256"],
        gsd_m=float(getattr(model, "gsd_m", None) or 0.6),
        normalization=getattr(getattr(model, "normalization", None), "name", "chmv2"),
        files=files,
    )
    return LoadedModel(model, info, spec)


# --------------------------------------------------------------------------------------------------------- inputs
def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 hex digest of a file (read in 4 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def save_upload(data: bytes, cache_dir: str | os.PathLike, *, max_mb: int) -> Path:
    """Store uploaded GeoTIFF bytes under a server-chosen name (``uploads/<sha256>.tif``; the client's file name
    is never used in a path) after checking the size limit and the TIFF/BigTIFF magic bytes.

    Raises:
        DataError: empty, over ``max_mb`` MB, or not a TIFF.
    """
    if not data:
        raise DataError("the uploaded file is empty; upload an RGB GeoTIFF")
    if len(data) > max_mb * 1024 * 1024:
        raise DataError(f"the upload is {len(data) / 2**20:.0f} MB, over the {max_mb} MB limit; put the file in the "
                        "data folder instead (see 'Data folder' in the sidebar)")
    if data[:4] not in _TIFF_MAGIC:
        raise DataError("the uploaded file is not a TIFF (wrong magic bytes); upload an RGB GeoTIFF (.tif)")
    sha = hashlib.sha256(data).hexdigest()
    folder = Path(cache_dir) / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / f"{sha}.tif"
    if not dst.exists():
        tmp = folder / f".{sha}.tmp-{os.getpid()}-{threading.get_ident()}"
        tmp.write_bytes(data)
        os.replace(tmp, dst)
    return dst


@dataclass(frozen=True)
class ValidatedInput:
    """A raster that passed the ``chm predict`` checks. GSDs in metres; ``notes`` are warnings to show."""

    path: str
    sha256: str
    width: int
    height: int
    count: int
    dtype: str
    crs: str
    gsd_m: tuple[float, float]
    model_gsd_m: float
    resampled: bool
    notes: tuple[str, ...]
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6


def validate_raster(path: str | os.PathLike, *, model_gsd_m: float = 0.6, sha256: str | None = None,
                    strict_gsd: bool = False) -> ValidatedInput:
    """Run the input checks of ``eo-dinov3 chm predict`` on a local GeoTIFF without predicting anything.

    Raises:
        DataError: not a GeoTIFF (driver allow-list: GTiff/COG only), too large, rotated, < 3 bands, no or
            geographic CRS, GSD off with ``strict_gsd``.
    """
    from eo_dinov3.canopy.mapping import plan_work_grid, rgb_band_indexes
    from eo_dinov3.data import raster_io

    p = str(path)
    if raster_io.is_uri(p):
        raise DataError(f"{p!r} is a URI; the app reads local files only")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        src = raster_io.open_raster(p, allowed_drivers=("GTiff", "COG"))
        try:
            bands, _ = rgb_band_indexes(src)
            work = plan_work_grid(src, model_gsd_m=model_gsd_m, strict_gsd=strict_gsd, allow_ungeoreferenced=False)
            tags = {k: str(v) for k, v in src.tags().items()}
            out = dict(width=src.width, height=src.height, count=src.count, dtype=str(src.dtypes[bands[0] - 1]),
                       crs=src.crs.to_string())
        finally:
            src.close()
    notes = tuple(_strip_name(str(w.message), p) for w in caught if not issubclass(w.category, DeprecationWarning))
    return ValidatedInput(path=p, sha256=sha256 or file_sha256(p), gsd_m=tuple(work.input_gsd_m),
                          model_gsd_m=model_gsd_m, resampled=work.resampled, notes=notes, tags=tags, **out)


def _strip_name(msg: str, path: str) -> str:
    return msg.replace(path, Path(path).name)


def list_data_files(root: str | os.PathLike | None, *, limit: int = 500) -> list[str]:
    """GeoTIFFs under ``root`` as sorted POSIX paths relative to it (files reached through symlinks that point
    outside ``root`` are skipped); ``[]`` when no data folder is configured."""
    if root is None or not Path(root).is_dir():
        return []
    base = Path(root).resolve()
    found = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for n in sorted(filenames):
            if n.lower().endswith(RASTER_SUFFIXES) and not n.startswith("."):
                p = Path(dirpath) / n
                if p.resolve().is_relative_to(base):
                    found.append(p.relative_to(base).as_posix())
                    if len(found) >= limit:
                        return found
    return found


def resolve_data_file(root: str | os.PathLike | None, rel: str) -> Path:
    """Absolute path of ``rel`` inside the data folder ``root``.

    Raises:
        DataError: no data folder, absolute path, ``..``, a symlink leading outside, missing file, not a .tif.
    """
    if root is None:
        raise DataError("no data folder is configured; set EO_DINOV3_DATA_DIR or data_dir in the settings file")
    base = Path(root).resolve()
    if not rel or Path(rel).is_absolute() or "\\" in rel or any(part == ".." for part in Path(rel).parts):
        raise DataError(f"{rel!r} is not a relative path inside the data folder")
    p = (base / rel).resolve()
    if not p.is_relative_to(base):
        raise DataError(f"{rel!r} leads outside the data folder; refused")
    if not p.is_file():
        raise DataError(f"{rel!r} is not a file in the data folder")
    if p.suffix.lower() not in RASTER_SUFFIXES:
        raise DataError(f"{rel!r} is not a GeoTIFF (.tif/.tiff)")
    return p


# ------------------------------------------------------------------------------------------------------ inference
@dataclass(frozen=True)
class RunParams:
    """Settings of one mapping run (part of the cache key)."""

    tile: int = 512
    overlap: int = 64
    batch_size: int = 4
    device: str | None = None
    strict_gsd: bool = False
    out_dtype: str = "float32"


@dataclass(frozen=True)
class Progress:
    """Progress of a run: ``done`` of ``total`` model batches, seconds elapsed and estimated left."""

    done: int
    total: int
    elapsed_s: float
    eta_s: float | None

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 1.0

    def text(self) -> str:
        eta = "estimating time left…" if self.eta_s is None else f"about {_fmt_s(self.eta_s)} left"
        return f"canopy height: batch {self.done}/{self.total}, {_fmt_s(self.elapsed_s)} elapsed, {eta}"


def _fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"


@dataclass(frozen=True)
class ChmResult:
    """A finished (or cached) canopy-height map and its summary over the whole raster."""

    path: Path
    key: str
    cached: bool
    seconds: float
    summary: dict[str, float]
    notes: tuple[str, ...]
    tags: dict[str, str]


def run_key(sha256: str, spec_key: str, params: RunParams) -> str:
    """Cache key of a run: SHA-256 of (input file SHA-256, model key, run parameters)."""
    blob = json.dumps({"file": sha256, "model": spec_key, "params": dataclasses.asdict(params)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock(key: str) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(key, threading.Lock())


def count_batches(inp: ValidatedInput, params: RunParams) -> int:
    """Number of model calls :func:`predict_raster` makes for ``inp`` (known before running: the tiles of the work
    grid, grouped by ``batch_size`` within each row-strip)."""
    from eo_dinov3.canopy.mapping import axis_starts

    sx, sy = inp.gsd_m[0] / inp.model_gsd_m, inp.gsd_m[1] / inp.model_gsd_m
    w = max(1, int(round(inp.width * sx))) if inp.resampled else inp.width
    h = max(1, int(round(inp.height * sy))) if inp.resampled else inp.height
    nx = len(axis_starts(w, params.tile, params.overlap))
    ny = len(axis_starts(h, params.tile, params.overlap))
    return ny * math.ceil(nx / params.batch_size)


def _progress_model(inner: Any, total: int, callback: Callable[[Progress], None] | None) -> Any:
    """Wrap ``inner`` so every call reports :class:`Progress`; provenance attributes are passed through."""
    import torch

    class _Counting(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner
            self.name = getattr(inner, "name", type(inner).__name__)
            self.weights_sha256 = getattr(inner, "weights_sha256", None)
            self.is_demo = bool(getattr(inner, "is_demo", False))
            self.done = 0
            self.t0 = time.perf_counter()

        def forward(self, x):  # [B, 3, T, T] -> [B, 1, T, T]
            y = self.inner(x)
            self.done += 1
            if callback is not None:
                el = time.perf_counter() - self.t0
                eta = el / self.done * max(total - self.done, 0) if self.done else None
                callback(Progress(self.done, total, el, eta))
            return y

    return _Counting()


def run_chm(inp: ValidatedInput, loaded: LoadedModel, params: RunParams, cache_dir: str | os.PathLike,
            progress: Callable[[Progress], None] | None = None) -> ChmResult:
    """Canopy-height COG for ``inp`` through :func:`~eo_dinov3.canopy.mapping.predict_raster`, cached under
    ``cache_dir/results/<key>/chm.tif`` (+ ``meta.json``) per :func:`run_key`; a cached result returns at once.
    An interrupted run (e.g. the user changed a widget) resumes from the mapper's sidecar files."""
    from eo_dinov3.canopy.mapping import predict_raster

    key = run_key(inp.sha256, loaded.spec.key(), params)
    folder = Path(cache_dir) / "results" / key[:32]
    dst, meta = folder / "chm.tif", folder / "meta.json"
    with _lock(key):
        if dst.is_file() and meta.is_file():
            m = json.loads(meta.read_text())
            return ChmResult(dst, key, True, m["seconds"], m["summary"], tuple(m["notes"]), m["tags"])
        folder.mkdir(parents=True, exist_ok=True)
        wrapped = _progress_model(loaded.model, count_batches(inp, params), progress)
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            predict_raster(wrapped, inp.path, dst, tile=params.tile, overlap=params.overlap,
                           batch_size=params.batch_size, normalization=loaded.info.normalization,
                           device=params.device, strict_gsd=params.strict_gsd, model_gsd_m=loaded.info.gsd_m,
                           out_dtype=params.out_dtype, progress=False, resume=True)
        seconds = time.perf_counter() - t0
        notes = tuple(dict.fromkeys(_strip_name(str(w.message), inp.path) for w in caught
                                    if not issubclass(w.category, DeprecationWarning)))
        summary = chm_summary(dst)
        import rasterio

        with rasterio.open(dst) as d:
            tags = {k: str(v) for k, v in d.tags().items()}
        tmp = meta.with_name(".meta.json.tmp")
        tmp.write_text(json.dumps({"seconds": seconds, "summary": summary, "notes": notes, "tags": tags}))
        os.replace(tmp, meta)
    return ChmResult(dst, key, False, seconds, summary, notes, tags)


def footprint(path: str | os.PathLike) -> Any:
    """The raster's bounding box as a one-row GeoDataFrame (``name="whole image"``) in the raster CRS."""
    import geopandas as gpd
    import rasterio
    from shapely.geometry import box

    with rasterio.open(path) as src:
        return gpd.GeoDataFrame({"name": ["whole image"]}, geometry=[box(*src.bounds)], crs=src.crs)


def chm_summary(chm_path: str | os.PathLike) -> dict[str, float]:
    """Whole-raster statistics: the :func:`~eo_dinov3.canopy.stats.zonal_stats` row of the footprint plus
    ``suspect_pct`` (valid pixels above :data:`SUSPECT_HEIGHT_M`, in %)."""
    import rasterio

    from eo_dinov3.canopy.stats import zonal_stats

    row = zonal_stats(chm_path, footprint(chm_path)).drop(columns=["geometry", "name"]).iloc[0].to_dict()
    n = tall = 0
    with rasterio.open(chm_path) as src:
        for _, win in src.block_windows(1):
            a = src.read(1, window=win, masked=True)
            v = np.ma.getdata(a)[~np.ma.getmaskarray(a)]
            v = v[np.isfinite(v)]
            n += v.size
            tall += int((v > SUSPECT_HEIGHT_M).sum())
    row["suspect_pct"] = 100.0 * tall / n if n else float("nan")
    return {k: float(v) for k, v in row.items()}


# -------------------------------------------------------------------------------------------------------- display
@dataclass(frozen=True)
class Overlay:
    """A raster warped to Web Mercator for display: ``array`` ``[H, W]`` float32 (CHM, NaN = nodata) or
    ``[H, W, 4]`` uint8 RGBA; ``bounds`` ``[[south, west], [north, east]]`` in degrees (EPSG:4326)."""

    array: np.ndarray
    bounds: list[list[float]]


def raster_overlay(path: str | os.PathLike, *, kind: str, max_side: int = 1024) -> Overlay:
    """Warp a decimated copy of ``path`` to EPSG:3857 (≤ ``max_side`` px on the long side; GDAL uses overviews).
    ``kind="rgb"``: RGBA uint8 (percentile stretch for non-uint8, nodata transparent); ``kind="chm"``: band 1
    float32 metres with NaN for nodata."""
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT
    from rasterio.warp import calculate_default_transform, transform_bounds

    from eo_dinov3.canopy.mapping import rgb_band_indexes
    from eo_dinov3.data import raster_io

    with raster_io.open_raster(path, allowed_drivers=("GTiff", "COG")) as src:
        t, w, h = calculate_default_transform(src.crs, "EPSG:3857", src.width, src.height, *src.bounds)
        f = max(1.0, max(w, h) / max_side)
        w2, h2 = max(1, int(round(w / f))), max(1, int(round(h / f)))
        from affine import Affine

        t2 = t @ Affine.scale(w / w2, h / h2)
        res = Resampling.average if f > 1.5 else Resampling.bilinear
        if kind == "chm":
            nod = src.nodata if src.nodata is not None else np.nan
            with WarpedVRT(src, crs="EPSG:3857", transform=t2, width=w2, height=h2, resampling=res,
                           src_nodata=nod, nodata=np.nan, dtype="float32") as vrt:
                arr = vrt.read(1).astype(np.float32)
            if src.nodata is not None and not np.isnan(src.nodata):
                arr[arr == src.nodata] = np.nan
        elif kind == "rgb":
            bands, _ = rgb_band_indexes(src)
            with WarpedVRT(src, crs="EPSG:3857", transform=t2, width=w2, height=h2, resampling=res,
                           add_alpha=True) as vrt:
                data = vrt.read(bands)
                alpha = vrt.read(vrt.count)
            valid = alpha > 0
            rgb = raster_io.to_uint8(data, scale=None if data.dtype == np.uint8 else "percentile", valid=valid)
            arr = np.dstack([rgb.transpose(1, 2, 0), np.where(valid, 255, 0).astype(np.uint8)])
        else:
            raise ConfigError(f"kind must be 'rgb' or 'chm', got {kind!r}")
        west, south, east, north = transform_bounds("EPSG:3857", "EPSG:4326", t2.c, t2.f + t2.e * h2,
                                                    t2.c + t2.a * w2, t2.f)
    return Overlay(arr, [[south, west], [north, east]])


def colorize(heights: np.ndarray, *, vmin: float = 0.0, vmax: float = DEFAULT_VMAX_M, cmap: str = CMAP) -> np.ndarray:
    """Heights ``[H, W]`` metres → RGBA ``[H, W, 4]`` uint8 on ``cmap`` between ``vmin`` and ``vmax``; NaN →
    transparent."""
    import matplotlib

    cm = matplotlib.colormaps[cmap]
    x = np.clip((heights - vmin) / max(vmax - vmin, 1e-9), 0.0, 1.0)
    rgba = (cm(np.nan_to_num(x)) * 255).astype(np.uint8)
    rgba[..., 3] = np.where(np.isfinite(heights), 255, 0)
    return rgba


def png_bytes(rgba: np.ndarray) -> bytes:
    """PNG encoding of an ``[H, W, 3|4]`` uint8 array."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG", optimize=False, compress_level=3)
    return buf.getvalue()


def cover_overlay(chm: Overlay, threshold_m: float) -> np.ndarray:
    """Canopy-cover RGBA ``[H, W, 4]``: dark green where height ≥ ``threshold_m``, light beige below, transparent
    on nodata."""
    h = chm.array
    out = np.zeros(h.shape + (4,), np.uint8)
    ok = np.isfinite(h)
    tall = ok & (h >= threshold_m)
    out[tall] = (0, 100, 0, 255)
    out[ok & ~tall] = (237, 228, 194, 255)
    return out


def legend_html(*, vmin: float = 0.0, vmax: float = DEFAULT_VMAX_M, cmap: str = CMAP, title: str = "Canopy height (m)",
                demo: bool = False) -> str:
    """A self-contained HTML legend (CSS gradient of ``cmap``, ticks in metres, no JavaScript/CDN) for the map
    corner; the demo warning is part of it when ``demo``."""
    import matplotlib

    cm = matplotlib.colormaps[cmap]
    stops = ", ".join(f"rgb({int(r * 255)},{int(g * 255)},{int(b * 255)}) {p * 100:.0f}%"
                      for p in np.linspace(0, 1, 9) for r, g, b, _ in [cm(p)])
    ticks = np.linspace(vmin, vmax, 5)
    tick_html = "".join(f'<span style="position:absolute;left:{100 * (t - vmin) / (vmax - vmin):.0f}%;'
                        f'transform:translateX(-50%)">{t:g}</span>' for t in ticks)
    warn = (f'<div style="color:#b00020;font-weight:bold;margin-top:4px">{DEMO_LABEL}</div>' if demo else "")
    return (
        '<div id="chm-legend" class="chm-legend" style="position:absolute;bottom:28px;right:12px;z-index:1000;'
        'background:rgba(255,255,255,0.92);padding:6px 10px 18px 10px;border-radius:4px;font:12px sans-serif;'
        f'width:230px;box-shadow:0 1px 4px rgba(0,0,0,.4)"><div style="font-weight:bold">{title}</div>'
        f'<div style="height:12px;margin-top:4px;background:linear-gradient(to right, {stops})"></div>'
        f'<div style="position:relative;height:12px">{tick_html}</div>'
        f'<div style="font-size:11px;margin-top:2px">&ge; {vmax:g} m shown as the top colour</div>{warn}</div>'
    )


_CSS_URL = re.compile(r"url\(['\"]?(images/[^'\")]+)['\"]?\)")


def app_static_dir() -> Path:
    """Folder of the Leaflet 1.9.3 / Leaflet.draw 1.0.4 files the map inlines: fetched at set-up from the
    ``django-leaflet`` wheel on PyPI by ``eo-dinov3 samples fetch`` (checksummed), under the samples root."""
    from eo_dinov3.data.samples import sample_path

    return sample_path("app_static_leaflet_leaflet_js").parents[1]  # <root>/app_static/leaflet/leaflet.js


def offline_assets(static_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """``data:`` URLs of the Leaflet / Leaflet.draw files in ``static_dir`` (default :func:`app_static_dir`), CSS
    image references inlined: keys ``leaflet_js``, ``leaflet_css``, ``draw_js``, ``draw_css``."""
    base = Path(static_dir) if static_dir is not None else app_static_dir()

    def data_url(p: Path, mime: str, text: str | None = None) -> str:
        raw = text.encode() if text is not None else p.read_bytes()
        return f"data:{mime};base64,{base64.b64encode(raw).decode()}"

    def css(p: Path) -> str:
        def sub(m: re.Match) -> str:
            img = p.parent / m.group(1)
            mime = "image/svg+xml" if img.suffix == ".svg" else "image/png"
            return f"url('{data_url(img, mime)}')" if img.is_file() else m.group(0)

        return data_url(p, "text/css", _CSS_URL.sub(sub, p.read_text()))

    return {
        "leaflet_js": data_url(base / "leaflet" / "leaflet.js", "text/javascript"),
        "leaflet_css": css(base / "leaflet" / "leaflet.css"),
        "draw_js": data_url(base / "leaflet-draw" / "leaflet.draw.js", "text/javascript"),
        "draw_css": css(base / "leaflet-draw" / "leaflet.draw.css"),
    }


@dataclass
class MapLayer:
    """An image layer of the map: RGBA array, bounds (see :class:`Overlay`), opacity and initial visibility."""

    name: str
    rgba: np.ndarray
    bounds: list[list[float]]
    opacity: float = 1.0
    show: bool = True


def build_map(layers: Iterable[MapLayer], *, assets: dict[str, str] | None, legend: str | None = None,
              aoi_geojson: dict | None = None, draw: bool = True, basemap: bool = False) -> Any:
    """A folium map with image overlays (PNG, already in Web Mercator), a layer switch, an optional AOI outline and
    polygon drawing tool, and an HTML legend. With ``assets`` (from :func:`offline_assets`) the Leaflet code is
    inlined instead of loaded from CDNs, so it renders without internet; ``basemap=True`` adds OpenStreetMap tiles
    (online only)."""
    import folium
    import folium.plugins

    layers = list(layers)
    m = folium.Map(tiles=None, control_scale=True, max_zoom=22, zoom_control=True)
    if assets:
        m.default_js = [("leaflet", assets["leaflet_js"])]
        m.default_css = [("leaflet_css", assets["leaflet_css"])]
    if basemap:
        folium.TileLayer("OpenStreetMap", name="OpenStreetMap (online)", max_zoom=22, max_native_zoom=19).add_to(m)
    for lay in layers:
        folium.raster_layers.ImageOverlay(
            "data:image/png;base64," + base64.b64encode(png_bytes(lay.rgba)).decode(), bounds=lay.bounds,
            opacity=lay.opacity, name=lay.name, show=lay.show, interactive=False, zindex=1,
        ).add_to(m)
    if aoi_geojson:
        folium.GeoJson(aoi_geojson, name="areas of interest",
                       style_function=lambda _: {"color": "#ff3d00", "weight": 2, "fillOpacity": 0.05}).add_to(m)
    if draw:
        d = folium.plugins.Draw(export=False, draw_options={"polyline": False, "circle": False, "marker": False,
                                                            "circlemarker": False, "rectangle": True,
                                                            "polygon": True})
        if assets:
            d.default_js = [("leaflet_draw_js", assets["draw_js"])]
            d.default_css = [("leaflet_draw_css", assets["draw_css"])]
        d.add_to(m)
    folium.LayerControl(collapsed=False).add_to(m)
    if legend:
        from branca.element import Element

        m.get_root().html.add_child(Element(legend))
    if layers:
        b = layers[0].bounds
        m.fit_bounds(b)
    return m


def sample_height(chm_path: str | os.PathLike, lon: float, lat: float) -> float | None:
    """Height (m) of the CHM pixel containing ``(lon, lat)`` (degrees, EPSG:4326); ``None`` outside the raster
    or on nodata."""
    import rasterio
    from rasterio.warp import transform as warp_transform

    with rasterio.open(chm_path) as src:
        xs, ys = warp_transform("EPSG:4326", src.crs, [lon], [lat])
        r, c = src.index(xs[0], ys[0])
        if not (0 <= r < src.height and 0 <= c < src.width):
            return None
        from rasterio.windows import Window

        v = src.read(1, window=Window(c, r, 1, 1), masked=True)
        if np.ma.getmaskarray(v)[0, 0] or not np.isfinite(v.data[0, 0]):
            return None
        return float(v.data[0, 0])


# ----------------------------------------------------------------------------------------------- areas of interest
def aoi_from_geojson(obj: dict | list) -> Any:
    """Polygons from GeoJSON (a FeatureCollection, a Feature, a geometry, or a list of features — e.g. the
    drawings returned by streamlit-folium) as a GeoDataFrame in EPSG:4326 with a ``name`` column.

    Raises:
        DataError: no polygon in it.
    """
    import geopandas as gpd
    from shapely.geometry import shape

    if isinstance(obj, list):
        feats = obj
    elif obj.get("type") == "FeatureCollection":
        feats = obj.get("features") or []
    elif obj.get("type") == "Feature":
        feats = [obj]
    else:
        feats = [{"type": "Feature", "geometry": obj, "properties": {}}]
    geoms, names = [], []
    for i, f in enumerate(feats):
        g = f.get("geometry") if isinstance(f, dict) else None
        if not g or g.get("type") not in ("Polygon", "MultiPolygon"):
            continue
        geoms.append(shape(g))
        props = f.get("properties") or {}
        names.append(str(props.get("name") or f"area {len(names) + 1}"))
    if not geoms:
        raise DataError("no polygon found; draw a polygon/rectangle or upload polygons (GeoJSON, GPKG, zipped "
                        "shapefile)")
    return gpd.GeoDataFrame({"name": names}, geometry=geoms, crs="EPSG:4326")


def read_aoi_bytes(name: str, data: bytes, tmp_dir: str | os.PathLike) -> Any:
    """Polygons from uploaded GeoJSON / GPKG / zipped-shapefile bytes (stored under a server-chosen name; only the
    client's suffix is used), via :func:`eo_dinov3.canopy.stats.read_aoi`; a ``name`` column is added when
    missing.

    Raises:
        DataError: unsupported suffix, unreadable, no CRS or not polygons.
    """
    from eo_dinov3.canopy.stats import read_aoi

    suffix = Path(name).suffix.lower()
    if suffix not in AOI_SUFFIXES:
        raise DataError(f"unsupported AOI file type {suffix!r}; upload .geojson, .gpkg or a zipped shapefile (.zip)")
    folder = Path(tmp_dir) / "aoi"
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / f"{hashlib.sha256(data).hexdigest()}{suffix}"
    p.write_bytes(data)
    gdf = read_aoi(p)
    if "name" not in gdf.columns:
        gdf = gdf.assign(name=[f"area {i + 1}" for i in range(len(gdf))])
    return gdf


#: columns of the area table shown in the app (and exported), in order
TABLE_COLUMNS = ("name", "mean_m", "median_m", "p95_m", "max_m", "cover_2m_pct", "cover_5m_pct", "forest_area_ha",
                 "area_ha", "valid_area_ha", "nodata_pct", "n_valid")


def area_table(chm_path: str | os.PathLike, aoi: Any, *, model: ModelInfo | None = None) -> Any:
    """Per-polygon statistics (:func:`eo_dinov3.canopy.stats.zonal_stats`, the same numbers as ``eo-dinov3 chm
    stats``) plus ``area_ha`` (polygon area on a local equal-area projection) and ``model`` (with the demo label
    when it applies); a GeoDataFrame in the AOI's CRS with :data:`TABLE_COLUMNS` first."""
    import geopandas as gpd

    from eo_dinov3.canopy.stats import _equal_area_crs, zonal_stats

    gdf = zonal_stats(chm_path, aoi)
    ll = gdf.to_crs("EPSG:4326")
    areas = []
    for g in ll.geometry:
        c = g.centroid
        areas.append(float(gpd.GeoSeries([g], crs="EPSG:4326").to_crs(_equal_area_crs(c.x, c.y)).area.iloc[0]) / 1e4)
    gdf["area_ha"] = areas
    if "name" not in gdf.columns:
        gdf["name"] = [f"area {i + 1}" for i in range(len(gdf))]
    if model is not None:
        gdf["model"] = model.label
    cols = [c for c in TABLE_COLUMNS if c in gdf.columns]
    rest = [c for c in gdf.columns if c not in cols and c != "geometry"]
    return gdf[cols + rest + ["geometry"]]


def height_histogram(chm_path: str | os.PathLike, aoi: Any, *, bin_m: float = 1.0, max_m: float = 60.0) -> Any:
    """Area (ha) per height class inside each polygon: a DataFrame indexed by the bin's lower edge (m), one column
    per polygon ``name``; heights ≥ ``max_m`` go to the last bin. Pixel centres inside the polygon count (as in
    the zonal statistics), each with the raster's mean ground pixel area."""
    import pandas as pd
    import rasterio
    from rasterio.features import geometry_mask
    from rasterio.windows import from_bounds
    from rasterio.windows import transform as win_transform

    from eo_dinov3.canopy.mapping import ground_gsd

    edges = np.arange(0.0, max_m + bin_m, bin_m)
    out = {}
    with rasterio.open(chm_path) as src:
        gx, gy = ground_gsd(src)
        px_ha = gx * gy / 1e4
        zones = aoi.to_crs(src.crs)
        names = aoi["name"] if "name" in aoi.columns else [f"area {i + 1}" for i in range(len(aoi))]
        for name, geom in zip(names, zones.geometry):
            counts = np.zeros(len(edges) - 1)
            w = from_bounds(*geom.bounds, transform=src.transform).round_offsets().round_lengths()
            w = w.intersection(rasterio.windows.Window(0, 0, src.width, src.height)) if w.width and w.height else w
            try:
                a = src.read(1, window=w, masked=True)
            except Exception:  # noqa: BLE001 - polygon outside the raster
                a = np.ma.masked_all((0, 0))
            if a.size:
                inside = geometry_mask([geom], out_shape=a.shape, transform=win_transform(w, src.transform),
                                       invert=True)
                v = np.ma.getdata(a)[inside & ~np.ma.getmaskarray(a)]
                v = v[np.isfinite(v)]
                counts = np.histogram(np.clip(v, 0, max_m - 1e-6), bins=edges)[0].astype(float)
            out[str(name)] = counts * px_ha
    return pd.DataFrame(out, index=pd.Index(edges[:-1], name="height_m"))


def stats_csv_bytes(gdf: Any) -> bytes:
    """The area table as CSV (no geometry), UTF-8."""
    return gdf.drop(columns="geometry").to_csv(index=False).encode()


def stats_geojson_bytes(gdf: Any) -> bytes:
    """The area table as a GeoJSON FeatureCollection in EPSG:4326 (statistics as properties)."""
    return gdf.to_crs("EPSG:4326").to_json(na="null", drop_id=True).encode()


# --------------------------------------------------------------------------------------------------------- exports
def map_png(rgb_path: str | os.PathLike, chm_path: str | os.PathLike, *, vmax: float = DEFAULT_VMAX_M,
            opacity: float = 0.7, title: str = "Canopy height", aoi: Any = None, demo: bool = False,
            max_side: int = 1600, dpi: int = 120) -> bytes:
    """PNG of the map on the raster's own (projected) grid: RGB, the CHM at ``opacity`` on ``CMAP`` (0–``vmax``
    m), AOI outlines, a colour bar "Canopy height (m)", a scale bar in metres and a title (with the demo label).
    Rasters are decimated to ≤ ``max_side`` px."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import rasterio
    from rasterio.enums import Resampling

    from eo_dinov3.canopy.mapping import ground_gsd, rgb_band_indexes
    from eo_dinov3.data import raster_io

    with rasterio.open(chm_path) as c:
        f = max(1.0, max(c.width, c.height) / max_side)
        shape = (max(1, int(c.height / f)), max(1, int(c.width / f)))
        h = c.read(1, out_shape=shape, resampling=Resampling.average, masked=True).astype(np.float32).filled(np.nan)
        b = c.bounds
        crs = c.crs
        gx, _ = ground_gsd(c)
        unit = gx / abs(c.transform.a)  # metres per CRS unit on the ground
    with raster_io.open_raster(rgb_path, allowed_drivers=("GTiff", "COG")) as s:
        bands, _ = rgb_band_indexes(s)
        rgb = s.read(bands, out_shape=(3,) + shape, resampling=Resampling.average)
        rgb = raster_io.to_uint8(rgb, scale=None if rgb.dtype == np.uint8 else "percentile").transpose(1, 2, 0)
    extent = (b.left, b.right, b.bottom, b.top)
    fig, ax = plt.subplots(figsize=(8, 8 * shape[0] / shape[1] + 0.6), dpi=dpi)
    ax.imshow(rgb, extent=extent)
    im = ax.imshow(np.ma.masked_invalid(h), extent=extent, cmap=CMAP, vmin=0, vmax=vmax, alpha=opacity)
    if aoi is not None and len(aoi):
        aoi.to_crs(crs).boundary.plot(ax=ax, color="#ff3d00", linewidth=1.5)
    cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, extend="max")
    cb.set_label("Canopy height (m)")
    cb.solids.set_alpha(1.0)
    # scale bar: a round length ~ 1/5 of the width, in metres
    width_m = (b.right - b.left) * unit
    nice = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000, 20000, 50000]
    length_m = max([n for n in nice if n <= width_m / 4] or [nice[0]])
    x0 = b.left + 0.05 * (b.right - b.left)
    y0 = b.bottom + 0.05 * (b.top - b.bottom)
    ax.plot([x0, x0 + length_m / unit], [y0, y0], color="white", linewidth=6, solid_capstyle="butt")
    ax.plot([x0, x0 + length_m / unit], [y0, y0], color="black", linewidth=3, solid_capstyle="butt")
    ax.text(x0 + length_m / unit / 2, y0 + 0.02 * (b.top - b.bottom), f"{length_m:g} m", ha="center", va="bottom",
            fontsize=10, color="black", bbox=dict(facecolor="white", alpha=0.8, edgecolor="none", pad=1))
    ax.set_title(title + (f"\n{DEMO_LABEL}" if demo else ""), color="#b00020" if demo else "black", fontsize=11)
    ax.set_xlabel(f"{crs.to_string() if crs else ''} x")
    ax.set_ylabel("y")
    ax.ticklabel_format(useOffset=False, style="plain")
    ax.tick_params(labelsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------- honesty
_DATE_KEYS = ("ACQUISITION_DATE", "ACQUISITIONDATE", "DATE_ACQUIRED", "ACQ_DATE", "IMAGE_DATE", "DATE",
              "TIFFTAG_DATETIME", "DATETIME")


def imagery_date(tags: dict[str, str]) -> str | None:
    """The imagery date from GeoTIFF tags (acquisition-date keys first, then ``TIFFTAG_DATETIME``), or ``None``."""
    up = {k.upper(): v for k, v in tags.items()}
    for k in _DATE_KEYS:
        if up.get(k):
            return f"{up[k]} (tag {k})"
    return None


def honesty_rows(inp: ValidatedInput, result: ChmResult | None, model: ModelInfo) -> list[tuple[str, str]]:
    """(item, statement) rows of the honesty panel."""
    gx, gy = inp.gsd_m
    rows = [
        ("Model", model.label),
        ("Weights", f"SHA-256 {model.weights_sha256[:16]}…" + (f" from {', '.join(model.files)}" if model.files
                                                                 else " (random initialisation, seed 0)")),
        ("Model type", DEMO_LABEL + ": random weights; the map only shows that the pipeline runs. Load the official "
                                    "CHMv2 head + SAT-493M backbone for real heights." if model.is_demo else
         "real weights (CHMv2-style DPT head on a DINOv3 backbone); heights in metres above ground"),
        ("Input GSD vs model GSD", f"{gx:.3g} x {gy:.3g} m vs {model.gsd_m:g} m"
         + (" — resampled to the model GSD and back" if inp.resampled else " — within 15 %, used as is")),
        ("Imagery date", imagery_date(inp.tags) or "not in the file's tags (unknown; canopy changes over time)"),
    ]
    if result is not None:
        s = result.summary.get("suspect_pct", float("nan"))
        rows.append(("Heights > 60 m", f"{s:.2f} % of valid pixels — suspect (towers, buildings, artefacts), not "
                                        "trees" if s > 0 else "none (heights above 60 m would be flagged as suspect)"))
    rows.append(("Known artefacts", "tall non-trees (buildings, towers) read as canopy; shadows and haze lower "
                                    "heights; single-date snapshot; tall forests tend to be underestimated"))
    return rows


def fmt_m(v: float) -> str:
    """``12.3 m`` or ``–`` for NaN."""
    return "–" if v is None or not math.isfinite(v) else f"{v:.1f} m"


def cleanup_cache(cache_dir: str | os.PathLike, keep: int = 50) -> int:
    """Delete all but the ``keep`` most recently used result folders; returns how many were removed."""
    root = Path(cache_dir) / "results"
    if not root.is_dir():
        return 0
    dirs = sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime, reverse=True)
    for d in dirs[keep:]:
        shutil.rmtree(d, ignore_errors=True)
    return max(0, len(dirs) - keep)
