"""Embed a tile manifest into an :class:`~eo_dinov3.data.curation.store.EmbeddingStore`, resumably and in parallel.

Work is cut into *units* = blocks of the manifest (:class:`~eo_dinov3.data.manifest.ManifestReader`, ``block_rows``
rows of a Parquet row group, or ``csv_block_bytes`` of a CSV). Unit ``u`` covers manifest rows
``[offset[u], offset[u] + rows[u])`` (0-based row numbers in file order; ``offset`` from the Parquet footer, or by
counting CSV lines). Three ways to run it, all writing the same store:

* one process: :func:`embed_manifest` (``rank=0, world_size=1``);
* ``torchrun``: every rank calls :func:`embed_manifest` with its ``rank``/``world_size`` (units ``u % world == rank``);
  rank 0 then waits with :func:`wait_for_store` before clustering;
* ``dask.distributed``: :func:`embed_manifest_dask` maps the missing units over the cluster's workers (each worker
  builds the backbone once and keeps it).

Completed units are skipped, so a crashed or pre-empted run resumes where it stopped. Tiles that fail screening
(unreadable, nodata, constant; :func:`~eo_dinov3.data.tiles.load_tile`) are counted per unit, not embedded.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from eo_dinov3.data.curation.embedder import Embedder, EmbedderSpec, preprocess_tile
from eo_dinov3.data.curation.store import EmbeddingStore
from eo_dinov3.data.manifest import ManifestReader, resolve_tile_path
from eo_dinov3.data.tiles import BadTile, TileOptions, load_tile
from eo_dinov3.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedJob:
    """Everything a worker needs to embed units (picklable).

    Attributes:
        manifest: manifest path/URI.
        out_dir: store folder.
        spec: the backbone.
        block_rows, csv_block_bytes: unit size (see :class:`~eo_dinov3.data.manifest.ManifestReader`).
        batch_size: tiles per forward pass.
        num_workers: DataLoader workers reading tiles.
        dtype: storage dtype of the embeddings (``float16`` halves the disk size; cosine error ~1e-3).
        device: ``"cuda"``, ``"cpu"`` or ``"auto"``.
        max_nodata_fraction: tiles with more nodata are skipped.
    """

    manifest: str
    out_dir: str
    spec: EmbedderSpec
    block_rows: int = 4096
    csv_block_bytes: int = 1 << 20
    batch_size: int = 64
    num_workers: int = 0
    dtype: str = "float16"
    device: str = "auto"
    max_nodata_fraction: float = 0.5

    def reader(self) -> ManifestReader:
        return ManifestReader(self.manifest, block_rows=self.block_rows, csv_block_bytes=self.csv_block_bytes,
                              columns=None)

    def meta(self, reader: ManifestReader, dim: int) -> dict[str, Any]:
        return {"manifest": os.path.abspath(self.manifest) if "://" not in self.manifest else self.manifest,
                "spec": self.spec.as_dict(), "block_rows": self.block_rows, "csv_block_bytes": self.csv_block_bytes,
                "num_units": reader.num_blocks, "dim": dim, "dtype": self.dtype}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/``None`` → CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class _UnitTiles(Dataset):
    """Tiles of one unit: ``(image [C, S, S] float in [0, 1] | None, manifest_row, bad_reason)``."""

    def __init__(self, rows: list[dict[str, Any]], first_row: int, manifest: str, embedder_pre, opts: TileOptions):
        self.rows, self.first_row, self.manifest = rows, first_row, manifest
        self.pre, self.opts = embedder_pre, opts

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        path = resolve_tile_path(str(self.rows[i]["path"]), self.manifest)
        try:
            return self.pre(load_tile(path, self.opts)), self.first_row + i, ""
        except BadTile as e:
            return None, self.first_row + i, e.reason


def _collate(items):
    return items


def unit_offsets(reader: ManifestReader) -> np.ndarray:
    """First manifest row number of every unit, ``[U + 1]`` (last entry: total rows)."""
    counts = [reader.num_rows(b) for b in reader.blocks]
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def embed_unit(job: EmbedJob, embedder: Embedder, reader: ManifestReader, unit: int, first_row: int,
               store: EmbeddingStore) -> dict[str, Any]:
    """Embed unit ``unit`` (manifest rows from ``first_row``) and write it to ``store``; returns its info dict."""
    t0 = time.perf_counter()
    rows = reader.read_block(reader.blocks[unit])
    opts = TileOptions(bands=tuple(job.spec.bands), output_dtype="float32",
                       max_nodata_fraction=job.max_nodata_fraction, min_std=0.0)
    ds = _UnitTiles(rows, first_row, job.manifest, _Preprocess(job.spec), opts)
    loader = DataLoader(ds, batch_size=job.batch_size, num_workers=job.num_workers, collate_fn=_collate)
    embs, ids, skipped = [], [], Counter()
    for items in loader:
        good = [(x, r) for x, r, _ in items if x is not None]
        skipped.update(reason for x, _, reason in items if x is None)
        if good:
            embs.append(embedder(torch.stack([x for x, _ in good])))
            ids.extend(r for _, r in good)
    dim = embedder_dim(embedder)
    emb = np.concatenate(embs).astype(job.dtype) if embs else np.zeros((0, dim), job.dtype)
    info = {"rows": len(rows), "embedded": int(emb.shape[0]), "skipped": dict(skipped),
            "seconds": round(time.perf_counter() - t0, 3)}
    store.write_unit(unit, emb, np.asarray(ids, np.int64), info)
    return info


class _Preprocess:
    """Picklable resize-to-``image_size`` step (runs in DataLoader workers)."""

    def __init__(self, spec: EmbedderSpec) -> None:
        self.image_size = spec.image_size

    def __call__(self, tile: torch.Tensor) -> torch.Tensor:
        return preprocess_tile(tile, self.image_size)


def embedder_dim(embedder: Embedder) -> int:
    """Embedding width of ``embedder`` (one dummy forward pass, cached)."""
    d = getattr(embedder, "_dim", None)
    if d is None:
        s = embedder.spec.image_size
        d = int(embedder(torch.zeros(1, len(embedder.spec.bands), s, s) + 0.5).shape[1])
        embedder._dim = d  # type: ignore[attr-defined]
    return d


def embed_manifest(job: EmbedJob, *, rank: int = 0, world_size: int = 1, model: torch.nn.Module | None = None,
                   max_units: int | None = None) -> EmbeddingStore:
    """Embed the units of ``job.manifest`` that belong to ``rank`` (``u % world_size == rank``) and are missing.

    ``model`` replaces the backbone of ``job.spec`` (tests); ``max_units`` stops after that many units (tests of
    resuming). Returns the store (possibly still incomplete when other ranks are running).
    """
    reader = job.reader()
    store = EmbeddingStore(job.out_dir)
    if (store.root / "meta.json").exists():  # resuming: check the settings before building the backbone
        store.init(job.meta(reader, int(store.meta["dim"])))
    done = set(store.completed_units())
    todo = [u for u in range(reader.num_blocks) if u % world_size == rank and u not in done]
    if max_units is not None:
        todo = todo[:max_units]
    if not todo and (store.root / "meta.json").exists():
        return store
    offsets = unit_offsets(reader)
    embedder = Embedder(job.spec, resolve_device(job.device), model=model)
    store.init(job.meta(reader, embedder_dim(embedder)))
    log.info("embedding %d of %d unit(s) (rank %d/%d, %d already done)", len(todo), reader.num_blocks, rank,
             world_size, len(done))
    for u in todo:
        info = embed_unit(job, embedder, reader, u, int(offsets[u]), store)
        log.info("unit %d: %d tiles embedded, skipped %s, %.1f s", u, info["embedded"], info["skipped"],
                 info["seconds"])
    return store


def wait_for_store(store: EmbeddingStore, *, timeout_s: float = 24 * 3600, poll_s: float = 10.0) -> None:
    """Block until every unit of ``store`` is complete (rank 0 after a torchrun embed); DataError on timeout."""
    t0 = time.monotonic()
    while not store.is_complete():
        if time.monotonic() - t0 > timeout_s:
            n = len(store.completed_units())
            raise DataError(f"embedding store {store.root}: only {n}/{store.meta['num_units']} units after "
                            f"{timeout_s:.0f} s; check the other ranks, then rerun (finished units are kept)")
        time.sleep(poll_s)


# ------------------------------------------------------------------------------------------------ dask
_WORKER_CACHE: dict[str, tuple[Embedder, ManifestReader, np.ndarray]] = {}


def _dask_task(job: EmbedJob, unit: int) -> dict[str, Any]:
    """Runs on a dask worker: embed one unit with a per-process cached backbone."""
    _dask_dim(job)
    embedder, reader, offsets = _WORKER_CACHE[job.spec.key() + job.manifest]
    return embed_unit(job, embedder, reader, unit, int(offsets[unit]), EmbeddingStore(job.out_dir))


def _dask_dim(job: EmbedJob) -> int:
    key = job.spec.key() + job.manifest
    if key not in _WORKER_CACHE:
        reader = job.reader()
        _WORKER_CACHE[key] = (Embedder(job.spec, resolve_device(job.device)), reader, unit_offsets(reader))
    return embedder_dim(_WORKER_CACHE[key][0])


def embed_manifest_dask(job: EmbedJob, client) -> EmbeddingStore:
    """Embed every missing unit on a ``dask.distributed.Client``'s workers (all must see ``job.out_dir``)."""
    reader = job.reader()
    store = EmbeddingStore(job.out_dir)
    dim = client.submit(_dask_dim, job, pure=False).result()  # the backbone is only ever built on workers
    store.init(job.meta(reader, dim))
    done = set(store.completed_units())
    todo = [u for u in range(reader.num_blocks) if u not in done]
    log.info("dask: embedding %d of %d unit(s)", len(todo), reader.num_blocks)
    if todo:
        futures = client.map(_dask_task, [job] * len(todo), todo, pure=False)
        client.gather(futures)
    return store
