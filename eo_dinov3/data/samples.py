"""Real sub-metre sample data for examples, tests and the pretraining demo.

Two public PyPI distributions ship small real Earth-observation data sets:

* the ``deepforest==1.5.2`` wheel: NEON AOP 10 cm RGB forest images (Yellowstone YELL, Ordway-Swisher OSBS,
  San Joaquin SJER) with hand-drawn tree-crown boxes;
* the ``laspy==2.7.0`` sdist: ``autzen_trim.laz``, a colourised airborne lidar cloud (Autzen stadium, Eugene, OR)
  in NAD83(HARN) / Oregon GIC Lambert, **international feet** (EPSG:2994).

:func:`fetch_samples` downloads both with ``pip download`` (no import of either package's data), checks the
SHA-256 of the archives and of every extracted file against the constants below, and derives georeferenced,
tiled + deflate-compressed GeoTIFFs (native GSD and ~0.6 m, SAT-493M-like), tree-crown boxes (pixel CSV and
GeoJSON in the image CRS), an RGB raster of the lidar point colours, and a folder of 256 px pretraining tiles.
Every derived file is written atomically (temporary name + rename) and recorded with its SHA-256 in
``samples.json``; a second call only re-hashes the derived files (well under a second) and rebuilds whatever is
missing or corrupt. Provenance is written into every GeoTIFF's tags (``SOURCE_PACKAGE``, ``SOURCE_FILE``,
``LICENSE``, ``GSD_M``, ``PLACEMENT`` where the placement is approximate, ``EO_DINOV3_VERSION``).

Command line: ``eo-dinov3 samples fetch|list|path KEY`` (or ``python -m eo_dinov3.data.samples`` = fetch).
Sources, derivations and licences are documented in ``SAMPLES.md`` at the repository root.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import warnings
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from eo_dinov3 import __version__
from eo_dinov3.errors import DataError

if TYPE_CHECKING:  # heavy imports stay lazy so that ``eo-dinov3 --help`` is fast
    import numpy as np
    from affine import Affine
    from rasterio.crs import CRS

__all__ = [
    "ENV_VAR",
    "check_samples",
    "fetch_samples",
    "list_samples",
    "main",
    "register",
    "sample_path",
    "samples_root",
    "verify_checksum",
]

ENV_VAR = "EO_DINOV3_DATA"
"""Environment variable that overrides the samples folder."""

RECIPE_VERSION = 1
"""Bump when a derivation changes: every derived file is then rebuilt on the next fetch."""

INDEX_NAME = "samples.json"
TARGET_GSD_M = 0.6
"""SAT-493M-like ground sample distance of the ``*_0p6m`` rasters, metres per pixel."""
TILE_GSD_M = 0.15
"""GSD of the pretraining tiles, metres per pixel (the sample scenes are small: 0.15 m gives > 24 tiles)."""
TILE_SIZE_PX = 256
"""Side of a square pretraining tile, pixels."""
MIN_TILES = 24
FOOT_M = 0.3048
"""International foot in metres (the unit of EPSG:2994)."""

_HASH_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------------------------
# Sources: the two distributions and the files used from them (checksums computed once and pinned here)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Distribution:
    """One PyPI distribution file fetched with ``pip download``."""

    name: str
    version: str
    filename: str
    sha256: str
    sdist: bool
    licence: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def label(self) -> str:
        kind = "sdist" if self.sdist else "wheel"
        return f"{self.requirement} (PyPI {kind} {self.filename})"


@dataclass(frozen=True)
class _Member:
    """One file inside a distribution archive, extracted to ``raw/<distribution>/<basename>``."""

    dist: _Distribution
    path: str
    sha256: str

    def raw_path(self, root: Path) -> Path:
        return root / "raw" / self.dist.name / PurePosixPath(self.path).name


DEEPFOREST = _Distribution(
    name="deepforest",
    version="1.5.2",
    filename="deepforest-1.5.2-py3-none-any.whl",
    sha256="705f08a80f33514044010865f61eefe5037d5492055c47574d213db74bebdf25",
    sdist=False,
    licence="MIT",
)
DJANGO_LEAFLET = _Distribution(
    name="django-leaflet",
    version="0.34.0",
    filename="django_leaflet-0.34.0-py3-none-any.whl",
    sha256="367f74c63709c1b466b740e0e7bd50cdc0d76f08cab2d6566af1559818d79cc2",
    sdist=False,
    licence="LGPL-3.0 (django-leaflet); Leaflet BSD-2-Clause; Leaflet.draw MIT",
)
LASPY = _Distribution(
    name="laspy",
    version="2.7.0",
    filename="laspy-2.7.0.tar.gz",
    sha256="f56feb5445e75d6ff12ee814aab6a35339290e75264ff277c6bf553f3025a3f5",
    sdist=True,
    licence="BSD-2-Clause",
)

_DF = "deepforest/data/"
YELL_PNG = _Member(DEEPFOREST, _DF + "2019_YELL_2_528000_4978000_image_crop2.png",
                   "a9bdb0f4447fdd899d22f567e0e20ba8320c5413b2ad0cd0ac8d9f3b6e0f9767")
YELL_XML = _Member(DEEPFOREST, _DF + "2019_YELL_2_528000_4978000_image_crop2.xml",
                   "bd431af6a5086d721eb731b22f5ea28cd8a8eab06883efc1c665391acbc68e11")
YELL2_PNG = _Member(DEEPFOREST, _DF + "2019_YELL_2_541000_4977000_image_crop.png",
                    "178e58a23cc2642226a364a30f71bd9258ddc1b012c826f12250914a90c7a131")
YELL2_XML = _Member(DEEPFOREST, _DF + "2019_YELL_2_541000_4977000_image_crop.xml",
                    "cefe4b96888bacbf8af1674f000082e549aa707aa6590d545effb23e43f26631")
OSBS_TIF = _Member(DEEPFOREST, _DF + "OSBS_029.tif",
                   "8521dbb5e8063d37d61895867dfcca7476491d1345103dc1b3fd96f71b186353")
OSBS_XML = _Member(DEEPFOREST, _DF + "OSBS_029.xml",
                   "1f68c4011d7b351c29ca755072e77f3d16e6fd1f995bd05a9dd4eb952b55373c")
SJER_TIF = _Member(DEEPFOREST, _DF + "2018_SJER_3_252000_4107000_image_477.tif",
                   "a8de02fd781091c699f251d7d820fbc7faab44b0fd3d75b6dd73fa7bacb8c705")
SJER_CSV = _Member(DEEPFOREST, _DF + "2018_SJER_3_252000_4107000_image_477_truth.csv",
                   "5b8fc3566c50f59ce8c18c95ed3f3b4a6a45ef60dc9172562bdb2ab5287a7651")
DEEPFOREST_LICENSE = _Member(DEEPFOREST, "deepforest-1.5.2.dist-info/LICENSE",
                             "3730cf2855aea0fdab22b331ecac8b9baeb3cc70d2ebaa190ae39dadcded2ba8")
AUTZEN_LAZ = _Member(LASPY, "laspy-2.7.0/tests/data/autzen_trim.laz",
                     "75867b3e75cfc3c2e96da9f753c04c9fbaa6a59468dea13e2859f3109b38bd66")
LASPY_LICENSE = _Member(LASPY, "laspy-2.7.0/LICENSE.txt",
                        "586e5e4d12f36050240d2702abcd3319593f13841440920244f95f15cb83eb63")

# Leaflet 1.9.3 and Leaflet.draw 1.0.4 as shipped in the django-leaflet wheel: the Streamlit app inlines them so its
# map draws with no internet (folium/streamlit-folium would load them from a CDN).
_LF = "leaflet/static/leaflet/"
LEAFLET_MEMBERS = {
    "leaflet/leaflet.js": _Member(DJANGO_LEAFLET, _LF + "leaflet.js",
                                  "5819285cec137b229c94e1ee5ad73e8b6b84345a4367d60f75fe477fe0fb7b03"),
    "leaflet/leaflet.css": _Member(DJANGO_LEAFLET, _LF + "leaflet.css",
                                   "90b693d86392a4779c861b28cf307e7e59c3fb35328c4d8b95f58f814d38c722"),
    "leaflet/images/layers-2x.png": _Member(DJANGO_LEAFLET, _LF + "images/layers-2x.png",
                                            "066daca850d8ffbef007af00b06eac0015728dee279c51f3cb6c716df7c42edf"),
    "leaflet/images/layers.png": _Member(DJANGO_LEAFLET, _LF + "images/layers.png",
                                         "1dbbe9d028e292f36fcba8f8b3a28d5e8932754fc2215b9ac69e4cdecf5107c6"),
    "leaflet/images/marker-icon-2x.png": _Member(DJANGO_LEAFLET, _LF + "images/marker-icon-2x.png",
                                                 "00179c4c1ee830d3a108412ae0d294f55776cfeb085c60129a39aa6fc4ae2528"),
    "leaflet/images/marker-icon.png": _Member(DJANGO_LEAFLET, _LF + "images/marker-icon.png",
                                              "574c3a5cca85f4114085b6841596d62f00d7c892c7b03f28cbfa301deb1dc437"),
    "leaflet/images/marker-shadow.png": _Member(DJANGO_LEAFLET, _LF + "images/marker-shadow.png",
                                                "264f5c640339f042dd729062cfc04c17f8ea0f29882b538e3848ed8f10edb4da"),
    "leaflet-draw/leaflet.draw.js": _Member(DJANGO_LEAFLET, _LF + "draw/leaflet.draw.js",
                                            "b22a1f7385308e5adadd85a4c2d84e9fc523ebd70d37868cba0fe2387362460b"),
    "leaflet-draw/leaflet.draw.css": _Member(DJANGO_LEAFLET, _LF + "draw/leaflet.draw.css",
                                             "5f30f74696873efee5cd7f6ab7eda7d63e5c5a3e3c3b6e0ab2068662928df31f"),
    "leaflet-draw/images/spritesheet-2x.png": _Member(DJANGO_LEAFLET, _LF + "draw/images/spritesheet-2x.png",
                                                      "fa2c95e0610f3787c879645e42b86ad010c305f8312e116841730d00d4ab72b7"),
    "leaflet-draw/images/spritesheet.png": _Member(DJANGO_LEAFLET, _LF + "draw/images/spritesheet.png",
                                                   "a8978a1d3d21d8ee6f16cce342ff67fc47c4241f52161f05baf88f15e1058199"),
    "leaflet-draw/images/spritesheet.svg": _Member(DJANGO_LEAFLET, _LF + "draw/images/spritesheet.svg",
                                                   "7077bae968047180921324df351d95fe2f021cdaefa01e20645162402f767da4"),
}
DJANGO_LEAFLET_LICENSE = _Member(DJANGO_LEAFLET, "django_leaflet-0.34.0.dist-info/licenses/LICENSE",
                                 "da7eabb7bafdf7d3ae5e9f223aa5bdc1eece45ac569dc21b3b037520b4464768")
#: folder (under the samples root) holding the app's offline map assets, laid out as ``leaflet/``, ``leaflet-draw/``
APP_STATIC_DIR = "app_static"

NEON_LICENCE = (
    "NEON AOP data: CC0-1.0 per the NEON data usage policy (not stated inside the wheel; NEON announced a move "
    "to CC-BY-4.0 in 2026, so attribute NEON); redistributed in deepforest 1.5.2 (MIT)"
)
AUTZEN_LICENCE = (
    "not verified: no data licence is stated; redistributed as test data in laspy 2.7.0 (BSD-2-Clause); "
    "Autzen sample from the libLAS/PDAL sample data (Watershed Sciences, Inc., 2010)"
)
AUTZEN_EPSG = 2994
"""NAD83(HARN) / Oregon GIC Lambert (ft): equal (up to axis order) to the WKT in the cloud's header."""


