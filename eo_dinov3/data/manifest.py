"""Tile manifests (Parquet or CSV) and deterministic, sharded streaming over their rows.

A manifest lists one tile per row. Required columns: ``path`` (relative to the manifest's folder, absolute, or a
GDAL URI), ``width``, ``height`` (pixels), ``crs`` (e.g. ``"EPSG:32610"``, empty when unknown) and ``gsd_m``
(ground sampling distance, metres). Optional columns used when present: ``id`` (sample id; default ``path``),
``count``, ``dtype``, ``nodata_fraction``, ``cloud_fraction``, ``sha256``, ``source``, ``col_off``, ``row_off``.

Scaling to 10^8 rows without a central listing
----------------------------------------------
The manifest is cut into *blocks* known from cheap metadata only:

* Parquet: the footer's row groups, each split into blocks of at most ``block_rows`` rows (row counts are in the
  footer, so positions can be skipped arithmetically);
* CSV: byte ranges of ``csv_block_bytes`` (a row belongs to the block where its line starts; the header is the
  first line; fields must not contain newlines). Row counts of a CSV block are found by counting its newlines,
  so resuming a CSV stream reads the bytes of the skipped blocks of that shard; prefer Parquet for big manifests.

For epoch ``e`` the blocks are permuted with a seed derived from ``(seed, e)``; shard ``s`` of ``S`` takes
``perm[s::S]`` and visits the rows of each block in a permutation seeded by ``(seed, e, block)``. A shard's stream
(its epochs concatenated) is therefore a pure function of ``(seed, s, S)`` and a position in it is an offset, which
is what a bit-exact resume needs (``reliability.md`` §2.3). Each shard reads only its own blocks.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eo_dinov3.data.raster_io import fsync_dir, is_uri
from eo_dinov3.errors import DataError

REQUIRED_COLUMNS: tuple[str, ...] = ("path", "width", "height", "crs", "gsd_m")


# --------------------------------------------------------------------------------------------------- seeds
def derive_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure, well-mixed function of integer ``keys`` (NumPy ``SeedSequence``).

    Used for every random stream of the data pipeline: ``derive_seed(seed, epoch)`` orders blocks,
    ``derive_seed(seed, epoch, block)`` orders rows, ``derive_seed(seed, sample_index)`` seeds one sample's
    augmentation. Different key tuples give independent streams.
    """
    ints = [int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]
    state = np.random.SeedSequence(ints).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF


def permutation(n: int, *keys: int) -> np.ndarray:
    """Permutation of ``range(n)`` seeded by ``derive_seed(*keys)`` (int64 array)."""
    return np.random.Generator(np.random.PCG64(derive_seed(*keys))).permutation(n)


# --------------------------------------------------------------------------------------------------- I/O
def _open_binary(path: str | os.PathLike):
    spath = str(path)
    if is_uri(spath) and not spath.startswith("/vsi"):
        from pyarrow import fs as pafs

        filesystem, inner = pafs.FileSystem.from_uri(spath)
        return filesystem.open_input_file(inner)
    return open(spath, "rb")


def _fmt(path: str | os.PathLike) -> str:
    s = str(path).lower()
    if s.endswith((".parquet", ".pq")):
        return "parquet"
    if s.endswith((".csv", ".csv.txt")):
        return "csv"
    raise DataError(f"manifest {str(path)!r}: unknown format; use a .parquet or .csv file")


def check_columns(columns: Sequence[str], path: str | os.PathLike) -> None:
    """Raise :class:`DataError` if a required column is missing."""
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DataError(f"manifest {str(path)!r} lacks column(s) {missing}; required: {list(REQUIRED_COLUMNS)}")


def read_manifest(path: str | os.PathLike):
    """Whole manifest as a ``pandas.DataFrame`` (for small/medium manifests and tools; streaming readers use
    :class:`ManifestReader`)."""
    import pandas as pd

    if not is_uri(path) and not os.path.exists(path):
        raise DataError(f"manifest {str(path)!r} does not exist")
    try:
        if _fmt(path) == "parquet":
            import pyarrow.parquet as pq

            with _open_binary(path) as f:
                df = pq.read_table(f).to_pandas()
        else:
            df = pd.read_csv(path, keep_default_na=False, na_values={"gsd_m": [""], "nodata_fraction": [""]})
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow/pandas raise many types
        raise DataError(f"manifest {str(path)!r} cannot be read: {str(e).splitlines()[0]}") from e
    check_columns(list(df.columns), path)
    return df


def write_manifest(df, path: str | os.PathLike, *, row_group_size: int = 65_536) -> Path:
    """Write a manifest ``DataFrame`` atomically (temp file → fsync → rename) as Parquet or CSV by suffix.

    ``row_group_size`` (Parquet) bounds the unit a streaming worker reads; 64 Ki rows of short strings is ~2 MB.
    """
    path = Path(path)
    check_columns(list(df.columns), path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if _fmt(path) == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp, row_group_size=row_group_size)
        else:
            if any("\n" in str(p) for p in df["path"]):
                raise DataError("a tile path contains a newline; CSV manifests cannot hold it, use Parquet")
            df.to_csv(tmp, index=False, lineterminator="\n")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    return path


