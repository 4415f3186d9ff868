"""Paired RGB image / canopy-height (lidar CHM) datasets for training heads on frozen features.

A *pair* is an RGB GeoTIFF and a CHM raster (metres) that may be on a different grid or CRS. :func:`load_pair`
reads the image (through :func:`eo_dinov3.data.raster_io.open_raster`: driver allow-list, no user VRT files) and
warps the CHM **onto the image grid** on the fly with an in-memory :class:`rasterio.vrt.WarpedVRT` (same CRS,
transform, width, height as the image; bilinear by default, nodata → NaN). Nothing is written to disk.

Spatial split (:func:`spatial_split`): the image columns are cut into a west (train) and east (validation) part
with a ``gap_px`` strip in between, so no chip of one split overlaps the other and the nearest pixels of the two
splits are ``gap_px`` apart (spatial autocorrelation would otherwise inflate validation scores).
:func:`blocked_split` is spatial block cross-validation (Roberts et al. 2017, *Ecography* 40:913): a checkerboard
of ``block_px`` blocks, one colour for validation (``fold`` 0 or 1 picks which), with ``gap_px`` between train and
validation blocks; both splits then sample the whole scene, so a scene whose halves differ (river on one side)
does not turn validation into an extrapolation test.

Chips (:class:`ChipSampler`): square ``chip`` px windows at random positions inside a region, rejected when less
than ``min_valid`` of their target pixels are valid; optional random dihedral transform (one of 4 rotations by 90°
× optional horizontal flip) applied **identically** to image and target. :func:`grid_chips` gives a deterministic
cover of a region (last row/column shifted flush with the edge) for validation.

Arrays: images ``uint8 [3, H, W]``; targets ``float32 [H, W]`` metres with NaN = nodata; image nodata pixels (all
bands equal to the nodata value, or masked) also become NaN in the target so they are never scored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eo_dinov3.errors import DataError


@dataclass
class PairedRaster:
    """An RGB image and its CHM on the same grid.

    Attributes:
        image: ``uint8 [3, H, W]`` RGB.
        target: ``float32 [H, W]`` canopy height in metres, NaN = nodata (CHM nodata or image nodata).
        crs_wkt / transform: the image grid (``transform`` is an :class:`affine.Affine`).
        name: a label (image file stem).
    """

    image: np.ndarray
    target: np.ndarray
    crs_wkt: str | None
    transform: object
    name: str

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.image.shape[1]), int(self.image.shape[2])


def load_pair(
    image_path: str | os.PathLike,
    target_path: str | os.PathLike,
    *,
    resampling: str = "bilinear",
    max_height_m: float = 120.0,
) -> PairedRaster:
    """Read an RGB GeoTIFF and warp its CHM onto the image grid.

    Args:
        image_path: RGB GeoTIFF, ``uint8`` (3+ bands; the first three are R, G, B).
        target_path: CHM raster in metres (any CRS/grid overlapping the image; nodata/NaN respected).
        resampling: rasterio resampling name for the CHM (``bilinear``, ``average``, ``nearest`` …).
        max_height_m: heights above this (towers, birds, noise) become nodata.

    Returns:
        :class:`PairedRaster` with ``target`` NaN wherever the CHM has no data or the image is nodata.
    """
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    from eo_dinov3.data.raster_io import open_raster

    with open_raster(image_path) as src:
        if src.count < 3:
            raise DataError(f"{image_path}: need an RGB image (>= 3 bands), got {src.count}")
        if src.dtypes[0] != "uint8":
            raise DataError(f"{image_path}: training expects uint8 RGB, got {src.dtypes[0]} (convert with gdal_translate -ot Byte -scale)")
        image = src.read([1, 2, 3])
        valid_img = src.dataset_mask() > 0
        crs, transform, width, height = src.crs, src.transform, src.width, src.height
    try:
        res = getattr(Resampling, resampling)
    except AttributeError:
        raise DataError(f"unknown resampling {resampling!r}") from None
    with open_raster(target_path) as tsrc:
        if crs is not None and tsrc.crs is None:
            raise DataError(f"{target_path}: the CHM has no CRS; cannot align it with {image_path}")
        vrt_kw = dict(resampling=res, src_nodata=tsrc.nodata, nodata=np.nan, dtype="float32")
        if crs is not None:
            vrt_kw.update(crs=crs, transform=transform, width=width, height=height)
        elif (tsrc.width, tsrc.height) != (width, height):
            raise DataError(f"{image_path} has no CRS and {target_path} a different size: cannot align them")
        if crs is None:
            target = tsrc.read(1, masked=True).astype("float32").filled(np.nan)
        else:
            with WarpedVRT(tsrc, **vrt_kw) as vrt:
                target = vrt.read(1, masked=True).astype("float32").filled(np.nan)
    target = np.where(np.isfinite(target) & (target >= 0) & (target <= max_height_m), target, np.nan)
    target[~valid_img] = np.nan
    if not np.isfinite(target).any():
        raise DataError(f"{target_path} does not overlap {image_path} (no valid height after alignment)")
    del rasterio
    return PairedRaster(image=np.ascontiguousarray(image), target=target.astype(np.float32),
                        crs_wkt=crs.to_wkt() if crs is not None else None, transform=transform,
                        name=Path(image_path).stem)


@dataclass(frozen=True)
class Region:
    """A column/row range ``[row0, row1) × [col0, col1)`` of a :class:`PairedRaster` (pixels)."""

    row0: int
    row1: int
    col0: int
    col1: int

    @property
    def height(self) -> int:
        return self.row1 - self.row0

    @property
    def width(self) -> int:
        return self.col1 - self.col0


def spatial_split(shape: tuple[int, int], val_fraction: float = 0.5, gap_px: int = 32,
                  axis: str = "x") -> tuple[Region, Region]:
    """West/east (``axis="x"``) or north/south (``"y"``) split of an ``(H, W)`` raster: ``(train, val)`` regions,
    the validation part being the last ``val_fraction`` of the axis and ``gap_px`` pixels left unused between."""
    h, w = shape
    n = w if axis == "x" else h
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = int(round(n * (1 - val_fraction)))
    a1, b0 = cut - gap_px // 2, cut + (gap_px - gap_px // 2)
    if a1 <= 0 or b0 >= n:
        raise DataError(f"raster of {n} px along {axis} too small for gap {gap_px}")
    if axis == "x":
        return Region(0, h, 0, a1), Region(0, h, b0, w)
    if axis == "y":
        return Region(0, a1, 0, w), Region(b0, h, 0, w)
    raise DataError(f"axis must be 'x' or 'y', got {axis!r}")


def blocked_split(shape: tuple[int, int], block_px: int = 128, gap_px: int = 32,
                  fold: int = 0) -> tuple[list[Region], list[Region]]:
    """Checkerboard spatial blocks of an ``(H, W)`` raster: ``(train_regions, val_regions)``.

    Each axis is cut into ``max(2, round(n / block_px))`` near-equal blocks; block ``(i, j)`` is validation when
    ``(i + j) % 2 == fold``. Every block gives up ``gap_px // 2`` (resp. ``gap_px - gap_px // 2``) pixels along each
    edge it shares with another block, so train and validation pixels are at least ``gap_px`` apart and no chip
    of one split overlaps the other.
    """
    if fold not in (0, 1):
        raise DataError(f"fold must be 0 or 1 for a checkerboard split, got {fold}")
    if block_px <= 0 or gap_px < 0:
        raise DataError(f"block_px must be > 0 and gap_px >= 0, got {block_px}, {gap_px}")

    def cuts(n: int) -> list[tuple[int, int]]:
        k = max(2, int(round(n / block_px)))
        e = np.linspace(0, n, k + 1).round().astype(int)
        lo, hi = gap_px // 2, gap_px - gap_px // 2
        out = [(int(a) + (lo if i > 0 else 0), int(b) - (hi if i < k - 1 else 0))
               for i, (a, b) in enumerate(zip(e[:-1], e[1:]))]
        if any(b - a <= 0 for a, b in out):
            raise DataError(f"{n} px split into {k} blocks of {block_px} px leaves nothing after the {gap_px} px gap")
        return out

    train: list[Region] = []
    val: list[Region] = []
    for i, (r0, r1) in enumerate(cuts(shape[0])):
        for j, (c0, c1) in enumerate(cuts(shape[1])):
            (val if (i + j) % 2 == fold else train).append(Region(r0, r1, c0, c1))
    return train, val


def bounding_region(regions: list[Region]) -> Region:
    """Smallest :class:`Region` containing all ``regions``."""
    return Region(min(r.row0 for r in regions), max(r.row1 for r in regions),
                  min(r.col0 for r in regions), max(r.col1 for r in regions))


def dihedral(arr: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """Rotate the last two axes by ``k`` × 90° (counter-clockwise) and optionally flip left-right afterwards."""
    out = np.rot90(arr, k, axes=(-2, -1))
    if flip:
        out = out[..., ::-1]
    return np.ascontiguousarray(out)


def grid_chips(region: Region, chip: int) -> list[tuple[int, int]]:
    """Top-left ``(row, col)`` of chips covering ``region`` (stride ``chip``; last row/column flush with the edge).
    The region must be at least ``chip`` px on both sides."""
    if region.height < chip or region.width < chip:
        raise DataError(f"region {region.height}x{region.width} px is smaller than the chip ({chip} px)")

    def starts(lo: int, n: int) -> list[int]:
        s = list(range(lo, lo + n - chip + 1, chip))
        if s[-1] + chip < lo + n:
            s.append(lo + n - chip)
        return s

    return [(r, c) for r in starts(region.row0, region.height) for c in starts(region.col0, region.width)]


@dataclass
class Chip:
    """One training/validation sample: ``image uint8 [3, c, c]``, ``target float32 [c, c]`` (NaN nodata), its
    position ``(row, col)`` in the pair and the dihedral transform applied ``(k, flip)``."""

    image: np.ndarray
    target: np.ndarray
    row: int
    col: int
    k: int = 0
    flip: bool = False


class ChipSampler:
    """Random chips of ``chip`` px from a region of a pair (rejection of chips with < ``min_valid`` valid target
    pixels; up to 50 tries per chip), with optional random dihedral augmentation. Deterministic for a seed."""

    def __init__(self, pair: PairedRaster, region: Region, chip: int, *, min_valid: float = 0.5,
                 augment: bool = True, seed: int = 0):
        if region.height < chip or region.width < chip:
            raise DataError(f"region {region.height}x{region.width} px is smaller than the chip ({chip} px)")
        self.pair, self.region, self.chip = pair, region, chip
        self.min_valid, self.augment = min_valid, augment
        self.rng = np.random.default_rng(seed)

    def crop(self, row: int, col: int, k: int = 0, flip: bool = False) -> Chip:
        c = self.chip
        img = self.pair.image[:, row : row + c, col : col + c]
        tgt = self.pair.target[row : row + c, col : col + c]
        if k or flip:
            img, tgt = dihedral(img, k, flip), dihedral(tgt, k, flip)
        return Chip(np.ascontiguousarray(img), np.ascontiguousarray(tgt), row, col, k, flip)

    def sample(self) -> Chip:
        r, c = self.region, self.chip
        for _ in range(50):
            row = int(self.rng.integers(r.row0, r.row1 - c + 1))
            col = int(self.rng.integers(r.col0, r.col1 - c + 1))
            if np.isfinite(self.pair.target[row : row + c, col : col + c]).mean() >= self.min_valid:
                break
        k, flip = (int(self.rng.integers(4)), bool(self.rng.integers(2))) if self.augment else (0, False)
        return self.crop(row, col, k, flip)

    def batch(self, n: int) -> list[Chip]:
        return [self.sample() for _ in range(n)]


def chips_to_tensors(chips: list[Chip], normalization: str = "chmv2"):
    """Stack chips into ``(x [B, 3, c, c] normalised float32, y [B, 1, c, c] metres with NaN)`` torch tensors."""
    import torch

    from eo_dinov3.data.normalization import get_normalization

    norm = get_normalization(normalization)
    mean, std = norm.tensors(device="cpu", dtype=torch.float32)
    x = torch.from_numpy(np.stack([ch.image for ch in chips])).float() / 255.0
    x = (x - mean) / std
    y = torch.from_numpy(np.stack([ch.target for ch in chips]))[:, None]
    return x, y


__all__ = [
    "PairedRaster",
    "Region",
    "Chip",
    "ChipSampler",
    "load_pair",
    "spatial_split",
    "blocked_split",
    "bounding_region",
    "grid_chips",
    "dihedral",
    "chips_to_tensors",
]