@dataclass(frozen=True)
class _Scene:
    """A NEON RGB image of the deepforest wheel with its tree-crown boxes.

    ``origin`` is the map position (easting, northing in metres) of the upper-left corner for images without
    georeferencing (PNG); ``None`` means the source GeoTIFF's own georeferencing is used.
    """

    key: str
    title: str
    image: _Member
    boxes: _Member
    epsg: int
    native_gsd_m: float = 0.1
    origin: tuple[float, float] | None = None
    placement: str | None = None
    note: str | None = None


def _neon_tile_placement(tile: str, easting: int, northing: int, epsg: int) -> str:
    return (
        f"approximate: NEON AOP 1 km tile {tile} (EPSG:{epsg}, lower-left corner E{easting} N{northing}); the "
        f"crop's position inside the tile is unknown, its upper-left corner is placed at the tile's upper-left "
        f"corner (E{easting}, N{northing + 1000}) with 0.1 m pixels"
    )


_NODATA_NOTE = "the source declares nodata=255, but these are real bright pixels: the derived file has no nodata"

SCENES: tuple[_Scene, ...] = (
    _Scene("yell", "NEON YELL (Yellowstone) 2019, crop2 of tile 528000_4978000", YELL_PNG, YELL_XML, 32612,
           origin=(528000.0, 4979000.0),
           placement=_neon_tile_placement("2019_YELL_2_528000_4978000", 528000, 4978000, 32612)),
    _Scene("yell2", "NEON YELL (Yellowstone) 2019, crop of tile 541000_4977000", YELL2_PNG, YELL2_XML, 32612,
           origin=(541000.0, 4978000.0),
           placement=_neon_tile_placement("2019_YELL_2_541000_4977000", 541000, 4977000, 32612)),
    _Scene("osbs", "NEON OSBS (Ordway-Swisher, FL) plot 029", OSBS_TIF, OSBS_XML, 32617, note=_NODATA_NOTE),
    _Scene("sjer", "NEON SJER (San Joaquin, CA) 2018, image 477 of tile 252000_4107000", SJER_TIF, SJER_CSV,
           32611, note=_NODATA_NOTE),
)


