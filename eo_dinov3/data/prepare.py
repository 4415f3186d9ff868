"""Cut scene rasters into fixed-size pretraining tiles plus a manifest, in parallel with dask.

Pipeline (library side of ``sat_training/prepare_tiles.py`` and ``eo-dinov3 prepare-tiles``):

1. Every scene is opened with :func:`~eo_dinov3.data.raster_io.open_raster` (driver allow-list, size budget,
   north-up); refused scenes are counted (``scene_error``) and the run goes on.
2. Each scene is split into *tasks* of ``rows_per_task`` rows of tiles. A task reads its ``tile_size`` windows
   (full windows only; the partial right/bottom edge is not cut), screens them — skipping tiles with more than
   ``max_nodata_fraction`` nodata (``nodata``) and blank/near-constant tiles whose largest per-band standard
   deviation is below ``min_std`` on the 0–255 scale (``constant``) — hashes the pixels (SHA-256) and writes the
   kept tiles atomically as DEFLATE GeoTIFFs with CRS, transform, nodata and provenance tags (``EO_DINOV3_*``:
   source, window, sha256, params). A JSON marker written last records the task's outcome.
3. The driver merges the records in scene/row/column order, drops exact duplicate tiles (same pixel hash; the
   first occurrence wins and later files are deleted — duplicates and blank tiles drive KoLeo to infinity),
   checks that every kept tile exists, and writes ``manifest.parquet`` (and/or ``.csv``) and
   ``prepare_summary.json``.

Resumable: a task whose marker exists with the same parameters is not redone; inside a redone task, tiles already
on disk with matching parameter tags are not re-read or rewritten; the manifest is always rebuilt. Tasks run on a
``dask.distributed.LocalCluster`` (``workers`` processes, one thread each; ``processes=False`` for threads), on an
existing scheduler (``scheduler="tcp://host:8786"``; every worker must see the same paths), or serially in-process
(``workers=0``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eo_dinov3.data.manifest import write_manifest
from eo_dinov3.data.raster_io import (
    DEFAULT_MAX_PIXELS,
    fsync_dir,
    info_of,
    nodata_fraction,
    open_raster,
    read_window,
    scale_to_unit,
    to_uint8,
    valid_mask,
    write_geotiff_atomic,
)
from eo_dinov3.errors import ConfigError, DataError

TAG_PREFIX = "EO_DINOV3_"
STATE_DIR = ".prepare_state"
SCENE_EXTENSIONS = (".tif", ".tiff")


@dataclass(frozen=True)
class PrepareConfig:
    """Tiling parameters (everything that changes the tiles' content is part of :meth:`params_hash`).

    Attributes:
        tile_size: tile side in pixels (SAT-493M: 512).
        stride: step between tiles in pixels (default ``tile_size``: no overlap).
        bands: 1-based bands to keep (default all bands of each scene).
        max_nodata_fraction: skip tiles with more nodata (GDAL mask: nodata value / alpha / internal mask).
        min_std: skip tiles whose largest per-band std (valid pixels, 0–255 scale) is below this.
        to_uint8: convert non-uint8 scenes to uint8 with ``scale`` (see ``scale_to_unit``); else keep the dtype.
        scale: value scale used for screening (and conversion with ``to_uint8``).
        dedupe: drop exact duplicate tiles.
        compress: GeoTIFF compression of the tiles.
        rows_per_task: rows of tiles per dask task.
        max_scene_pixels: per-band pixel budget of a scene (scenes are read by windows, so this is generous).
    """

    tile_size: int = 512
    stride: int | None = None
    bands: tuple[int, ...] | None = None
    max_nodata_fraction: float = 0.05
    min_std: float = 2.0
    to_uint8: bool = False
    scale: float | str | None = None
    dedupe: bool = True
    compress: str = "deflate"
    rows_per_task: int = 1
    max_scene_pixels: int = 50 * DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.tile_size < 16:
            raise ConfigError(f"tile_size must be >= 16 px, got {self.tile_size}")
        if self.stride is not None and self.stride < 1:
            raise ConfigError(f"stride must be >= 1 px, got {self.stride}")
        if not 0.0 <= self.max_nodata_fraction <= 1.0:
            raise ConfigError("max_nodata_fraction must be in [0, 1]")
        if self.rows_per_task < 1:
            raise ConfigError("rows_per_task must be >= 1")

    @property
    def step(self) -> int:
        return self.stride or self.tile_size

    def params_hash(self) -> str:
        keys = ("tile_size", "step", "bands", "max_nodata_fraction", "min_std", "to_uint8", "scale", "compress")
        blob = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class PrepareResult:
    """Outcome of :func:`prepare_tiles`: ``counts`` per status (``kept`` + skip reasons), the manifest path."""

    out_dir: str
    manifest: str | None
    counts: dict[str, int]
    scenes: int
    tasks_run: int
    tasks_reused: int
    tiles_reused: int
    seconds: float
    errors: list[str] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return self.counts.get("kept", 0)


# ----------------------------------------------------------------------------------------------- helpers
def scene_key(path: str) -> str:
    """Folder-safe name of a scene: its file stem plus 8 hex digits of the absolute path's hash."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(path).stem)[:60]
    return f"{stem}-{hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:8]}"


def tile_relpath(key: str, row: int, col: int) -> str:
    return f"tiles/{key}/{key}_r{row:05d}_c{col:05d}.tif"


def pixel_hash(pixels: np.ndarray) -> str:
    """SHA-256 of a tile's pixels (shape and dtype included)."""
    h = hashlib.sha256(f"{pixels.shape}|{pixels.dtype}|".encode())
    h.update(np.ascontiguousarray(pixels).tobytes())
    return h.hexdigest()


def find_scenes(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Scene files from files, folders (recursive ``*.tif``/``*.tiff``) and glob patterns, in a stable order."""
    import glob

    out: list[str] = []
    for item in inputs:
        s = str(item)
        if os.path.isdir(s):
            out += sorted(str(p) for p in Path(s).rglob("*") if p.suffix.lower() in SCENE_EXTENSIONS
                          and not p.name.startswith("."))
        elif any(c in s for c in "*?["):
            out += sorted(glob.glob(s, recursive=True))
        else:
            out.append(s)
    return list(dict.fromkeys(out))


def _write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _marker_path(out_dir: Path, key: str, r0: int, r1: int) -> Path:
    return out_dir / STATE_DIR / key / f"rows_{r0:05d}_{r1:05d}.json"


# ----------------------------------------------------------------------------------------------- worker side
def _load_marker(out: Path, task: "Task", params: str) -> dict[str, Any] | None:
    """The stored result of a finished task with the same parameters, else ``None``."""
    marker = _marker_path(out, task.key, task.row_start, task.row_stop)
    try:
        state = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if state.get("params") != params:
        return None
    records = state["records"]
    for r in records:  # the scene's position in this run's input list may differ from the run that wrote it
        r["scene_index"] = task.scene_index
    return {"scene_index": task.scene_index, "row_start": task.row_start, "records": records,
            "reused": 0, "marker": True}


@dataclass(frozen=True)
class Task:
    scene_index: int
    scene: str
    key: str
    row_start: int
    row_stop: int
    n_cols: int


def _existing_tile(path: Path, params: str, size: int) -> dict[str, Any] | None:
    """Record of an already written tile with matching parameters, else ``None``."""
    if not path.exists():
        return None
    try:
        with open_raster(path, allowed_drivers=("GTiff",)) as src:
            tags = src.tags()
            if tags.get(TAG_PREFIX + "PARAMS") != params or src.width != size or src.height != size:
                return None
            return {"sha256": tags[TAG_PREFIX + "SHA256"],
                    "nodata_fraction": float(tags[TAG_PREFIX + "NODATA_FRACTION"]),
                    "std": float(tags[TAG_PREFIX + "STD"])}
    except (DataError, KeyError, ValueError):
        return None


def process_task(task: Task, cfg: PrepareConfig, out_dir: str) -> dict[str, Any]:
    """Cut, screen, hash and write the tiles of one task; returns ``{"records": [...], "reused": n}``.

    Runs on a dask worker. Never raises for bad data: an unreadable scene or window becomes a record with status
    ``scene_error`` / ``read_error``.
    """
    import rasterio
    from rasterio.windows import Window

    out = Path(out_dir)
    params = cfg.params_hash()
    marker = _marker_path(out, task.key, task.row_start, task.row_stop)
    ident = {"scene_index": task.scene_index, "row_start": task.row_start}
    done = _load_marker(out, task, params)
    if done is not None:
        return done
    records: list[dict[str, Any]] = []
    reused = 0
    ts, step = cfg.tile_size, cfg.step
    with rasterio.Env(GDAL_CACHEMAX=256):
        try:
            src = open_raster(task.scene, max_pixels=cfg.max_scene_pixels)
        except DataError as e:
            return {"records": [{"scene_index": task.scene_index, "row": -1, "col": -1, "status": "scene_error",
                                 "detail": str(e)}], "reused": 0, "marker": False, **ident}
        with src:
            info = info_of(src)
            bands = list(cfg.bands) if cfg.bands else list(range(1, src.count + 1))
            for row in range(task.row_start, task.row_stop):
                for col in range(task.n_cols):
                    rel = tile_relpath(task.key, row, col)
                    rec: dict[str, Any] = {"scene_index": task.scene_index, "row": row, "col": col, "path": rel,
                                           "col_off": col * step, "row_off": row * step}
                    prev = _existing_tile(out / rel, params, ts)
                    if prev is not None:
                        rec.update(prev, status="kept")
                        records.append(rec)
                        reused += 1
                        continue
                    window = Window(col * step, row * step, ts, ts)
                    try:
                        pixels = read_window(src, window, bands)
                        valid = valid_mask(src, window, bands)
                    except DataError as e:
                        rec.update(status="read_error", detail=str(e))
                        records.append(rec)
                        continue
                    frac = nodata_fraction(valid)
                    rec["nodata_fraction"] = round(frac, 6)
                    if frac >= 1.0 or frac > cfg.max_nodata_fraction:
                        rec.update(status="nodata")
                        records.append(rec)
                        continue
                    unit = scale_to_unit(pixels, scale=cfg.scale, valid=valid)
                    vals = unit[:, valid] if frac > 0 else unit.reshape(unit.shape[0], -1)
                    std = float(vals.std(axis=1).max()) * 255.0
                    rec["std"] = round(std, 4)
                    if std < cfg.min_std:
                        rec.update(status="constant")
                        records.append(rec)
                        continue
                    if cfg.to_uint8:
                        pixels = to_uint8(pixels, scale=cfg.scale, valid=valid)
                    sha = pixel_hash(pixels)
                    rec["sha256"] = sha
                    tags = {
                        TAG_PREFIX + "SOURCE": os.path.abspath(task.scene),
                        TAG_PREFIX + "WINDOW": f"{col * step},{row * step},{ts},{ts}",
                        TAG_PREFIX + "SHA256": sha,
                        TAG_PREFIX + "PARAMS": params,
                        TAG_PREFIX + "NODATA_FRACTION": f"{frac:.6f}",
                        TAG_PREFIX + "STD": f"{std:.4f}",
                        TAG_PREFIX + "BANDS": ",".join(map(str, bands)),
                    }
                    write_geotiff_atomic(out / rel, pixels, crs=src.crs, transform=src.window_transform(window),
                                         nodata=src.nodata, tags=tags, compress=cfg.compress)
                    rec.update(status="kept")
                    records.append(rec)
    common = {"width": ts, "height": ts, "count": len(bands), "dtype": "uint8" if cfg.to_uint8 else info.dtype,
              "crs": info.crs or "", "gsd_m": info.gsd_m, "source": os.path.abspath(task.scene)}
    for r in records:
        if r["status"] == "kept":
            r.update(common)
    _write_json_atomic(marker, {"params": params, "task": asdict(task), "records": records})
    return {**ident, "records": records, "reused": reused, "marker": False}


# ----------------------------------------------------------------------------------------------- driver side
def _plan(scenes: Sequence[str], cfg: PrepareConfig) -> tuple[list[Task], list[dict[str, Any]]]:
    tasks: list[Task] = []
    errors: list[dict[str, Any]] = []
    ts, step = cfg.tile_size, cfg.step
    for i, scene in enumerate(scenes):
        try:
            with open_raster(scene, max_pixels=cfg.max_scene_pixels) as src:
                if cfg.bands and max(cfg.bands) > src.count:
                    raise DataError(f"{scene!r} has {src.count} band(s); --bands asks for band {max(cfg.bands)}")
                w, h = src.width, src.height
        except DataError as e:
            errors.append({"scene_index": i, "row": -1, "col": -1, "status": "scene_error", "detail": str(e)})
            continue
        n_rows = (h - ts) // step + 1 if h >= ts else 0
        n_cols = (w - ts) // step + 1 if w >= ts else 0
        if n_rows == 0 or n_cols == 0:
            errors.append({"scene_index": i, "row": -1, "col": -1, "status": "scene_too_small",
                           "detail": f"{scene}: {w}x{h} px < {ts}"})
            continue
        key = scene_key(scene)
        for r0 in range(0, n_rows, cfg.rows_per_task):
            tasks.append(Task(i, scene, key, r0, min(n_rows, r0 + cfg.rows_per_task), n_cols))
    return tasks, errors


def _run_tasks(tasks: list[Task], cfg: PrepareConfig, out_dir: str, *, workers: int, processes: bool,
               scheduler: str | None, progress: bool) -> tuple[list[dict[str, Any]], list[str]]:
    from tqdm.auto import tqdm

    results: list[dict[str, Any]] = []
    errors: list[str] = []
    bar = tqdm(total=len(tasks), desc="tiling", unit="task", disable=not progress or not tasks)
    kept = [0]

    def done(res: dict[str, Any]) -> None:
        results.append(res)
        bar.update(1)
        kept[0] += sum(1 for r in res["records"] if r["status"] == "kept")
        bar.set_postfix(kept=kept[0], refresh=False)

    if not tasks:
        return results, errors
    if workers <= 0 and scheduler is None:
        for t in tasks:
            done(process_task(t, cfg, out_dir))
        bar.close()
        return results, errors
    from dask.distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=processes,
                               dashboard_address=None, silence_logs=40)
        client = Client(cluster)
    try:
        futures = client.map(process_task, tasks, cfg=cfg, out_dir=out_dir, pure=False)
        task_of = {f.key: t for f, t in zip(futures, tasks)}
        for fut in as_completed(futures):
            try:
                done(fut.result())
            except Exception as e:  # noqa: BLE001 - one broken task must not stop the run
                t = task_of.get(fut.key)
                errors.append(f"task {t}: {type(e).__name__}: {e}")
                bar.update(1)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
        bar.close()
    return results, errors


def prepare_tiles(
    scenes: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    cfg: PrepareConfig | None = None,
    *,
    workers: int = 2,
    processes: bool = True,
    scheduler: str | None = None,
    manifest_format: str = "parquet",
    progress: bool = True,
) -> PrepareResult:
    """Tile ``scenes`` into ``out_dir`` (``tiles/<scene>/…tif``, ``manifest.parquet|csv``,
    ``prepare_summary.json``); see the module docstring. Returns a :class:`PrepareResult`."""
    cfg = cfg or PrepareConfig()
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = find_scenes(scenes)
    if not files:
        raise DataError(f"no scene rasters found in {list(map(str, scenes))}")
    tasks, plan_errors = _plan(files, cfg)
    params = cfg.params_hash()
    results, todo = [], []
    for t in tasks:  # finished tasks are read here, so a complete rerun starts no cluster at all
        done = _load_marker(out, t, params)
        if done is not None:
            results.append(done)
        else:
            todo.append(t)
    more, task_errors = _run_tasks(todo, cfg, str(out), workers=workers, processes=processes,
                                   scheduler=scheduler, progress=progress)
    results += more
    by_task = {(res["scene_index"], res["row_start"]): res for res in results}
    records = [r for res in by_task.values() for r in res["records"]]
    _dedupe(records, cfg.dedupe)
    # Kept tiles that vanished since their task's marker was written: redo those tasks once.
    missing = {(r["scene_index"], r["row"] - r["row"] % cfg.rows_per_task) for r in records
               if r["status"] == "kept" and not (out / r["path"]).exists()}
    if missing:
        redo = [t for t in tasks if (t.scene_index, t.row_start) in missing]
        for t in redo:
            _marker_path(out, t.key, t.row_start, t.row_stop).unlink(missing_ok=True)
        more, more_err = _run_tasks(redo, cfg, str(out), workers=workers, processes=processes,
                                    scheduler=scheduler, progress=progress)
        by_task.update({(res["scene_index"], res["row_start"]): res for res in more})
        task_errors += more_err
        records = [r for res in by_task.values() for r in res["records"]]
        _dedupe(records, cfg.dedupe)
    results = list(by_task.values())
    records += plan_errors
    records.sort(key=lambda r: (r["scene_index"], r["row"], r["col"]))
    for r in records:
        if r["status"] == "duplicate" and r.get("path"):
            (out / r["path"]).unlink(missing_ok=True)
    counts = Counter(r["status"] for r in records)
    kept = [r for r in records if r["status"] == "kept"]
    manifest_path = None
    if kept:
        import pandas as pd

        cols = ["path", "id", "width", "height", "count", "dtype", "crs", "gsd_m", "source", "col_off", "row_off",
                "sha256", "nodata_fraction", "std"]
        df = pd.DataFrame([{**r, "id": Path(r["path"]).stem} for r in kept])[cols]
        fmts = ["parquet", "csv"] if manifest_format == "both" else [manifest_format]
        for fmt in fmts:
            written = str(write_manifest(df, out / f"manifest.{fmt}"))
            manifest_path = manifest_path or written
    errors = [f"{r['status']}: {r.get('detail', '')}" for r in records if r["status"].endswith("error")]
    errors += task_errors
    result = PrepareResult(
        out_dir=str(out), manifest=manifest_path, counts=dict(sorted(counts.items())), scenes=len(files),
        tasks_run=sum(1 for res in results if not res.get("marker")),
        tasks_reused=sum(1 for res in results if res.get("marker")),
        tiles_reused=sum(res.get("reused", 0) for res in results), seconds=round(time.perf_counter() - t0, 3),
        errors=errors[:100],
    )
    _write_json_atomic(out / "prepare_summary.json", {**asdict(result), "config": asdict(cfg)})
    return result


def _dedupe(records: list[dict[str, Any]], enabled: bool) -> None:
    """Mark later exact duplicates (same sha256) ``duplicate``, in scene/row/column order (first one wins)."""
    records.sort(key=lambda r: (r["scene_index"], r["row"], r["col"]))
    seen: set[str] = set()
    for r in records:
        if r["status"] == "duplicate":
            r["status"] = "kept"
        if not enabled or r["status"] != "kept":
            continue
        if r["sha256"] in seen:
            r["status"] = "duplicate"
        else:
            seen.add(r["sha256"])


# ----------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenes", nargs="+", help="scene GeoTIFFs, folders (searched recursively for *.tif/*.tiff) or "
                   "glob patterns (quote them)")
    p.add_argument("--out", "-o", required=True, help="output folder: tiles/, manifest.*, prepare_summary.json")
    p.add_argument("--tile-size", type=int, default=512, help="tile side in pixels (default 512, as SAT-493M)")
    p.add_argument("--stride", type=int, default=None, help="step between tiles in pixels (default: tile size)")
    p.add_argument("--bands", default=None, help="comma-separated 1-based bands to keep, e.g. 1,2,3 (default all)")
    p.add_argument("--max-nodata", type=float, default=0.05,
                   help="skip tiles whose nodata fraction exceeds this (default 0.05)")
    p.add_argument("--min-std", type=float, default=2.0,
                   help="skip blank/near-constant tiles: largest per-band std below this on the 0-255 scale "
                        "(default 2.0)")
    p.add_argument("--no-dedupe", action="store_true", help="keep exact duplicate tiles (default: drop them)")
    p.add_argument("--to-uint8", action="store_true", help="convert non-uint8 scenes to uint8 using --scale")
    p.add_argument("--scale", default=None,
                   help="value scale of non-uint8 data: a number (uint16 default 10000), 'dtype' or 'percentile'")
    p.add_argument("--compress", default="deflate", help="tile compression (deflate, zstd, lzw, none)")
    p.add_argument("--rows-per-task", type=int, default=1, help="rows of tiles per parallel task (default 1)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="dask LocalCluster worker processes (default min(4, CPUs)); 0 = run serially in-process")
    p.add_argument("--threads", action="store_true", help="LocalCluster workers as threads, not processes")
    p.add_argument("--scheduler", default=None,
                   help="address of an existing dask scheduler (tcp://host:8786) instead of a LocalCluster; "
                        "workers must see the same paths")
    p.add_argument("--manifest-format", choices=("parquet", "csv", "both"), default="parquet",
                   help="manifest file format (default parquet)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parse_scale(s: str | None) -> float | str | None:
    if s is None or s in ("dtype", "percentile"):
        return s
    try:
        return float(s)
    except ValueError:
        raise ConfigError(f"--scale must be a number, 'dtype' or 'percentile', not {s!r}") from None


def run(args: argparse.Namespace) -> int:
    try:
        bands = tuple(int(b) for b in args.bands.split(",")) if args.bands else None
    except ValueError:
        raise ConfigError(f"--bands must be comma-separated integers, not {args.bands!r}") from None
    cfg = PrepareConfig(tile_size=args.tile_size, stride=args.stride, bands=bands, max_nodata_fraction=args.max_nodata,
                        min_std=args.min_std, to_uint8=args.to_uint8, scale=_parse_scale(args.scale),
                        dedupe=not args.no_dedupe, compress=args.compress, rows_per_task=args.rows_per_task)
    res = prepare_tiles(args.scenes, args.out, cfg, workers=args.workers, processes=not args.threads,
                        scheduler=args.scheduler, manifest_format=args.manifest_format,
                        progress=not args.no_progress)
    skipped = {k: v for k, v in res.counts.items() if k != "kept"}
    print(f"{res.kept} tiles kept from {res.scenes} scene(s) in {res.seconds:.1f} s; skipped: {skipped or 'none'}; "
          f"tasks run {res.tasks_run}, reused {res.tasks_reused}")
    print(f"manifest: {res.manifest}")
    for e in res.errors[:10]:
        print(f"  {e}", file=sys.stderr)
    return 0 if res.kept else 1


DESCRIPTION = textwrap.fill(" ".join(__doc__.split("\n\n")[0].split()) + (
    " Skips mostly-nodata, blank/near-constant and exact duplicate tiles, writes GeoTIFF tiles with CRS, "
    "transform and provenance tags plus a Parquet/CSV manifest for ManifestTileDataset. Resumable: rerunning the "
    "same command skips finished work and rebuilds the manifest."
), width=100)


EPILOG = """outputs in --out:
  tiles/<scene>/<scene>_rRRRRR_cCCCCC.tif  DEFLATE GeoTIFF tiles with CRS, transform, nodata and provenance tags
                                          (EO_DINOV3_SOURCE, _WINDOW, _SHA256, _PARAMS)
  manifest.parquet|csv                     one row per kept tile: path, id, width, height, count, dtype, crs,
                                          gsd_m, source, col_off, row_off, sha256, nodata_fraction, std
  prepare_summary.json                     counts per status (kept, nodata, constant, duplicate, scene_error, ...)
  .prepare_state/                          per-task markers that make reruns resume

examples:
  eo-dinov3 prepare-tiles scenes/ --out tiles512                      # all *.tif under scenes/, 512-px tiles
  eo-dinov3 prepare-tiles 'imgs/*.tif' --out t256 --tile-size 256 --workers 8
  eo-dinov3 prepare-tiles s2/*.tif --out t --bands 4,3,2 --to-uint8 --scale 10000
  eo-dinov3 prepare-tiles big.tif --out t --scheduler tcp://10.0.0.5:8786
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("prepare-tiles", help="cut scene rasters into pretraining tiles + manifest",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:

    parser = argparse.ArgumentParser(prog="prepare_tiles.py", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    from eo_dinov3.cli import run_standalone

    return run_standalone(parser, run, argv)
