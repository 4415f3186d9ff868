"""PyTorch datasets of Earth-observation tiles for self-supervised pretraining.

* :class:`TileFolderDataset` — map-style, over a folder/glob/list of GeoTIFF (or PNG/JPEG) tiles.
* :class:`ManifestTileDataset` — iterable, over a Parquet/CSV manifest; the form that scales to 10^8 tiles: each
  (rank, worker) reads only its own manifest blocks, the order is a pure function of ``(seed, position)`` and
  :meth:`~ManifestTileDataset.set_position` resumes mid-stream bit-exactly.
* :class:`SceneSamplerDataset` — map-style, fixed-size chips drawn on the fly from large scene rasters with
  torchgeo (``RasterDataset`` for reading/reprojection, ``RandomGeoSampler`` for the sampling regions).

Common behaviour
----------------
Each item is ``(image, sample_id)``: ``image`` is a ``uint8 [C, H, W]`` tensor (default; non-uint8 rasters are
scaled with :func:`~eo_dinov3.data.raster_io.scale_to_unit` and rounded) or float32 in ``[0, 1]``
(``output_dtype="float32"``), or the output of ``transform`` (e.g. :class:`~eo_dinov3.data.augmentations.
DataAugmentationDINO`, which applies the SAT-493M normalisation). ``sample_id`` is the manifest ``id`` (default: the
tile path) or ``"<scene>@<x>,<y>"`` for scene chips.

Bad tiles never crash a run: unreadable/corrupt files, wrong band count, too much nodata (or cloud, via the manifest
column ``cloud_fraction`` or a mask band), near-constant/blank tiles (max per-band std below ``min_std`` on the
0–255 scale — these drive KoLeo to infinity), and tiles smaller than ``min_size``. Each is counted in
``dataset.skipped`` (:class:`SkipCounter`: counts per reason + the first sample ids) and logged; with DataLoader
workers the counter lives in each worker, so set ``skip_log_dir`` to collect ``skipped-rank<r>-worker<w>.jsonl``.
To keep positions and samples one-to-one (needed for bit-exact resume), a bad tile is *replaced* by the next good
tile of the same stream (folder: next index; manifest: next row of the shard), augmented with the bad position's
seed. More than ``max_consecutive_bad`` bad tiles in a row raise :class:`~eo_dinov3.errors.DataError` (the data is
systematically wrong, e.g. a wrong path or band list).

Per-sample randomness: the transform receives ``generator=torch.Generator().manual_seed(derive_seed(seed, g))``
where ``g`` is the sample's global index (folder/scene: ``epoch * len + index``; manifest: ``position * S + shard``
with ``S = world_size * num_workers``). Transforms without a ``generator`` parameter run under a forked, seeded
global torch RNG instead.
"""

from __future__ import annotations

import glob as _glob
import inspect
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from eo_dinov3.data.manifest import ManifestReader, derive_seed, resolve_tile_path, shard_stream
from eo_dinov3.data.raster_io import (
    DEFAULT_DRIVERS,
    nodata_fraction,
    open_raster,
    raster_info,
    read_window,
    scale_to_unit,
    valid_mask,
)
from eo_dinov3.errors import ConfigError, DataError

log = logging.getLogger(__name__)

TILE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


# ----------------------------------------------------------------------------------------------- skips
@dataclass
class SkipCounter:
    """Counts skipped samples per reason and keeps the first ``max_examples`` ``(sample_id, reason, detail)``."""

    counts: Counter = field(default_factory=Counter)
    examples: list[tuple[str, str, str]] = field(default_factory=list)
    max_examples: int = 1000
    log_path: str | None = None

    def add(self, sample_id: str, reason: str, detail: str = "") -> None:
        self.counts[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append((sample_id, reason, detail))
        if self.counts.total() <= 20 or self.counts.total() % 1000 == 0:
            log.warning("skipped tile %s (%s) %s [%d skipped so far]", sample_id, reason, detail,
                        self.counts.total())
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"id": sample_id, "reason": reason, "detail": detail}) + "\n")

    @property
    def total(self) -> int:
        return self.counts.total()

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)