# --------------------------------------------------------------------------------------------------------------
# Small utilities: checksums, atomic writes, locking, archive extraction
# --------------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksum(path: str | os.PathLike[str], expected_sha256: str, what: str | None = None) -> None:
    """Raise :class:`DataError` unless the file at ``path`` exists and its SHA-256 equals ``expected_sha256``."""
    path = Path(path)
    what = what or path.name
    if not path.is_file():
        raise DataError(f"{what}: file not found at {path}")
    actual = _sha256(path)
    if actual != expected_sha256:
        raise DataError(
            f"{what}: SHA-256 checksum mismatch for {path} (expected {expected_sha256}, got {actual}); the file "
            "is corrupt or not the pinned version"
        )


@contextlib.contextmanager
def _atomic_file(dest: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; rename it onto ``dest`` only if the block succeeds."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.stem}.tmp-{os.getpid()}{dest.suffix}")
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _write_text_atomic(dest: Path, text: str) -> None:
    with _atomic_file(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``root`` (POSIX ``flock``; a no-op where unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_member_name(name: str) -> None:
    """Refuse archive member names that could escape the extraction folder."""
    p = PurePosixPath(name)
    if not name or p.is_absolute() or "\\" in name or ".." in p.parts or ":" in p.parts[0]:
        raise DataError(f"refusing unsafe archive member name {name!r}")


def _extract_member(archive: Path, member: _Member, root: Path) -> Path:
    """Copy one regular file out of a wheel (zip) or sdist (tar.gz) to ``member.raw_path(root)``, atomically.

    Only the named member is read; its archive path is never used as an output path (the output is
    ``raw/<distribution>/<basename>``), and links, devices and unsafe names are refused.
    """
    _check_member_name(member.path)
    dest = member.raw_path(root)
    if not dest.resolve().is_relative_to((root / "raw").resolve()):
        raise DataError(f"refusing to extract {member.path!r} outside {root / 'raw'}")
    with _atomic_file(dest) as tmp:
        if archive.suffix in {".whl", ".zip"}:
            with zipfile.ZipFile(archive) as zf:
                try:
                    info = zf.getinfo(member.path)
                except KeyError:
                    raise DataError(f"{archive.name} has no member {member.path!r}") from None
                if info.is_dir():
                    raise DataError(f"{archive.name}: {member.path!r} is not a file")
                with zf.open(info) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, _HASH_CHUNK)
        else:
            with tarfile.open(archive, "r:*") as tf:
                try:
                    info = tf.getmember(member.path)
                except KeyError:
                    raise DataError(f"{archive.name} has no member {member.path!r}") from None
                if not info.isfile():  # no links, devices or folders
                    raise DataError(f"{archive.name}: {member.path!r} is not a regular file")
                src = tf.extractfile(info)
                assert src is not None
                with src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, _HASH_CHUNK)
        verify_checksum(tmp, member.sha256, f"{member.path} from {member.dist.filename}")
    return dest


def _pip_download(dist: _Distribution, downloads: Path, progress: bool) -> Path:
    """Fetch one pinned distribution with ``pip download`` into ``downloads``; verify its SHA-256."""
    dest = downloads / dist.filename
    tmp_dir = downloads / f".pip-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--no-input",
           "--no-binary" if dist.sdist else "--only-binary", ":all:", dist.requirement, "-d", str(tmp_dir)]
    if not progress:
        cmd.insert(4, "-q")
    _log(f"downloading {dist.label} with pip …", progress)
    try:
        proc = subprocess.run(cmd, capture_output=not progress, text=True, check=False)
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:] if not progress else []
            raise DataError(
                f"`pip download {dist.requirement}` failed (exit {proc.returncode}); PyPI must be reachable for "
                f"the first fetch{': ' + ' | '.join(detail) if detail else ''}"
            )
        got = tmp_dir / dist.filename
        if not got.is_file():
            saved = ", ".join(sorted(p.name for p in tmp_dir.iterdir())) or "nothing"
            raise DataError(f"pip download of {dist.requirement} saved {saved}, expected {dist.filename}")
        verify_checksum(got, dist.sha256, f"downloaded {dist.filename}")
        os.replace(got, dest)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return dest


def _log(message: str, progress: bool) -> None:
    if progress:
        from tqdm import tqdm

        tqdm.write(f"eo-dinov3 samples: {message}", file=sys.stderr)


def _prepare_inputs(root: Path, members: Iterable[_Member], force: bool, progress: bool) -> None:
    """Make every member available and verified under ``root/raw`` (extracting / downloading as needed)."""
    archives: dict[_Distribution, Path] = {}
    for member in sorted(set(members), key=lambda m: (m.dist.name, m.path)):
        raw = member.raw_path(root)
        if not force and raw.is_file() and _sha256(raw) == member.sha256:
            continue
        if raw.exists():
            _log(f"re-extracting {member.path} (missing, corrupt or --force)", progress)
        dist = member.dist
        if dist not in archives:
            archive = root / "downloads" / dist.filename
            if archive.is_file() and _sha256(archive) != dist.sha256:
                _log(f"cached {archive.name} fails its checksum: downloading it again", progress)
                archive.unlink()
            if not archive.is_file():
                archive = _pip_download(dist, root / "downloads", progress)
            archives[dist] = archive
        _extract_member(archives[dist], member, root)


# --------------------------------------------------------------------------------------------------------------
# Raster helpers (rasterio / GDAL)
# --------------------------------------------------------------------------------------------------------------