def resolve_tile_path(tile_path: str, manifest_path: str | os.PathLike) -> str:
    """Tile path as stored in a manifest → openable path/URI (relative paths are relative to the manifest)."""
    if is_uri(tile_path) or os.path.isabs(tile_path):
        return tile_path
    base = str(manifest_path)
    if is_uri(base):
        return base.rsplit("/", 1)[0] + "/" + tile_path
    return str(Path(base).resolve().parent / tile_path)


# --------------------------------------------------------------------------------------------------- blocks
@dataclass(frozen=True)
class Block:
    """A contiguous range of manifest rows read as one unit.

    Parquet: rows ``[start, stop)`` of row group ``group``. CSV: lines starting at byte offsets in
    ``[start, stop)`` (``group`` = -1).
    """

    index: int
    group: int
    start: int
    stop: int


class ManifestReader:
    """Reads manifest blocks on demand (no full listing). Picklable; open it anew in each worker.

    Args:
        path: ``.parquet`` or ``.csv`` manifest (local path or URI understood by ``pyarrow.fs``).
        block_rows: Parquet only: split row groups into blocks of at most this many rows.
        csv_block_bytes: CSV only: size of a block in bytes.
        columns: columns to read (default all).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        block_rows: int = 4096,
        csv_block_bytes: int = 1 << 20,
        columns: Sequence[str] | None = None,
    ) -> None:
        self.path = str(path)
        self.format = _fmt(path)
        self.block_rows = int(block_rows)
        self.csv_block_bytes = int(csv_block_bytes)
        self.columns = list(columns) if columns is not None else None
        self._csv_counts: dict[int, int] = {}
        self._cache: tuple[int, Any] | None = None
        if not is_uri(self.path) and not os.path.exists(self.path):
            raise DataError(f"manifest {self.path!r} does not exist")
        try:
            if self.format == "parquet":
                self.blocks, self.header = self._parquet_blocks()
            else:
                self.blocks, self.header = self._csv_blocks()
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001
            raise DataError(f"manifest {self.path!r} cannot be read: {str(e).splitlines()[0]}") from e
        check_columns(self.header, self.path)

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_cache"] = None
        return d

    # ----------------------------------------------------------------------------------------- parquet
    def _parquet_file(self):
        import pyarrow.parquet as pq

        return pq.ParquetFile(_open_binary(self.path))

    def _parquet_blocks(self) -> tuple[list[Block], list[str]]:
        pf = self._parquet_file()
        md = pf.metadata
        blocks: list[Block] = []
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            for s in range(0, n, self.block_rows):
                blocks.append(Block(len(blocks), g, s, min(n, s + self.block_rows)))
        return blocks, list(pf.schema_arrow.names)

    # ----------------------------------------------------------------------------------------- csv
    def _csv_blocks(self) -> tuple[list[Block], list[str]]:
        with _open_binary(self.path) as f:
            first = f.readline()
            size = f.seek(0, io.SEEK_END)
        header = next(csv.reader([first.decode("utf-8-sig").rstrip("\r\n")]))
        data_start = len(first)
        blocks = [
            Block(i, -1, s, min(size, s + self.csv_block_bytes))
            for i, s in enumerate(range(data_start, size, self.csv_block_bytes))
        ]
        self._csv_data_start = data_start
        return blocks, header

    def _csv_block_bytes(self, block: Block) -> bytes:
        """The bytes of all lines that start inside ``[block.start, block.stop)``."""
        with _open_binary(self.path) as f:
            start = block.start
            if start > self._csv_data_start:
                f.seek(start - 1)
                if f.read(1) != b"\n":  # inside a line: that line belongs to the previous block
                    f.readline()
                start = f.tell()
            else:
                f.seek(start)
            if start >= block.stop:
                return b""
            data = f.read(block.stop - start)
            if data and not data.endswith(b"\n"):
                data += f.readline()
        return data

    # ----------------------------------------------------------------------------------------- public
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def num_rows(self, block: Block) -> int:
        """Number of rows in ``block`` (CSV: counts its newlines once, then cached)."""
        if self.format == "parquet":
            return block.stop - block.start
        n = self._csv_counts.get(block.index)
        if n is None:
            data = self._csv_block_bytes(block)
            n = sum(1 for line in data.split(b"\n") if line.strip())
            self._csv_counts[block.index] = n
        return n

    def read_block(self, block: Block) -> list[dict[str, Any]]:
        """Rows of ``block`` as dicts, in file order."""
        if self.format == "parquet":
            if self._cache is None or self._cache[0] != block.group:
                table = self._parquet_file().read_row_group(block.group, columns=self.columns)
                self._cache = (block.group, table)
            table = self._cache[1]
            return table.slice(block.start, block.stop - block.start).to_pylist()
        text = self._csv_block_bytes(block).decode("utf-8")
        rows = []
        for rec in csv.reader(text.splitlines()):
            if not rec:
                continue
            row: dict[str, Any] = dict(zip(self.header, rec))
            for k in ("width", "height", "col_off", "row_off", "count"):
                if row.get(k, "") != "" and k in row:
                    row[k] = int(float(row[k]))
            for k in ("gsd_m", "nodata_fraction", "cloud_fraction"):
                if k in row:
                    row[k] = float(row[k]) if row[k] != "" else float("nan")
            if self.columns is not None:
                row = {k: row[k] for k in self.columns if k in row}
            rows.append(row)
        self._csv_counts[block.index] = len(rows)
        return rows

    def with_min_blocks(self, min_blocks: int) -> "ManifestReader":
        """This reader, or a copy with smaller blocks so that there are at least ``min_blocks`` blocks (small
        manifests read by many shards). A pure function of the manifest and ``min_blocks``."""
        if self.num_blocks >= min_blocks:
            return self
        if self.format == "parquet":
            biggest = max(b.stop - b.start for b in self.blocks)
            rows = max(1, min(self.block_rows, self.total_rows() // min_blocks, biggest))
            return ManifestReader(self.path, block_rows=rows, csv_block_bytes=self.csv_block_bytes,
                                  columns=self.columns)
        size = self.blocks[-1].stop if self.blocks else 0
        nbytes = max(1, (size - self._csv_data_start) // min_blocks)
        return ManifestReader(self.path, block_rows=self.block_rows, csv_block_bytes=nbytes, columns=self.columns)

    def total_rows(self) -> int:
        """Total number of rows (Parquet: from the footer; CSV: reads the whole file)."""
        return sum(self.num_rows(b) for b in self.blocks)


# --------------------------------------------------------------------------------------------------- streams
def shard_blocks(num_blocks: int, *, seed: int, epoch: int, shard: int, num_shards: int,
                 shuffle: bool = True) -> np.ndarray:
    """Block indices visited by ``shard`` (of ``num_shards``) in ``epoch``: ``permutation(num_blocks, seed,
    epoch)[shard::num_shards]`` (file order without ``shuffle``). Over all shards every block appears exactly once
    per epoch."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} out of range for {num_shards} shards")
    order = permutation(num_blocks, seed, epoch) if shuffle else np.arange(num_blocks)
    return order[shard::num_shards]