class BadTile(Exception):
    """A tile unusable for training; ``reason`` is a short key (``unreadable``, ``band_count`` …)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class TileOptions:
    """How tiles are read and screened (shared by all datasets).

    Attributes:
        bands: 1-based band indexes to read, in output order (default RGB = 1, 2, 3).
        output_dtype: ``"uint8"`` (0–255) or ``"float32"`` ([0, 1]).
        scale: value scaling of non-uint8 data (see :func:`~eo_dinov3.data.raster_io.scale_to_unit`).
        max_nodata_fraction: skip tiles with a larger fraction of nodata (or masked-cloud) pixels.
        min_std: skip tiles whose largest per-band standard deviation (valid pixels, 0–255 scale) is below this.
        min_size: skip tiles with ``min(H, W)`` below this (pixels).
        cloud_mask_band: optional 1-based band whose non-zero pixels are cloud (counted as invalid).
        allowed_drivers: GDAL drivers accepted by :func:`~eo_dinov3.data.raster_io.open_raster`.
    """

    bands: tuple[int, ...] = (1, 2, 3)
    output_dtype: str = "uint8"
    scale: float | str | None = None
    max_nodata_fraction: float = 0.1
    min_std: float = 2.0
    min_size: int | None = None
    cloud_mask_band: int | None = None
    allowed_drivers: tuple[str, ...] = DEFAULT_DRIVERS

    def __post_init__(self) -> None:
        if self.output_dtype not in ("uint8", "float32"):
            raise ConfigError(f"output_dtype must be 'uint8' or 'float32', not {self.output_dtype!r}")
        if not self.bands:
            raise ConfigError("bands must list at least one 1-based band index")


def screen_pixels(pixels: np.ndarray, valid: np.ndarray, opts: TileOptions) -> tuple[np.ndarray, float, float]:
    """Check ``pixels [C, H, W]`` with validity ``valid [H, W]`` against ``opts``.

    Returns ``(unit, nodata_fraction, max_band_std_255)`` with ``unit`` float32 in [0, 1]; raises :class:`BadTile`.
    """
    frac = nodata_fraction(valid)
    if frac >= 1.0:
        raise BadTile("nodata", "all pixels are nodata")
    if frac > opts.max_nodata_fraction:
        raise BadTile("nodata", f"nodata fraction {frac:.3f} > {opts.max_nodata_fraction}")
    unit = scale_to_unit(pixels, scale=opts.scale, valid=valid)
    vals = unit[:, valid] if frac > 0 else unit.reshape(unit.shape[0], -1)
    std = float(vals.std(axis=1).max()) * 255.0 if vals.size else 0.0
    if std < opts.min_std:
        raise BadTile("constant", f"max band std {std:.2f} < {opts.min_std} (0-255 scale)")
    return unit, frac, std


def load_tile(path: str, opts: TileOptions) -> torch.Tensor:
    """Read and screen one tile file → ``[C, H, W]`` tensor (``opts.output_dtype``); raises :class:`BadTile`."""
    try:
        with open_raster(path, allowed_drivers=opts.allowed_drivers) as src:
            if max(opts.bands) > src.count:
                raise BadTile("band_count", f"{src.count} band(s), need band {max(opts.bands)}")
            if opts.min_size is not None and min(src.width, src.height) < opts.min_size:
                raise BadTile("too_small", f"{src.width}x{src.height} px < {opts.min_size}")
            pixels = read_window(src, bands=opts.bands)
            valid = valid_mask(src, bands=opts.bands)
            if opts.cloud_mask_band is not None:
                clear = valid & (read_window(src, bands=[opts.cloud_mask_band])[0] == 0)
                frac = nodata_fraction(clear)
                if frac > opts.max_nodata_fraction and nodata_fraction(valid) <= opts.max_nodata_fraction:
                    raise BadTile("cloud", f"nodata+cloud fraction {frac:.3f} > {opts.max_nodata_fraction}")
                valid = clear
    except DataError as e:
        raise BadTile("unreadable", str(e)) from e
    return _to_tensor(pixels, valid, opts)


def _to_tensor(pixels: np.ndarray, valid: np.ndarray, opts: TileOptions) -> torch.Tensor:
    unit, _, _ = screen_pixels(pixels, valid, opts)
    if opts.output_dtype == "float32":
        return torch.from_numpy(np.ascontiguousarray(unit))
    if pixels.dtype == np.uint8 and opts.scale is None:
        return torch.from_numpy(np.ascontiguousarray(pixels))
    return torch.from_numpy(np.rint(unit * 255.0).astype(np.uint8))


# ----------------------------------------------------------------------------------------------- transforms
class _TransformCaller:
    """Calls ``transform(image, generator=...)`` or, for transforms without that parameter, ``transform(image)``
    under a forked global RNG seeded with the sample seed."""

    def __init__(self, transform: Callable | None) -> None:
        self.transform = transform
        self.takes_generator = False
        if transform is not None:
            try:
                self.takes_generator = "generator" in inspect.signature(transform).parameters
            except (TypeError, ValueError):
                self.takes_generator = False

    def __call__(self, image: torch.Tensor, seed: int) -> Any:
        if self.transform is None:
            return image
        if self.takes_generator:
            return self.transform(image, generator=torch.Generator().manual_seed(seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image)


def _skip_log_path(skip_log_dir: str | os.PathLike | None, rank: int, worker: int) -> str | None:
    if skip_log_dir is None:
        return None
    Path(skip_log_dir).mkdir(parents=True, exist_ok=True)
    return str(Path(skip_log_dir) / f"skipped-rank{rank}-worker{worker}.jsonl")


def _dist_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def list_tile_files(source: str | os.PathLike | Sequence[str | os.PathLike],
                    extensions: Sequence[str] = TILE_EXTENSIONS) -> list[str]:
    """Sorted tile paths from a folder (recursive), a glob pattern, or a list of files."""
    if isinstance(source, (str, os.PathLike)):
        s = str(source)
        if os.path.isdir(s):
            files = [str(p) for p in Path(s).rglob("*") if p.is_file() and p.suffix.lower() in extensions
                     and not p.name.startswith(".")]
        else:
            files = [p for p in _glob.glob(s, recursive=True) if os.path.isfile(p)]
    else:
        files = [str(p) for p in source]
    return sorted(files)


# ----------------------------------------------------------------------------------------------- folder
class TileFolderDataset(Dataset):
    """Map-style dataset over tile files (GeoTIFF/PNG/JPEG).

    Args:
        source: folder (searched recursively for ``extensions``), glob pattern, or list of files.
        bands: 1-based bands to read. Other screening options: see :class:`TileOptions`.
        transform: applied to the ``[C, H, W]`` tile with a per-sample generator (module docstring).
        seed: base seed of per-sample randomness; :meth:`set_epoch` changes it per epoch.
        max_consecutive_bad: bad tiles tolerated in a row when looking for a replacement.
    """

    def __init__(
        self,
        source: str | os.PathLike | Sequence[str | os.PathLike],
        bands: Sequence[int] = (1, 2, 3),
        *,
        transform: Callable | None = None,
        seed: int = 0,
        extensions: Sequence[str] = TILE_EXTENSIONS,
        max_consecutive_bad: int = 100,
        skip_log_dir: str | os.PathLike | None = None,
        **options: Any,
    ) -> None:
        self.files = list_tile_files(source, extensions)
        if not self.files:
            raise DataError(f"no tile files ({', '.join(extensions)}) found in {source!r}")
        self.opts = TileOptions(bands=tuple(int(b) for b in bands), **options)
        self.root = str(source) if isinstance(source, (str, os.PathLike)) and os.path.isdir(source) else None
        self._transform = _TransformCaller(transform)
        self.seed = int(seed)
        self.epoch = 0
        self.max_consecutive_bad = int(max_consecutive_bad)
        self.skip_log_dir = skip_log_dir
        self.skipped = SkipCounter()
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        """Per-epoch augmentation seeds (call before creating the DataLoader iterator)."""
        self.epoch = int(epoch)

    def sample_id(self, index: int) -> str:
        f = self.files[index]
        return os.path.relpath(f, self.root) if self.root else f

    def _load(self, index: int) -> torch.Tensor | None:
        if index in self._bad:
            return None
        try:
            return load_tile(self.files[index], self.opts)
        except BadTile as e:
            self._bad.add(index)
            wi = get_worker_info()
            if self.skipped.log_path is None and self.skip_log_dir is not None:
                self.skipped.log_path = _skip_log_path(self.skip_log_dir, 0, wi.id if wi else 0)
            self.skipped.add(self.sample_id(index), e.reason, e.detail)
            return None

    def __getitem__(self, index: int) -> tuple[Any, str]:
        n = len(self.files)
        index = int(index) % n
        for k in range(min(n, self.max_consecutive_bad + 1)):
            j = (index + k) % n
            img = self._load(j)
            if img is not None:
                seed = derive_seed(self.seed, self.epoch * n + index)
                return self._transform(img, seed), self.sample_id(j)
        raise DataError(f"{min(n, self.max_consecutive_bad + 1)} consecutive bad tiles from "
                        f"{self.sample_id(index)!r}; see dataset.skipped ({self.skipped.as_dict()})")


# ----------------------------------------------------------------------------------------------- manifest
class ManifestTileDataset(IterableDataset):
    """Iterable dataset over a Parquet/CSV tile manifest, sharded by (rank, DataLoader worker).

    Order: shard ``s = rank * W + worker`` of ``S = world_size * W`` streams its own blocks of the manifest (see
    :mod:`eo_dinov3.data.manifest`); epochs follow each other (``infinite=True``, the pretraining default) or one
    ``epoch`` is streamed (``infinite=False``; over all shards every row then appears exactly once).

    Resume: with a DataLoader of ``num_workers = W`` and ``batch_size = batch_size`` (pass the same value here;
    in-order round-robin is the DataLoader default), a rank that consumed ``n`` samples
    (``n = batches * batch_size``) calls ``dataset.set_position(n)`` before creating the new loader iterator
    (not with ``persistent_workers=True``, whose workers keep their old copy of the dataset).
    Worker roles are rotated so that the first batch of the new iterator is exactly the batch an uninterrupted run
    would have produced next. Resume needs the same seed, manifest, world size, W and batch_size.

    Args:
        manifest: ``.parquet`` or ``.csv`` manifest (columns: :data:`~eo_dinov3.data.manifest.REQUIRED_COLUMNS`).
        bands, transform, seed, skip options: as :class:`TileFolderDataset` / :class:`TileOptions`.
        batch_size: the DataLoader ``batch_size`` (granularity of the round-robin between workers).
        rank, world_size: default from ``torch.distributed`` when initialised, else 0 / 1.
        max_cloud_fraction: skip rows whose ``cloud_fraction`` column exceeds it (no pixel read).
        block_rows, csv_block_bytes: manifest block sizes (see :class:`~eo_dinov3.data.manifest.ManifestReader`);
            a manifest with fewer blocks than shards is split into smaller blocks automatically.
    """

    def __init__(
        self,
        manifest: str | os.PathLike,
        bands: Sequence[int] = (1, 2, 3),
        *,
        transform: Callable | None = None,
        seed: int = 0,
        batch_size: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
        infinite: bool = True,
        epoch: int = 0,
        shuffle: bool = True,
        block_rows: int = 4096,
        csv_block_bytes: int = 1 << 20,
        max_cloud_fraction: float | None = None,
        max_consecutive_bad: int = 1000,
        skip_log_dir: str | os.PathLike | None = None,
        **options: Any,
    ) -> None:
        self.manifest = str(manifest)
        self.reader = ManifestReader(manifest, block_rows=block_rows, csv_block_bytes=csv_block_bytes)
        self.opts = TileOptions(bands=tuple(int(b) for b in bands), **options)
        self._transform = _TransformCaller(transform)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.rank, self.world_size = rank, world_size
        self.infinite = bool(infinite)
        self.epoch = int(epoch)
        self.shuffle = bool(shuffle)
        self.max_cloud_fraction = max_cloud_fraction
        self.max_consecutive_bad = int(max_consecutive_bad)
        self.skip_log_dir = skip_log_dir
        self.skipped = SkipCounter()
        self.position = 0

    def set_position(self, n_samples_consumed: int) -> None:
        """Resume after ``n_samples_consumed`` samples of this rank (call before ``iter(loader)``)."""
        if n_samples_consumed < 0:
            raise ValueError("n_samples_consumed must be >= 0")
        self.position = int(n_samples_consumed)

    def set_epoch(self, epoch: int) -> None:
        """Epoch streamed when ``infinite=False`` (first epoch otherwise); resets the position."""
        self.epoch = int(epoch)
        self.position = 0

    def shard_plan(self, worker: int, num_workers: int) -> tuple[int, int, int]:
        """``(shard, num_shards, start_position)`` of DataLoader worker ``worker`` after :meth:`set_position`."""
        rank, world = _dist_rank_world(self.rank, self.world_size)
        b, W = self.batch_size, num_workers
        m, r = divmod(self.position, b)
        if r and W > 1:
            raise ValueError(f"position {self.position} is not a multiple of batch_size {b} (needed with workers)")
        logical = (worker + m) % W
        start = (m // W + (1 if logical < m % W else 0)) * b + r
        return rank * W + logical, world * W, start

    def _row_bad_reason(self, row: dict[str, Any]) -> BadTile | None:
        if self.max_cloud_fraction is not None:
            cf = row.get("cloud_fraction")
            if cf is not None and cf == cf and float(cf) > self.max_cloud_fraction:
                return BadTile("cloud", f"cloud_fraction {float(cf):.3f} > {self.max_cloud_fraction}")
        nf = row.get("nodata_fraction")
        if nf is not None and nf == nf and float(nf) > self.opts.max_nodata_fraction:
            return BadTile("nodata", f"manifest nodata_fraction {float(nf):.3f} > {self.opts.max_nodata_fraction}")
        return None

    def _load_row(self, row: dict[str, Any]) -> torch.Tensor:
        bad = self._row_bad_reason(row)
        if bad is not None:
            raise bad
        return load_tile(resolve_tile_path(str(row["path"]), self.manifest), self.opts)

    @staticmethod
    def _id(row: dict[str, Any]) -> str:
        rid = row.get("id")
        return str(rid) if rid not in (None, "") else str(row["path"])

    def __iter__(self) -> Iterator[tuple[Any, str]]:
        wi = get_worker_info()
        worker, num_workers = (wi.id, wi.num_workers) if wi is not None else (0, 1)
        shard, num_shards, start = self.shard_plan(worker, num_workers)
        rank, _ = _dist_rank_world(self.rank, self.world_size)
        if self.skip_log_dir is not None:
            self.skipped.log_path = _skip_log_path(self.skip_log_dir, rank, worker)
        reader = self.reader.with_min_blocks(num_shards)  # small manifests: at least one block per shard
        kw = dict(seed=self.seed, shard=shard, num_shards=num_shards, epoch=self.epoch, infinite=self.infinite,
                  shuffle=self.shuffle)
        bad_positions: set[int] = set()
        ahead: dict[int, tuple[torch.Tensor, str]] = {}  # images loaded while looking for a replacement

        def load(item) -> tuple[torch.Tensor, str] | None:
            if item.position in bad_positions:
                return None
            if item.position in ahead:
                return ahead.pop(item.position)
            try:
                return self._load_row(item.row), self._id(item.row)
            except BadTile as e:
                bad_positions.add(item.position)
                self.skipped.add(self._id(item.row), e.reason, e.detail)
                return None

        for item in shard_stream(reader, start_position=start, **kw):
            got = load(item)
            if got is None:  # replace by the next good row of this shard's stream
                for k, nxt in enumerate(shard_stream(reader, start_position=item.position + 1, **kw)):
                    if k >= self.max_consecutive_bad:
                        raise DataError(f"more than {self.max_consecutive_bad} consecutive bad tiles in manifest "
                                        f"{self.manifest!r}; skipped so far: {self.skipped.as_dict()}")
                    got = load(nxt)
                    if got is not None:
                        ahead[nxt.position] = (got[0].clone(), got[1])
                        break
                if got is None:  # finite stream ended with bad rows only
                    continue
            img, sid = got
            seed = derive_seed(self.seed, item.position * num_shards + shard)
            yield self._transform(img, seed), sid
            if len(bad_positions) > 100_000:
                bad_positions.clear()


# ----------------------------------------------------------------------------------------------- scenes
class SceneSamplerDataset(Dataset):
    """Fixed-size chips sampled on the fly from large scene rasters (torchgeo ``RasterDataset`` +
    ``RandomGeoSampler`` regions).

    Chip ``i`` of epoch ``e`` is a pure function of ``(seed, e, i)``: a scene is drawn with probability
    proportional to its area and a pixel-aligned window inside it, both from a generator seeded by
    ``derive_seed(seed, e, i)`` (torchgeo's ``get_random_bounding_box``). ``RandomGeoSampler.__iter__`` is not
    used because it draws the scene from the *global* RNG (``torch.multinomial`` without its generator), which
    differs per DataLoader worker. Chips failing the screening (mostly nodata, constant) are redrawn with the next
    sub-seed (up to ``max_tries``) and counted in ``skipped``.

    Scenes must share one CRS and resolution unless ``crs``/``res`` are given (torchgeo then warps on the fly,
    which is slower). Every scene is first checked with :func:`~eo_dinov3.data.raster_io.open_raster` (driver
    allow-list, size budget, north-up); refused files are counted in ``skipped`` and left out. Rasters are opened
    lazily in each worker.

    Args:
        paths: scene files, folders or glob patterns.
        size: chip size in pixels.
        length: chips per epoch (default: torchgeo's estimate, about the number of non-overlapping chips).
        bands, transform, seed, screening options: as :class:`TileFolderDataset`.
        nodata: value marking nodata in all bands (default: the first scene's nodata, or none).
        crs, res: target CRS / resolution (CRS units) passed to torchgeo.
        max_pixels: per-band pixel budget per scene for :func:`open_raster` (scenes are read by windows).
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        size: int = 512,
        length: int | None = None,
        bands: Sequence[int] = (1, 2, 3),
        *,
        transform: Callable | None = None,
        seed: int = 0,
        nodata: float | None = None,
        crs: Any = None,
        res: float | None = None,
        max_tries: int = 10,
        max_pixels: int | None = 10_000_000_000,
        **options: Any,
    ) -> None:
        from rasterio.crs import CRS

        sources = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        files: list[str] = []
        for s in sources:
            files += list_tile_files(s, (".tif", ".tiff")) if os.path.isdir(s) or any(c in str(s) for c in "*?[") \
                else [str(s)]
        self.skipped = SkipCounter()
        self.opts = TileOptions(bands=tuple(int(b) for b in bands), **options)
        good: list[str] = []
        first_nodata = None
        for f in files:
            try:
                info = raster_info(f, allowed_drivers=self.opts.allowed_drivers, max_pixels=max_pixels,
                                   require_georeferenced=True)
            except DataError as e:
                self.skipped.add(f, "unreadable", str(e))
                continue
            if info.count < max(self.opts.bands):
                self.skipped.add(f, "band_count", f"{info.count} band(s)")
                continue
            if not good:
                first_nodata = info.nodata
            good.append(os.path.abspath(f))
        if not good:
            raise DataError(f"no usable scene raster in {paths!r} (skipped: {self.skipped.as_dict()})")
        self.files = good
        self.size = int(size)
        self.nodata = first_nodata if nodata is None else nodata
        self.crs = CRS.from_user_input(crs) if crs is not None else None
        self.res = res
        self.seed = int(seed)
        self.epoch = 0
        self.max_tries = int(max_tries)
        self._transform = _TransformCaller(transform)
        self._pid: int | None = None
        self._ds = None
        ds = self._raster_dataset()
        from torchgeo.samplers import RandomGeoSampler

        sampler = RandomGeoSampler(ds, size=self.size)
        if not sampler.bounds:
            raise DataError(f"every scene is smaller than one {self.size}-px chip")
        # Sampling regions as plain data (picklable; the raster handles are re-opened in each worker).
        self._bounds = [tuple(b) for b in sampler.bounds]
        self._intervals = [(i.left, i.right) for i in sampler.intervals]
        self._areas = sampler.areas.clone()
        self._chip_size, self._res = tuple(sampler.size), tuple(sampler.res)
        names = {tuple(ds.index.geometry.iloc[h].bounds): os.path.basename(ds.index.filepath.iloc[h])
                 for h in range(len(ds.index))}
        self._scene_names = [names.get(b, "scene") for b in self._bounds]
        self.length = int(length) if length is not None else int(len(sampler))
        if self.length <= 0:
            raise DataError(f"the scenes are smaller than one {self.size}-px chip")

    def _raster_dataset(self):
        """torchgeo ``RasterDataset`` over the checked scene files, opened in this process."""
        from torchgeo.datasets import RasterDataset

        ds = RasterDataset(paths=self.files, crs=self.crs, res=self.res)
        self._ds, self._pid = ds, os.getpid()
        return ds

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_ds"], state["_pid"] = None, None  # never share raster handles across processes
        return state

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _query(self, g: torch.Generator) -> tuple[int, tuple[slice, slice, slice]]:
        from torchgeo.samplers.utils import get_random_bounding_box

        idx = int(torch.multinomial(self._areas, 1, generator=g).item())
        xs, ys = get_random_bounding_box(self._bounds[idx], self._chip_size, self._res, g)
        t0, t1 = self._intervals[idx]
        return idx, (xs, ys, slice(t0, t1))

    def __getitem__(self, index: int) -> tuple[Any, str]:
        if self._ds is None or self._pid != os.getpid():  # first use in this process: fresh handles
            self._raster_dataset()
        gidx = self.epoch * self.length + int(index)
        g = torch.Generator().manual_seed(derive_seed(self.seed, gidx, 0xC41F))
        for _ in range(self.max_tries):
            idx, query = self._query(g)
            sid = f"{self._scene_names[idx]}@{query[0].start:.3f},{query[1].stop:.3f}"
            arr = self._ds[query]["image"].numpy()
            arr = arr[[b - 1 for b in self.opts.bands], : self.size, : self.size]
            if arr.shape[-2:] != (self.size, self.size):
                self.skipped.add(sid, "edge", f"chip {arr.shape[-2:]}")
                continue
            if self.nodata is not None:
                valid = ~np.all(arr == self.nodata, axis=0)
            else:
                valid = np.ones(arr.shape[-2:], dtype=bool)
            try:
                img = _to_tensor(arr.astype(self._src_dtype()), valid, self.opts)
            except BadTile as e:
                self.skipped.add(sid, e.reason, e.detail)
                continue
            return self._transform(img, derive_seed(self.seed, gidx)), sid
        raise DataError(f"{self.max_tries} chips in a row failed screening (skipped: {self.skipped.as_dict()}); "
                        "the scenes may be mostly nodata/blank")

    def _src_dtype(self) -> str:
        if not hasattr(self, "_dtype"):
            self._dtype = raster_info(self.files[0], allowed_drivers=self.opts.allowed_drivers,
                                      max_pixels=None).dtype
        return self._dtype