def _tags(member: _Member, gsd_m: float, licence: str, placement: str | None = None, **extra: Any) -> dict[str, str]:
    tags = {
        "SOURCE_PACKAGE": member.dist.label,
        "SOURCE_FILE": member.path,
        "SOURCE_SHA256": member.sha256,
        "LICENSE": licence,
        "GSD_M": f"{gsd_m:g}",
        "EO_DINOV3_VERSION": __version__,
    }
    if placement:
        tags["PLACEMENT"] = placement
    tags.update({k: str(v) for k, v in extra.items() if v is not None})
    return tags


def _write_rgb(dest: Path, rgb: np.ndarray, crs: CRS, transform: Affine, tags: dict[str, str],
               nodata: int | None = None) -> None:
    """Write a (3, H, W) uint8 array as a tiled, deflate-compressed RGB GeoTIFF, atomically."""
    import rasterio
    from rasterio.enums import ColorInterp

    if rgb.ndim != 3 or rgb.shape[0] != 3 or rgb.dtype.name != "uint8":
        raise DataError(f"internal: expected a (3, H, W) uint8 array for {dest.name}, got {rgb.shape} {rgb.dtype}")
    profile = dict(driver="GTiff", width=rgb.shape[2], height=rgb.shape[1], count=3, dtype="uint8", crs=crs,
                   transform=transform, nodata=nodata, tiled=True, blockxsize=256, blockysize=256,
                   compress="deflate", predictor=2, interleave="pixel", photometric="RGB")
    with _atomic_file(dest) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(rgb)
            dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
            dst.update_tags(**tags)