def row_order(num_rows: int, *, seed: int, epoch: int, block: int, shuffle: bool = True) -> np.ndarray:
    """Order in which the rows of ``block`` are visited in ``epoch``."""
    if not shuffle:
        return np.arange(num_rows)
    return permutation(num_rows, seed, epoch, block, 0x5EED)


@dataclass(frozen=True)
class StreamItem:
    """One row of a shard stream: ``position`` is its 0-based offset in the shard's stream."""

    position: int
    epoch: int
    block: int
    row: dict[str, Any]


def shard_stream(
    reader: ManifestReader,
    *,
    seed: int,
    shard: int,
    num_shards: int,
    start_position: int = 0,
    epoch: int = 0,
    infinite: bool = True,
    shuffle: bool = True,
) -> Iterator[StreamItem]:
    """Rows of one shard, epoch after epoch (or one ``epoch`` when ``infinite=False``), from ``start_position``.

    Skipping to ``start_position`` costs only block row counts (Parquet footer) — no row is parsed before it.
    """
    if reader.num_blocks < num_shards:
        raise DataError(
            f"manifest {reader.path!r} has {reader.num_blocks} block(s) but {num_shards} shards (ranks x workers) "
            "read it; lower block_rows/csv_block_bytes or use fewer workers"
        )
    pos = 0
    skip = int(start_position)
    e = epoch
    empty_epochs = 0
    while True:
        rows_this_epoch = 0
        for b in shard_blocks(reader.num_blocks, seed=seed, epoch=e, shard=shard, num_shards=num_shards,
                              shuffle=shuffle):
            block = reader.blocks[int(b)]
            n = reader.num_rows(block)
            rows_this_epoch += n
            if skip >= n:
                skip -= n
                pos += n
                continue
            rows = reader.read_block(block)
            order = row_order(len(rows), seed=seed, epoch=e, block=block.index, shuffle=shuffle)
            for k in range(skip, len(order)):
                yield StreamItem(pos + k, e, block.index, rows[int(order[k])])
            pos += len(order)
            skip = 0
        if not infinite:
            return
        empty_epochs = empty_epochs + 1 if rows_this_epoch == 0 else 0
        if empty_epochs > 1000:
            raise DataError(f"shard {shard} of {num_shards} received no manifest row in 1000 epochs; the manifest "
                            f"{reader.path!r} has too few rows for {num_shards} shards (ranks x workers)")
        e += 1
