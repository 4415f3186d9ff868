"""Sharded on-disk embedding store: memory-mapped ``.npy`` shards + manifest row ids.

Layout of a store folder::

    meta.json                 {"dim": D, "dtype": "float16", "num_units": U, "spec": {...}, ...}
    unit-000017.emb.npy       [n, D] L2-normalised embeddings of the good tiles of work unit 17
    unit-000017.ids.npy       [n] int64 manifest row numbers (0-based, file order) of those tiles
    unit-000017.json          {"rows": rows in the unit, "embedded": n, "skipped": {reason: count}} — written last

A *unit* is one block of the manifest (:class:`~eo_dinov3.data.manifest.ManifestReader`); it is complete when its
``.json`` exists (arrays are written atomically before it), so an interrupted run resumes by redoing only the
missing units, whichever rank or dask worker wrote the others. The store is read shard by shard through
``np.load(mmap_mode="r")``: memory stays bounded by one chunk whatever the archive size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from eo_dinov3.errors import DataError


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class EmbeddingStore:
    """A folder of embedding shards (see the module docstring).

    Args:
        root: the store folder.

    Rows are ordered by unit, then by position in the unit; a row's *position* (0 … ``num_rows``-1) is what the
    clustering and sampling code indexes; :meth:`ids` maps positions to manifest row numbers.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self._shards: list[tuple[int, np.ndarray, np.ndarray]] | None = None

    # ------------------------------------------------------------------------------------------ writing
    def init(self, meta: dict[str, Any]) -> None:
        """Create the folder and ``meta.json``; an existing store must have the same ``meta`` (else resuming would
        mix embeddings of different backbones/manifests)."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "meta.json"
        if path.exists():
            old = json.loads(path.read_text())
            if old != json.loads(json.dumps(meta)):
                diff = sorted(k for k in set(old) | set(meta) if old.get(k) != json.loads(json.dumps(meta)).get(k))
                raise DataError(f"embedding store {self.root} was made with other settings ({diff} differ); "
                                "use a new output_dir or delete the store")
            return
        _atomic_text(path, json.dumps(meta, indent=1, sort_keys=True))

    def write_unit(self, unit: int, embeddings: np.ndarray, ids: np.ndarray, info: dict[str, Any]) -> None:
        """Write unit ``unit``: ``embeddings [n, D]``, ``ids [n]`` int64, then its completion marker."""
        if embeddings.shape[0] != ids.shape[0]:
            raise ValueError("embeddings and ids differ in length")
        _atomic_save(self.root / f"unit-{unit:06d}.emb.npy", embeddings)
        _atomic_save(self.root / f"unit-{unit:06d}.ids.npy", ids.astype(np.int64))
        _atomic_text(self.root / f"unit-{unit:06d}.json", json.dumps(info, sort_keys=True))
        self._shards = None

    # ------------------------------------------------------------------------------------------ reading
    @property
    def meta(self) -> dict[str, Any]:
        path = self.root / "meta.json"
        if not path.exists():
            raise DataError(f"{self.root} is not an embedding store (no meta.json); run the embed step first")
        return json.loads(path.read_text())

    def completed_units(self) -> list[int]:
        """Indices of the units whose completion marker exists (sorted)."""
        if not self.root.is_dir():
            return []
        return sorted(int(p.name[5:11]) for p in self.root.glob("unit-*.json"))

    def unit_info(self, unit: int) -> dict[str, Any]:
        return json.loads((self.root / f"unit-{unit:06d}.json").read_text())

    def is_complete(self) -> bool:
        return len(self.completed_units()) == int(self.meta["num_units"])

    def _load(self) -> list[tuple[int, np.ndarray, np.ndarray]]:
        if self._shards is None:
            shards = []
            for u in self.completed_units():
                emb = np.load(self.root / f"unit-{u:06d}.emb.npy", mmap_mode="r")
                ids = np.load(self.root / f"unit-{u:06d}.ids.npy", mmap_mode="r")
                if emb.shape[0]:
                    shards.append((u, emb, ids))
            self._shards = shards
        return self._shards

    @property
    def num_rows(self) -> int:
        return sum(s[1].shape[0] for s in self._load())

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    def ids(self) -> np.ndarray:
        """Manifest row number of every position, ``[N]`` int64."""
        parts = [np.asarray(s[2]) for s in self._load()]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def iter_chunks(self, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(start_position, rows [n ≤ chunk_rows, D] float32)`` over the whole store, in position order."""
        start = 0
        for _, emb, _ in self._load():
            for s in range(0, emb.shape[0], chunk_rows):
                block = np.array(emb[s:s + chunk_rows], dtype=np.float32)  # a writable copy
                yield start + s, block
            start += emb.shape[0]

    def take(self, positions: np.ndarray) -> np.ndarray:
        """Rows at ``positions`` (any order) as ``[len(positions), D]`` float32."""
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty((len(positions), self.dim), np.float32)
        if not len(positions):
            return out
        order = np.argsort(positions, kind="stable")
        sorted_pos = positions[order]
        start = 0
        for _, emb, _ in self._load():
            n = emb.shape[0]
            lo, hi = np.searchsorted(sorted_pos, [start, start + n])
            if hi > lo:
                out[order[lo:hi]] = emb[sorted_pos[lo:hi] - start]
            start += n
        if start <= sorted_pos[-1]:
            raise IndexError(f"position {int(sorted_pos[-1])} out of range for {start} rows")
        return out

    def row(self, position: int) -> np.ndarray:
        return self.take(np.array([position]))[0]


class ArrayRows:
    """An in-memory ``[N, D]`` array (numpy or torch) with the read interface of :class:`EmbeddingStore`
    (``num_rows``, ``dim``, ``iter_chunks``, ``take``, ``row``): lets k-means, retrieval and de-duplication run on
    centroids or test data through the same code path as on a store."""

    def __init__(self, data) -> None:
        import torch

        self.data = data.detach().cpu().float().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
        if self.data.ndim != 2:
            raise ValueError(f"expected [N, D] rows, got shape {self.data.shape}")

    @property
    def num_rows(self) -> int:
        return int(self.data.shape[0])

    @property
    def dim(self) -> int:
        return int(self.data.shape[1])

    def iter_chunks(self, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        for s in range(0, self.num_rows, chunk_rows):
            yield s, np.asarray(self.data[s:s + chunk_rows], dtype=np.float32)

    def take(self, positions: np.ndarray) -> np.ndarray:
        return np.asarray(self.data[np.asarray(positions, dtype=np.int64)], dtype=np.float32)

    def row(self, position: int) -> np.ndarray:
        return np.asarray(self.data[int(position)], dtype=np.float32)


def as_rows(data) -> "EmbeddingStore | ArrayRows":
    """``data`` if it already reads like a store, else :class:`ArrayRows` around it."""
    return data if hasattr(data, "iter_chunks") else ArrayRows(data)