def _scene_georef(root: Path, scene: _Scene) -> tuple[CRS, Affine, int, int]:
    """CRS, affine transform and (width, height) in pixels of a scene's native image."""
    import rasterio
    from rasterio.crs import CRS
    from rasterio.errors import NotGeoreferencedWarning
    from affine import Affine

    path = scene.image.raw_path(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            crs, transform, width, height = src.crs, src.transform, src.width, src.height
            if src.count != 3 or set(src.dtypes) != {"uint8"}:
                raise DataError(f"{path.name}: expected 3 uint8 bands, got {src.count} {src.dtypes}")
    if scene.origin is not None:
        crs = CRS.from_epsg(scene.epsg)
        transform = Affine(scene.native_gsd_m, 0.0, scene.origin[0], 0.0, -scene.native_gsd_m, scene.origin[1])
    elif crs is None or crs.to_epsg() != scene.epsg:
        raise DataError(f"{path.name}: expected CRS EPSG:{scene.epsg}, found {crs}")
    return crs, transform, width, height


def _read_scene(root: Path, scene: _Scene) -> tuple[np.ndarray, CRS, Affine]:
    """The scene's native (3, H, W) uint8 pixels with their CRS and transform (source nodata is ignored)."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    crs, transform, _, _ = _scene_georef(root, scene)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(scene.image.raw_path(root)) as src:
            return src.read(), crs, transform


def _resample(rgb: np.ndarray, transform: Affine, crs: CRS, pixel_size: float) -> tuple[np.ndarray, Affine]:
    """Average-resample ``rgb`` onto a north-up grid of square ``pixel_size`` pixels (CRS units).

    The grid keeps the upper-left corner; its extent is the whole number of output pixels that fits inside the
    input (so it covers the input's bounds to within one output pixel).
    """
    import numpy as np
    from affine import Affine
    from rasterio.warp import Resampling, reproject

    width_units = rgb.shape[2] * abs(transform.a)
    height_units = rgb.shape[1] * abs(transform.e)
    width = int(math.floor(width_units / pixel_size + 1e-6))
    height = int(math.floor(height_units / pixel_size + 1e-6))
    if width < 1 or height < 1:
        raise DataError(f"internal: cannot resample a {rgb.shape[2]}x{rgb.shape[1]} image to {pixel_size} units")
    dst_transform = Affine(pixel_size, 0.0, transform.c, 0.0, -pixel_size, transform.f)
    out = np.zeros((3, height, width), dtype=np.uint8)
    reproject(source=rgb, destination=out, src_transform=transform, src_crs=crs, dst_transform=dst_transform,
              dst_crs=crs, resampling=Resampling.average, src_nodata=None, dst_nodata=None)
    return out, dst_transform


def _pixel_to_map(transform: Affine, col: float, row: float) -> tuple[float, float]:
    """Map coordinates (CRS units) of the pixel-grid point (``col``, ``row``); (0, 0) is the upper-left corner.

    Written out because ``Affine * tuple`` is deprecated in affine 3 and warns.
    """
    return (transform.a * col + transform.b * row + transform.c,
            transform.d * col + transform.e * row + transform.f)


def _nominal_gsd(transform: Affine) -> float:
    """Mean of the pixel width and height, rounded to 0.1 mm (SJER's source pixels are 0.1002 x 0.0997 m)."""
    return round((abs(transform.a) + abs(transform.e)) / 2.0, 4)


# --------------------------------------------------------------------------------------------------------------
# Builders: each writes one derived sample (the inputs are already extracted and verified)
# --------------------------------------------------------------------------------------------------------------


def _build_scene_raster(root: Path, dest: Path, *, scene: _Scene, gsd_m: float | None) -> None:
    """``<scene>_rgb_native.tif`` (``gsd_m=None``) or the scene average-resampled to ``gsd_m`` metres."""
    rgb, crs, transform = _read_scene(root, scene)
    resampling = None
    if gsd_m is not None:
        rgb, transform = _resample(rgb, transform, crs, gsd_m)
        resampling = "average"
    tags = _tags(scene.image, gsd_m or _nominal_gsd(transform), NEON_LICENCE, scene.placement,
                 RESAMPLING=resampling, NOTE=scene.note)
    _write_rgb(dest, rgb, crs, transform, tags)


def _read_boxes(root: Path, scene: _Scene) -> list[dict[str, Any]]:
    """Tree-crown boxes of a scene in pixel coordinates (column/row of the native image, as annotated)."""
    path = scene.boxes.raw_path(root)
    _, _, width, height = _scene_georef(root, scene)
    boxes: list[dict[str, Any]] = []
    if path.suffix == ".xml":  # Pascal-VOC
        ann = ET.parse(path).getroot()
        size = (int(ann.findtext("size/width", "-1")), int(ann.findtext("size/height", "-1")))
        if size != (width, height):
            raise DataError(f"{path.name}: annotated image size {size} != image size {(width, height)}")
        for obj in ann.iter("object"):
            box = obj.find("bndbox")
            if box is None:
                continue
            boxes.append({"label": obj.findtext("name", "Tree"),
                          **{k: float(box.findtext(k, "nan")) for k in ("xmin", "ymin", "xmax", "ymax")}})
    else:  # deepforest CSV (the SJER truth file orders its columns xmin,xmax,ymin,ymax and labels trees "0")
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                label = row.get("label", "Tree")
                boxes.append({"label": "Tree" if label == "0" else label,
                              **{k: float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax")}})
    for b in boxes:
        if not (0 <= b["xmin"] < b["xmax"] <= width and 0 <= b["ymin"] < b["ymax"] <= height):
            raise DataError(f"{path.name}: box {b} lies outside the {width}x{height} image")
    if not boxes:
        raise DataError(f"{path.name}: no tree-crown boxes found")
    return boxes


def _build_crowns_geojson(root: Path, dest: Path, *, scene: _Scene) -> None:
    """Tree-crown boxes as GeoJSON polygons in the image CRS (legacy ``crs`` member names the EPSG code)."""
    crs, transform, _, _ = _scene_georef(root, scene)
    features = []
    for i, b in enumerate(_read_boxes(root, scene)):
        corners = [(b["xmin"], b["ymax"]), (b["xmax"], b["ymax"]), (b["xmax"], b["ymin"]), (b["xmin"], b["ymin"])]
        ring = [list(_pixel_to_map(transform, col, row)) for col, row in corners]  # counter-clockwise on the map
        ring.append(ring[0])
        features.append({"type": "Feature", "id": i, "geometry": {"type": "Polygon", "coordinates": [ring]},
                         "properties": {"label": b["label"], "image": f"{scene.key}_rgb_native.tif",
                                        **{k: b[k] for k in ("xmin", "ymin", "xmax", "ymax")}}})
    collection = {
        "type": "FeatureCollection",
        "name": f"{scene.key}_crowns",
        "crs": {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{crs.to_epsg()}"}},
        "source_file": scene.boxes.path,
        "source_package": scene.boxes.dist.label,
        "placement": scene.placement or "georeferencing of the source GeoTIFF",
        "features": features,
    }
    _write_text_atomic(dest, json.dumps(collection, indent=1) + "\n")


def _build_crowns_csv(root: Path, dest: Path) -> None:
    """All tree-crown boxes in pixel coordinates of the ``<scene>_rgb_native.tif`` images."""
    with _atomic_file(dest) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["image_key", "image_path", "xmin", "ymin", "xmax", "ymax", "label", "source_file"])
            for scene in SCENES:
                for b in _read_boxes(root, scene):
                    writer.writerow([f"{scene.key}_rgb_native", f"{scene.key}_rgb_native.tif",
                                     f"{b['xmin']:g}", f"{b['ymin']:g}", f"{b['xmax']:g}", f"{b['ymax']:g}",
                                     b["label"], scene.boxes.path])


def _build_copy(root: Path, dest: Path, *, member: _Member) -> None:
    with _atomic_file(dest) as tmp:
        shutil.copyfile(member.raw_path(root), tmp)


def _read_laz(path: Path) -> Any:
    import laspy

    if not laspy.LazBackend.detect_available():
        raise DataError("LAZ decompression is unavailable: install the lazrs backend (pip install 'laspy[lazrs]')")
    try:
        return laspy.read(path)
    except laspy.errors.LaspyException as e:
        raise DataError(f"cannot read {path.name}: {e}") from e


def _build_autzen_rgb(root: Path, dest: Path, *, gsd_m: float = TARGET_GSD_M) -> None:
    """Rasterise the lidar point colours: per cell, the colour of the highest point (an orthophoto-like view).

    The grid is in the cloud's CRS (EPSG:2994, international feet) with ``gsd_m`` metres = ``gsd_m / 0.3048`` ft
    square pixels, aligned to multiples of the pixel size. The cloud has ~1.8 points/m^2, so about half of the
    0.6 m cells are empty: holes within 4 pixels of data are filled by GDAL's inverse-distance ``fillnodata``;
    cells farther away (outside the trimmed cloud) stay 0 = nodata. Real colours are clipped to >= 1.
    """
    import numpy as np
    from affine import Affine
    from rasterio.crs import CRS
    from rasterio.fill import fillnodata

    las = _read_laz(AUTZEN_LAZ.raw_path(root))
    crs = CRS.from_epsg(AUTZEN_EPSG)
    header_crs = las.header.parse_crs()
    if header_crs is None or not header_crs.equals(crs.to_wkt(), ignore_axis_order=True):
        raise DataError(f"autzen_trim.laz: header CRS is not EPSG:{AUTZEN_EPSG}: {header_crs}")
    px = gsd_m / FOOT_M
    x, y, z = np.asarray(las.x), np.asarray(las.y), np.asarray(las.z)
    colours = np.stack([np.asarray(las.red), np.asarray(las.green), np.asarray(las.blue)])
    if colours.max() > 255:  # 16-bit colours (value * 256): keep the high byte
        colours = colours >> 8
    colours = np.clip(colours, 1, 255).astype(np.uint8)
    left, top = math.floor(x.min() / px) * px, math.ceil(y.max() / px) * px
    width, height = int(math.ceil((x.max() - left) / px)) + 1, int(math.ceil((top - y.min()) / px)) + 1
    col = np.clip(((x - left) / px).astype(np.int64), 0, width - 1)
    row = np.clip(((top - y) / px).astype(np.int64), 0, height - 1)
    cell = row * width + col
    order = np.lexsort((z, cell))  # by cell, then by height
    last = np.r_[cell[order][1:] != cell[order][:-1], True]  # highest point of each cell
    top_points, cells = order[last], cell[order][last]
    rgb = np.zeros((3, height * width), dtype=np.uint8)
    rgb[:, cells] = colours[:, top_points]
    rgb = rgb.reshape(3, height, width)
    has_data = np.zeros(height * width, dtype=np.uint8)
    has_data[cells] = 1
    has_data = has_data.reshape(height, width)
    rgb = np.stack([fillnodata(band, mask=has_data, max_search_distance=4, smoothing_iterations=0)
                    for band in rgb]).astype(np.uint8)
    transform = Affine(px, 0.0, left, 0.0, -px, top)
    tags = _tags(AUTZEN_LAZ, gsd_m, AUTZEN_LICENCE, PIXEL_SIZE_CRS_UNITS=f"{px:.6f} ft (international foot)",
                 RASTERISATION="colour of the highest point per cell; holes <= 4 px filled (GDAL fillnodata)",
                 POINTS=len(x), CELLS_WITH_POINTS=int(has_data.sum()))
    _write_rgb(dest, rgb, crs, transform, tags, nodata=0)


def _tile_is_informative(tile: np.ndarray) -> bool:
    """False for tiles that are mostly nodata-like (all bands 0 or all 255) or nearly constant (std < 5 DN)."""
    blank = (tile == 0).all(axis=0) | (tile == 255).all(axis=0)
    return bool(blank.mean() <= 0.5 and tile.std() >= 5.0)


def _build_tiles(root: Path, dest: Path) -> None:
    """Cut non-overlapping ``TILE_SIZE_PX`` tiles at ``TILE_GSD_M`` from every scene into ``tiles/``.

    The folder is built under a temporary name and swapped in, then ``manifest.csv`` (paths relative to it).
    """
    from affine import Affine

    tiles_dir = dest.parent
    tmp_dir = tiles_dir.with_name(f".{tiles_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    rows: list[list[Any]] = []
    try:
        for scene in SCENES:
            rgb, crs, transform = _read_scene(root, scene)
            rgb, transform = _resample(rgb, transform, crs, TILE_GSD_M)
            n_rows, n_cols = rgb.shape[1] // TILE_SIZE_PX, rgb.shape[2] // TILE_SIZE_PX
            for r in range(n_rows):
                for c in range(n_cols):
                    window = (slice(None), slice(r * TILE_SIZE_PX, (r + 1) * TILE_SIZE_PX),
                              slice(c * TILE_SIZE_PX, (c + 1) * TILE_SIZE_PX))
                    tile = rgb[window]
                    if not _tile_is_informative(tile):
                        continue
                    name = f"{scene.key}_r{r:02d}_c{c:02d}.tif"
                    x0, y0 = _pixel_to_map(transform, c * TILE_SIZE_PX, r * TILE_SIZE_PX)
                    tile_transform = Affine(transform.a, transform.b, x0, transform.d, transform.e, y0)
                    tags = _tags(scene.image, TILE_GSD_M, NEON_LICENCE, scene.placement, RESAMPLING="average",
                                 TILE_ROW=r, TILE_COL=c, PARENT_SAMPLE=f"{scene.key}_rgb_native")
                    _write_rgb(tmp_dir / name, tile, crs, tile_transform, tags)
                    rows.append([name, TILE_SIZE_PX, TILE_SIZE_PX, f"EPSG:{crs.to_epsg()}", f"{TILE_GSD_M:g}",
                                 f"{scene.key}_rgb_native"])
        if len(rows) < MIN_TILES:
            raise DataError(f"only {len(rows)} informative tiles could be cut (need {MIN_TILES})")
        with open(tmp_dir / dest.name, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "width", "height", "crs", "gsd_m", "source"])
            writer.writerows(rows)
        old = tiles_dir.with_name(f".{tiles_dir.name}.old-{os.getpid()}")
        if tiles_dir.exists():
            os.replace(tiles_dir, old)
        os.replace(tmp_dir, tiles_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _manifest_files(manifest: Path) -> list[Path]:
    """The tile files listed in a tiles manifest."""
    with open(manifest, newline="", encoding="utf-8") as f:
        return [manifest.parent / row["path"] for row in csv.DictReader(f)]


# --------------------------------------------------------------------------------------------------------------
# The catalogue of derived samples
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Product:
    """One derived sample: a file under the samples root (plus, for ``tiles``, the files its manifest lists)."""

    key: str
    relpath: str
    description: str
    source: str
    licence: str
    inputs: tuple[_Member, ...]
    build: Callable[[Path, Path], None]
    crs_epsg: int | None = None
    gsd_m: float | None = None
    extra_files: Callable[[Path], list[Path]] | None = None


def _source_text(*members: _Member) -> str:
    return "; ".join(f"{m.dist.label}: {m.path}" for m in members)


def _scene_products(scene: _Scene) -> list[_Product]:
    placement = " Approximate placement (see the PLACEMENT tag)." if scene.placement else ""
    where = f"EPSG:{scene.epsg}"
    return [
        _Product(f"{scene.key}_rgb_native", f"{scene.key}_rgb_native.tif",
                 f"{scene.title}: RGB uint8 GeoTIFF, {where}, native {scene.native_gsd_m:g} m pixels.{placement}",
                 _source_text(scene.image), NEON_LICENCE, (scene.image,),
                 partial(_build_scene_raster, scene=scene, gsd_m=None), scene.epsg, scene.native_gsd_m),
        _Product(f"{scene.key}_rgb_0p6m", f"{scene.key}_rgb_0p6m.tif",
                 f"{scene.title}: RGB uint8 GeoTIFF, {where}, average-resampled to {TARGET_GSD_M:g} m pixels "
                 f"(SAT-493M-like GSD).{placement}",
                 _source_text(scene.image), NEON_LICENCE, (scene.image,),
                 partial(_build_scene_raster, scene=scene, gsd_m=TARGET_GSD_M), scene.epsg, TARGET_GSD_M),
        _Product(f"{scene.key}_crowns", f"{scene.key}_crowns.geojson",
                 f"{scene.title}: hand-annotated tree-crown boxes as GeoJSON polygons in {where} (map metres; "
                 "pixel coordinates of the native image in the properties).",
                 _source_text(scene.boxes), NEON_LICENCE, (scene.image, scene.boxes),
                 partial(_build_crowns_geojson, scene=scene), scene.epsg),
    ]


def _catalogue() -> tuple[_Product, ...]:
    products = [p for scene in SCENES for p in _scene_products(scene)]
    all_boxes = tuple(m for s in SCENES for m in (s.image, s.boxes))
    products += [
        _Product("crowns_pixel", "crowns_pixel.csv",
                 "All tree-crown boxes in pixel coordinates (column/row, upper-left origin) of the "
                 "<scene>_rgb_native.tif images; columns image_key,image_path,xmin,ymin,xmax,ymax,label,source_file.",
                 _source_text(*(s.boxes for s in SCENES)), NEON_LICENCE, all_boxes, _build_crowns_csv),
        _Product("autzen_laz", "autzen_trim.laz",
                 "Autzen stadium (Eugene, OR) colourised airborne lidar, 110 000 points, LAS 1.2 point format 3, "
                 f"EPSG:{AUTZEN_EPSG} (NAD83(HARN) / Oregon GIC Lambert, international feet; z in feet).",
                 _source_text(AUTZEN_LAZ), AUTZEN_LICENCE, (AUTZEN_LAZ,), partial(_build_copy, member=AUTZEN_LAZ),
                 AUTZEN_EPSG),
        _Product("autzen_rgb_0p6m", "autzen_rgb_0p6m.tif",
                 f"RGB uint8 GeoTIFF of the Autzen point colours, EPSG:{AUTZEN_EPSG}, {TARGET_GSD_M:g} m "
                 f"(= {TARGET_GSD_M / FOOT_M:.4f} ft) pixels: highest point per cell, small holes filled, 0 = nodata.",
                 _source_text(AUTZEN_LAZ), AUTZEN_LICENCE, (AUTZEN_LAZ,), _build_autzen_rgb, AUTZEN_EPSG,
                 TARGET_GSD_M),
        _Product("tiles", "tiles/manifest.csv",
                 f"SAT-493M-style pretraining tiles: {TILE_SIZE_PX}x{TILE_SIZE_PX} px uint8 RGB GeoTIFFs at "
                 f"{TILE_GSD_M:g} m GSD cut without overlap from the NEON scenes (constant / nodata tiles skipped); "
                 "manifest columns path,width,height,crs,gsd_m,source.",
                 _source_text(*(s.image for s in SCENES)), NEON_LICENCE, tuple(s.image for s in SCENES),
                 _build_tiles, gsd_m=TILE_GSD_M, extra_files=_manifest_files),
        _Product("licence_deepforest", "licenses/deepforest-1.5.2-LICENSE", "Licence file of the deepforest wheel.",
                 _source_text(DEEPFOREST_LICENSE), "MIT", (DEEPFOREST_LICENSE,),
                 partial(_build_copy, member=DEEPFOREST_LICENSE)),
        _Product("licence_laspy", "licenses/laspy-2.7.0-LICENSE.txt", "Licence file of the laspy sdist.",
                 _source_text(LASPY_LICENSE), "BSD-2-Clause", (LASPY_LICENSE,),
                 partial(_build_copy, member=LASPY_LICENSE)),
    ]
    products += [
        _Product("app_static_" + rel.replace("/", "_").replace(".", "_").replace("-", "_"), f"{APP_STATIC_DIR}/{rel}",
                 f"Offline map asset for the Streamlit app: {rel}", _source_text(member),
                 "BSD-2-Clause (Leaflet) / MIT (Leaflet.draw)", (member,), partial(_build_copy, member=member))
        for rel, member in LEAFLET_MEMBERS.items()
    ]
    products.append(
        _Product("licence_django_leaflet", "licenses/django-leaflet-0.34.0-LICENSE",
                 "Licence file of the django-leaflet wheel (the Leaflet assets keep their own BSD-2/MIT licences).",
                 _source_text(DJANGO_LEAFLET_LICENSE), "LGPL-3.0", (DJANGO_LEAFLET_LICENSE,),
                 partial(_build_copy, member=DJANGO_LEAFLET_LICENSE)))
    keys = [p.key for p in products]
    assert len(keys) == len(set(keys)), "duplicate sample keys"
    return tuple(products)


PRODUCTS: tuple[_Product, ...] = _catalogue()
_BY_KEY: dict[str, _Product] = {p.key: p for p in PRODUCTS}


# --------------------------------------------------------------------------------------------------------------
# Index (samples.json) and verification
# --------------------------------------------------------------------------------------------------------------


def _load_index(root: Path) -> dict[str, dict[str, Any]]:
    """The per-key entries of ``samples.json`` (empty when absent, unreadable or from another recipe)."""
    try:
        data = json.loads((root / INDEX_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("recipe_version") != RECIPE_VERSION:
        return {}
    samples = data.get("samples")
    return samples if isinstance(samples, dict) else {}


def _save_index(root: Path, entries: dict[str, dict[str, Any]]) -> None:
    data = {
        "format": "eo_dinov3 samples index",
        "recipe_version": RECIPE_VERSION,
        "eo_dinov3_version": __version__,
        "sources": {d.name: {"requirement": d.requirement, "file": d.filename, "sha256": d.sha256,
                             "licence": d.licence} for d in (DEEPFOREST, LASPY)},
        "samples": {p.key: entries[p.key] for p in PRODUCTS if p.key in entries},
    }
    _write_text_atomic(root / INDEX_NAME, json.dumps(data, indent=1) + "\n")


def _metadata(product: _Product) -> dict[str, Any]:
    """The descriptive part of an index entry (everything but the checksums)."""
    meta: dict[str, Any] = {"path": product.relpath, "description": product.description,
                            "licence": product.licence, "source": product.source}
    if product.crs_epsg is not None:
        meta["crs"] = f"EPSG:{product.crs_epsg}"
    if product.gsd_m is not None:
        meta["gsd_m"] = product.gsd_m
    return meta


def _index_entry(root: Path, product: _Product) -> dict[str, Any]:
    path = root / product.relpath
    entry: dict[str, Any] = {**_metadata(product), "sha256": _sha256(path), "bytes": path.stat().st_size}
    if product.extra_files is not None:
        entry["files"] = {f.relative_to(root).as_posix(): _sha256(f) for f in product.extra_files(path)}
    return entry


def _problem(root: Path, product: _Product, entries: dict[str, dict[str, Any]]) -> str | None:
    """Why ``product`` needs (re)building, or ``None`` when it is present and matches its checksums."""
    path = root / product.relpath
    entry = entries.get(product.key)
    if not path.is_file():
        return f"missing: {path}"
    if not entry or entry.get("path") != product.relpath:
        return f"not recorded in {INDEX_NAME}"
    if _sha256(path) != entry.get("sha256"):
        return f"checksum mismatch: {path}"
    for rel, sha in (entry.get("files") or {}).items():
        f = root / rel
        if not f.is_file():
            return f"missing: {f}"
        if _sha256(f) != sha:
            return f"checksum mismatch: {f}"
    return None


def _resolve_root(root: str | os.PathLike[str] | None) -> Path:
    return Path(root).expanduser() if root is not None else samples_root()


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------


def samples_root() -> Path:
    """The samples folder: ``$EO_DINOV3_DATA`` if set, else ``~/.cache/eo_dinov3/samples``."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "eo_dinov3" / "samples"


def check_samples(root: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Verify every derived sample against the SHA-256 recorded in ``samples.json``.

    Returns ``{key: problem}`` for each sample that is missing, unrecorded or corrupt (empty when all is well).
    """
    root = _resolve_root(root)
    entries = _load_index(root)
    return {p.key: problem for p in PRODUCTS if (problem := _problem(root, p, entries)) is not None}


def fetch_samples(root: str | os.PathLike[str] | None = None, force: bool = False, progress: bool = True) -> Path:
    """Download, verify and derive all sample data under ``root`` (default :func:`samples_root`); return it.

    Idempotent: samples that are present and match the checksums in ``samples.json`` are left alone, so a
    second call only hashes the derived files (< 1 s). Missing or corrupt samples are rebuilt from the extracted
    sources under ``root/raw`` (re-extracted from the cached archives in ``root/downloads`` if they fail their
    pinned SHA-256, and re-downloaded with ``pip download`` only if an archive is missing or corrupt).
    ``force=True`` re-extracts and rebuilds everything (a valid cached archive is still reused).
    Every file is written under a temporary name and renamed into place, and ``samples.json`` is updated after
    each sample, so an interrupted run leaves nothing that passes verification without being complete.

    Raises :class:`~eo_dinov3.errors.DataError` when a download fails or a checksum does not match.
    """
    from tqdm import tqdm

    root = _resolve_root(root)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        entries = {} if force else _load_index(root)
        todo = [p for p in PRODUCTS if force or _problem(root, p, entries) is not None]
        stale = [p for p in PRODUCTS if p not in todo and any(entries[p.key].get(k) != v
                                                               for k, v in _metadata(p).items())]
        for product in stale:  # descriptions changed in the code: refresh the index, keep the files
            entries[product.key].update(_metadata(product))
        if stale:
            _save_index(root, entries)
        if not todo:
            return root
        _prepare_inputs(root, (m for p in todo for m in p.inputs), force=force, progress=progress)
        bar = tqdm(todo, desc="eo-dinov3 samples", unit="sample", disable=not progress, file=sys.stderr)
        for product in bar:
            bar.set_postfix_str(product.key)
            product.build(root, root / product.relpath)
            entries[product.key] = _index_entry(root, product)
            _save_index(root, entries)
        bar.close()
        problems = {p.key: problem for p in todo if (problem := _problem(root, p, entries)) is not None}
        if problems:  # pragma: no cover - would be a bug in a builder
            raise DataError(f"samples still invalid after rebuilding: {problems}")
    return root


def sample_path(key: str, root: str | os.PathLike[str] | None = None, verify: bool = False) -> Path:
    """Path of the derived sample ``key`` (see :func:`list_samples`).

    Raises :class:`DataError` for an unknown key (listing the valid ones), when the sample is missing, or, with
    ``verify=True``, when its SHA-256 does not match ``samples.json``.
    """
    product = _BY_KEY.get(key)
    if product is None:
        raise DataError(f"unknown sample key {key!r}; valid keys: {', '.join(_BY_KEY)}")
    root = _resolve_root(root)
    path = root / product.relpath
    if not path.is_file():
        raise DataError(
            f"sample data not found at {path}; run `eo-dinov3 samples fetch"
            f"{'' if root == samples_root() else f' --root {root}'}` (the README set-up command does it)"
        )
    if verify and (problem := _problem(root, product, _load_index(root))) is not None:
        raise DataError(f"sample {key!r} failed verification ({problem}); run `eo-dinov3 samples fetch` to "
                        "re-derive it")
    return path


def list_samples(root: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The catalogue of derived samples: key, absolute ``path``, ``relpath``, description, licence, source,
    ``crs`` / ``gsd_m`` (metres per pixel) where applicable, recorded ``sha256`` (or ``None``) and ``present``."""
    root = _resolve_root(root)
    entries = _load_index(root)
    return [{
        "key": p.key,
        "path": str(root / p.relpath),
        "relpath": p.relpath,
        "description": p.description,
        "licence": p.licence,
        "source": p.source,
        "crs": f"EPSG:{p.crs_epsg}" if p.crs_epsg is not None else None,
        "gsd_m": p.gsd_m,
        "sha256": (entries.get(p.key) or {}).get("sha256"),
        "present": (root / p.relpath).is_file(),
    } for p in PRODUCTS]


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def _add_fetch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, default=None,
                        help=f"samples folder (default: ${ENV_VAR} or ~/.cache/eo_dinov3/samples)")
    parser.add_argument("--force", action="store_true", help="re-extract and rebuild everything")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``samples {fetch,list,path}`` to the ``eo-dinov3`` command line (``func`` returns the exit code)."""
    parser = subparsers.add_parser(
        "samples", help="fetch, list or locate the real sample data (NEON RGB, Autzen lidar)",
        description="Real sub-metre sample data from the deepforest 1.5.2 wheel and the laspy 2.7.0 sdist "
                    "(see SAMPLES.md).")
    actions = parser.add_subparsers(dest="samples_action", metavar="<action>")
    _add_fetch_arguments(actions.add_parser("fetch", help="download, verify and derive all samples"))
    for name, help_text in (("list", "list the sample keys, files and whether they are present"),
                            ("path", "print the path of one sample")):
        action = actions.add_parser(name, help=help_text)
        action.add_argument("--root", type=Path, default=None,
                            help=f"samples folder (default: ${ENV_VAR} or ~/.cache/eo_dinov3/samples)")
        if name == "path":
            action.add_argument("key", help="sample key (see `eo-dinov3 samples list`)")
    parser.set_defaults(func=_run_cli, _samples_parser=parser)


def _fetch_cli(args: argparse.Namespace) -> int:
    import time

    start = time.perf_counter()
    root = fetch_samples(args.root, force=args.force, progress=not args.quiet)
    print(f"{len(PRODUCTS)} samples ready in {root} ({time.perf_counter() - start:.1f} s)")
    return 0


def _run_cli(args: argparse.Namespace) -> int:
    action = getattr(args, "samples_action", None)
    if action == "fetch":
        return _fetch_cli(args)
    if action == "list":
        for s in list_samples(args.root):
            print(f"{s['key']:<20} {'ok' if s['present'] else '--'}  {s['relpath']:<34} {s['description']}")
        return 0
    if action == "path":
        print(sample_path(args.key, args.root))
        return 0
    args._samples_parser.print_help()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m eo_dinov3.data.samples [--root DIR] [--force] [--quiet]``: the same as ``samples fetch``."""

    parser = argparse.ArgumentParser(prog="python -m eo_dinov3.data.samples",
                                     description="Fetch the sample data (= eo-dinov3 samples fetch).")
    _add_fetch_arguments(parser)
    from eo_dinov3.cli import run_standalone

    return run_standalone(parser, _fetch_cli, argv)


if __name__ == "__main__":
    sys.exit(main())
