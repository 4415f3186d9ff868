"""Reader for the GEO-Bench v1 on-disk layout (no dependency on the ``geobench`` package).

Layout (``$GEO_BENCH_DIR``, default ``~/dataset/geobench`` as in the official package)::

    classification_v1.0/ normalizer.json, m-eurosat/{task_specs.pkl, band_stats.json, *_partition.json,
                                                      label_map.json?, label_stats.json?, <sample>.hdf5 ...}
    segmentation_v1.0/   normalizer.json, m-cashew-plant/ ...

One HDF5 file per sample: one 2-D dataset per band named by its descriptor (band name, plus ``_YYYY-MM-DD`` when the
band has a date), a 3-D dataset for hyperspectral cubes (``Neon``, ``[H, W, 369]``), a ``label`` dataset for
segmentation, and a file attribute ``pickle`` = ``str(pickle.dumps(dict))`` holding per-band metadata,
``bands_order`` and (classification) the label. Those pickles (and ``task_specs.pkl``) are read with
:class:`RestrictedUnpickler`, which only builds the small set of types the format uses and refuses anything else.

Task facts (band names, classes, metric) live in :data:`TASKS`; the fixture generator writes exactly this format.
"""

from __future__ import annotations

import ast
import datetime
import io
import json
import os
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from eo_dinov3.errors import DataError

CLASSIFICATION = "classification_v1.0"
SEGMENTATION = "segmentation_v1.0"
PARTITIONS = ("default", "0.01x_train", "0.02x_train", "0.05x_train", "0.10x_train", "0.20x_train",
              "0.50x_train", "1.00x_train")  # fmt: skip
SPLITS = ("train", "valid", "test")


# ----------------------------------------------------------------------------------------------------------------
# Stand-ins for the geobench classes found in the pickles. Same class names, module names and attribute names as the
# official package (geobench/dataset.py, label.py, task.py), so pickles written with them are read by geobench and
# vice versa. They carry data only: no behaviour that a pickle could trigger.
# ----------------------------------------------------------------------------------------------------------------
class _Plain:
    """Attribute bag restored by pickle's default ``__setstate__`` (``__dict__.update``)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __hash__(self) -> int:
        return hash((type(self).__name__, getattr(self, "name", None)))


class BandInfo(_Plain):
    def __init__(self, name: str, alt_names: Sequence[str] = (), spatial_resolution: float | None = None):
        self.name, self.alt_names, self.spatial_resolution = name, tuple(alt_names), spatial_resolution


class SpectralBand(BandInfo):
    def __init__(self, name, alt_names=(), spatial_resolution=None, wavelength=None):
        super().__init__(name, alt_names, spatial_resolution)
        self.wavelength = wavelength


class Sentinel1(SpectralBand):
    pass


class Sentinel2(SpectralBand):
    pass


class Landsat8(SpectralBand):
    pass


class Mask(BandInfo):
    pass


class ElevationBand(BandInfo):
    pass


class CloudProbability(Mask):
    def __init__(self, alt_names=(), spatial_resolution=None):
        super().__init__("Cloud Probability", alt_names, spatial_resolution)


class MultiBand(BandInfo):
    def __init__(self, name, alt_names=(), spatial_resolution=None, n_bands=None):
        super().__init__(name, alt_names, spatial_resolution)
        self.n_bands = n_bands


class HyperSpectralBands(MultiBand):
    def __init__(self, name, alt_names=(), spatial_resolution=None, n_bands=None, wavelength_range=None):
        super().__init__(name, alt_names, spatial_resolution, n_bands)
        self.wavelength_range = wavelength_range


class LabelType(_Plain):
    pass


class Classification(LabelType):
    def __init__(self, n_classes: int, class_names: list[str] | None = None):
        self.n_classes, self._class_names = n_classes, class_names


class SemanticSegmentation(Classification):
    pass


class MultiLabelClassification(LabelType):
    def __init__(self, n_classes: int, class_names: list[str] | None = None):
        self.n_classes, self.class_name = n_classes, class_names  # sic: ``class_name`` in the official class


class SegmentationClasses(BandInfo, LabelType):
    def __init__(self, name: str, spatial_resolution: float, n_classes: int, class_names=None):
        BandInfo.__init__(self, name, (), spatial_resolution)
        self.n_classes, self._class_names = n_classes, class_names


class TaskSpecifications(_Plain):
    def __init__(self, dataset_name, bands_info, spatial_resolution, benchmark_name=None, patch_size=None,
                 n_time_steps=None, label_type=None):  # fmt: skip
        self.dataset_name, self.benchmark_name, self.patch_size = dataset_name, benchmark_name, patch_size
        self.n_time_steps, self.bands_info, self.label_type = n_time_steps, bands_info, label_type
        self.spatial_resolution = spatial_resolution


class _Legacy(_Plain):
    """``Accuracy`` / ``SegmentationAccuracy`` / ``MultilabelAccuracy`` markers found in old task specs."""


#: (module, class) of the official package -> stand-in; module names include the historical ``ccb.io`` spellings.
GEOBENCH_CLASSES: dict[str, type] = {
    c.__name__: c
    for c in (BandInfo, SpectralBand, Sentinel1, Sentinel2, Landsat8, Mask, ElevationBand, CloudProbability,
              MultiBand, HyperSpectralBands, LabelType, Classification, SemanticSegmentation,
              MultiLabelClassification, SegmentationClasses, TaskSpecifications)  # fmt: skip
}
_LEGACY_NAMES = ("Accuracy", "SegmentationAccuracy", "MultilabelAccuracy")
GEOBENCH_MODULES = frozenset({"geobench", "geobench.dataset", "geobench.label", "geobench.task", "geobench.io",
                              "geobench.io.dataset", "geobench.io.label", "geobench.io.task", "ccb", "ccb.io",
                              "ccb.io.dataset", "ccb.io.label", "ccb.io.task"})  # fmt: skip
#: where the official package defines each class (used when *writing* fixtures)
OFFICIAL_MODULE = {**{n: "geobench.dataset" for n in GEOBENCH_CLASSES}, "LabelType": "geobench.label",
                   "Classification": "geobench.label", "SemanticSegmentation": "geobench.label",
                   "MultiLabelClassification": "geobench.label",
                   "TaskSpecifications": "geobench.task"}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Restricted unpickling
# ----------------------------------------------------------------------------------------------------------------
class UnsafePickleError(DataError):
    """A pickle inside a benchmark file references something outside the GEO-Bench format."""


def _np_mod(name: str):
    import importlib

    for prefix in ("numpy._core", "numpy.core"):
        try:
            return importlib.import_module(f"{prefix}.{name}")
        except ImportError:
            continue
    raise ImportError(name)


def _no_object(dtype: Any) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise pickle.UnpicklingError("object dtypes are not allowed")
    return dt


def _safe_dtype(*args: Any, **kwargs: Any) -> np.dtype:
    return _no_object(np.dtype(*args, **kwargs))


def _safe_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"ndarray subclass {subtype!r} is not allowed")
    return _np_mod("multiarray")._reconstruct(subtype, shape, _no_object(dtype))


def _safe_scalar(dtype: Any, *args: Any) -> Any:
    return _np_mod("multiarray").scalar(_no_object(dtype), *args)


def _safe_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    return _np_mod("numeric")._frombuffer(buf, _no_object(dtype), shape, order)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {("numpy", "dtype"): _safe_dtype, ("numpy", "ndarray"): np.ndarray,
                                           ("collections", "OrderedDict"): OrderedDict}  # fmt: skip
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = _safe_reconstruct
        allowed[(mod, "scalar")] = _safe_scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(mod, "_frombuffer")] = _safe_frombuffer
    for name in ("date", "datetime", "time", "timedelta", "timezone"):
        allowed[("datetime", name)] = getattr(datetime, name)
    try:  # georeferencing of real samples (rasterio is a project dependency)
        from affine import Affine

        allowed[("affine", "Affine")] = Affine
    except ImportError:  # pragma: no cover
        pass
    try:
        from rasterio.crs import CRS

        allowed[("rasterio.crs", "CRS")] = CRS
    except ImportError:  # pragma: no cover
        pass
    return allowed


_ALLOWED = _allowed_globals()


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that builds only GEO-Bench metadata types (our stand-ins), numpy arrays/scalars without object
    dtypes, ``datetime`` values, ``OrderedDict`` and the rasterio/affine georeferencing types; everything else
    (``os.system``, ``builtins.eval``, arbitrary classes …) raises :class:`UnsafePickleError` before it is called."""

    source = "<pickle>"

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in _ALLOWED:
            return _ALLOWED[key]
        if module in GEOBENCH_MODULES:
            if name in GEOBENCH_CLASSES:
                return GEOBENCH_CLASSES[name]
            if name in _LEGACY_NAMES:
                return _Legacy
        raise UnsafePickleError(
            f"refusing to unpickle {module}.{name} in {self.source}: it is not part of the GEO-Bench data format, "
            "so the file may be malicious; re-download the benchmark from its official source"
        )


def safe_loads(data: bytes, source: str = "<pickle>") -> Any:
    """Unpickle GEO-Bench metadata from bytes with :class:`RestrictedUnpickler`."""
    up = RestrictedUnpickler(io.BytesIO(data))
    up.source = source
    try:
        return up.load()
    except UnsafePickleError:
        raise
    except Exception as e:
        raise DataError(f"cannot read the metadata pickle in {source}: {type(e).__name__}: {e}") from None


def safe_load_file(path: str | os.PathLike) -> Any:
    """Unpickle a file such as ``task_specs.pkl`` with :class:`RestrictedUnpickler`."""
    return safe_loads(Path(path).read_bytes(), source=str(path))


def decode_attr_pickle(raw: Any, source: str) -> dict:
    """The ``attrs["pickle"]`` of a sample file: ``str(pickle.dumps(d))`` (a bytes literal) -> ``d``."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="strict")
    try:
        data = ast.literal_eval(raw)  # parses a literal only; never evaluates code
    except (ValueError, SyntaxError) as e:
        raise DataError(f"{source}: attribute 'pickle' is not a bytes literal ({e})") from None
    if not isinstance(data, bytes):
        raise DataError(f"{source}: attribute 'pickle' is not a bytes literal")
    out = safe_loads(data, source=source)
    if not isinstance(out, dict):
        raise DataError(f"{source}: metadata pickle holds {type(out).__name__}, expected dict")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Task facts
# ----------------------------------------------------------------------------------------------------------------
def _s2(code: str) -> Sentinel2:
    """One Sentinel-2 band with the official name, alt names, resolution (m) and wavelength (µm)."""
    table = {
        "01": ("01 - Coastal aerosol", ("1", "01"), 60, 0.443), "02": ("02 - Blue", ("2", "02", "blue"), 10, 0.49),
        "03": ("03 - Green", ("3", "03", "green"), 10, 0.56), "04": ("04 - Red", ("4", "04", "red"), 10, 0.665),
        "05": ("05 - Vegetation Red Edge", ("5", "05"), 20, 0.705),
        "06": ("06 - Vegetation Red Edge", ("6", "06"), 20, 0.74),
        "07": ("07 - Vegetation Red Edge", ("7", "07"), 20, 0.783), "08": ("08 - NIR", ("8", "08", "NIR"), 10, 0.842),
        "08A": ("08A - Vegetation Red Edge", ("8A", "08A"), 20, 0.865),
        "09": ("09 - Water vapour", ("9", "09"), 60, 0.945), "10": ("10 - SWIR - Cirrus", ("10",), 60, 1.375),
        "11": ("11 - SWIR", ("11",), 20, 1.61), "12": ("12 - SWIR", ("12",), 20, 2.19),
    }  # fmt: skip
    n, alt, res, wl = table[code]
    return Sentinel2(n, alt, res, wl)


_S2_ALL = ["01", "02", "03", "04", "05", "06", "07", "08", "08A", "09", "10", "11", "12"]
_S2_NO_CIRRUS = [c for c in _S2_ALL if c != "10"]


def _rgb(res: float) -> list[SpectralBand]:
    return [SpectralBand("Red", ("red",), res, 0.665), SpectralBand("Green", ("green",), res, 0.56),
            SpectralBand("Blue", ("blue",), res, 0.49)]  # fmt: skip


def _landsat_forestnet() -> list[Landsat8]:
    return [Landsat8("02 - Blue", ("2", "02", "B2", "blue"), 15, 0.482),
            Landsat8("03 - Green", ("3", "03", "B3", "green"), 15, 0.5614),
            Landsat8("04 - Red", ("4", "04", "B4", "red"), 15, 0.6546),
            Landsat8("05 - NIR", ("5", "05", "B5", "nir"), 30, 0.8647),
            Landsat8("06 - SWIR1", ("6", "06", "B6", "swir1"), 30, 1.6089),
            Landsat8("07 - SWIR2", ("7", "07", "B7", "swir2"), 30, 2.2007)]  # fmt: skip


def _s1_8() -> list[Sentinel1]:
    names = ["01 - VH.Real", "02 - VH.Imaginary", "03 - VV.Real", "04 - VV.Imaginary", "05 - VH.LEE Filtered",
             "06 - VV.LEE Filtered", "07 - VH.LEE Filtered.Real", "08 - VV.LEE Filtered.Imaginary"]  # fmt: skip
    return [Sentinel1(n, (), 10) for n in names]


@dataclass(frozen=True)
class TaskInfo:
    """Facts of one GEO-Bench v1 task (official format; sizes are the real ones, fixtures shrink them)."""

    name: str  # on-disk directory name
    benchmark: str
    kind: str  # "classification" | "multilabel" | "segmentation"
    n_classes: int
    class_names: tuple[str, ...]
    patch_size: int  # real H = W in pixels
    gsd: float  # metres
    bands: tuple  # BandInfo stand-ins in file order
    dtype: str  # numpy dtype of the image bands on disk
    dated: bool = False  # band descriptors carry "_YYYY-MM-DD"
    aliases: tuple[str, ...] = ()
    rgb: tuple[str, str, str] = ("red", "green", "blue")
    ignore_class0: bool = False  # paper convention (m-cashew*: class 0 never in test)
    extra: dict = field(default_factory=dict)

    @property
    def is_segmentation(self) -> bool:
        return self.kind == "segmentation"

    @property
    def metric(self) -> str:
        return {"classification": "accuracy", "multilabel": "micro_f1", "segmentation": "miou"}[self.kind]


def _names(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(n))


TASKS: dict[str, TaskInfo] = {t.name: t for t in (
    TaskInfo("m-bigearthnet", CLASSIFICATION, "multilabel", 43, _names("class_", 43), 120, 10.0,
             tuple(_s2(c) for c in _S2_NO_CIRRUS), "float32", aliases=("m-BEnet", "bigearthnet")),
    TaskInfo("m-brick-kiln", CLASSIFICATION, "classification", 2, ("not brick kiln", "brick kiln"), 64, 10.0,
             tuple(_s2(c) for c in _S2_ALL), "float32", aliases=("brick_kiln",)),
    TaskInfo("m-eurosat", CLASSIFICATION, "classification", 10,
             ("Annual Crop", "Forest", "Herbaceous Vegetation", "Highway", "Industrial", "Pasture",
              "Permanent Crop", "Residential", "River", "SeaLake"), 64, 10.0,
             tuple(_s2(c) for c in _S2_ALL), "int16", aliases=("eurosat",)),
    TaskInfo("m-forestnet", CLASSIFICATION, "classification", 12, _names("driver_", 12), 332, 15.0,
             tuple(_landsat_forestnet()), "uint8", dated=True, aliases=("forestnet",)),
    TaskInfo("m-pv4ger", CLASSIFICATION, "classification", 2, ("no solar pv", "solar pv"), 320, 0.1,
             tuple(_rgb(0.1)), "uint8", aliases=("pv4ger",)),
    TaskInfo("m-so2sat", CLASSIFICATION, "classification", 17, _names("lcz_", 17), 32, 10.0,
             tuple(_s1_8()) + tuple(_s2(c) for c in ["02", "03", "04", "05", "06", "07", "08", "08A", "11", "12"]),
             "float32", aliases=("so2sat",)),
    TaskInfo("m-cashew-plant", SEGMENTATION, "segmentation", 7,
             ("no data", "well-managed plantation", "poorly-managed plantation", "non-plantation", "residential",
              "background", "uncertain"), 256, 10.0,
             tuple(_s2(c) for c in _S2_NO_CIRRUS) + (CloudProbability((), 10),), "int16", dated=True,
             aliases=("m-cashew-plantation", "m-cashew", "cashew"), ignore_class0=True),
    TaskInfo("m-chesapeake", SEGMENTATION, "segmentation", 7,
             ("water", "tree-canopy-forest", "low-vegetation-field", "barren-land", "impervious-other",
              "impervious-roads", "no-data"), 256, 1.0,
             tuple(_rgb(1)) + (SpectralBand("NearInfrared", ("nir",), 1, 0.876),), "float32",
             aliases=("m-chesapeake-landcover", "m-chesapeake-lancover", "chesapeake")),
    TaskInfo("m-NeonTree", SEGMENTATION, "segmentation", 2, ("no tree", "tree"), 400, 0.1,
             tuple(_rgb(0.1)) + (ElevationBand("Canopy Height Model", ("lidar", "CHM"), 0.1),
                                 HyperSpectralBands("Neon", (), 1, 369)), "uint8",
             aliases=("m-neontree", "neontree")),
    TaskInfo("m-nz-cattle", SEGMENTATION, "segmentation", 2, ("no cattle", "cattle"), 500, 0.1,
             tuple(_rgb(0.1)), "uint8", dated=True, aliases=("nz-cattle", "m-nz_cattle")),
    TaskInfo("m-pv4ger-seg", SEGMENTATION, "segmentation", 2, ("no solar pv", "solar pv"), 320, 0.1,
             tuple(_rgb(0.1)), "uint8", aliases=("pv4ger-seg",)),
    TaskInfo("m-SA-crop-type", SEGMENTATION, "segmentation", 10,
             ("No Data", "Lucerne/Medics", "Planted pastures (perennial)", "Fallow", "Wine grapes",
              "Weeds", "Small grain grazing", "Wheat", "Canola", "Rooibos"), 256, 10.0,
             tuple(_s2(c) for c in _S2_NO_CIRRUS) + (CloudProbability((), 10),), "int16",
             aliases=("m-sa-crop-type", "sa-crop-type", "m-SA-crop")),
)}  # fmt: skip

CLASSIFICATION_TASKS = [n for n, t in TASKS.items() if t.benchmark == CLASSIFICATION]
SEGMENTATION_TASKS = [n for n, t in TASKS.items() if t.benchmark == SEGMENTATION]
_ALIASES = {a.lower(): n for n, t in TASKS.items() for a in (n, *t.aliases)}


def canonical_task(name: str) -> str:
    """Directory name of a task given its directory name or a paper alias (case-insensitive)."""
    key = name.strip().lower()
    if key not in _ALIASES and not key.startswith("m-") and f"m-{key}" in _ALIASES:
        key = f"m-{key}"
    if key not in _ALIASES:
        raise DataError(f"unknown GEO-Bench task {name!r}; choose from {sorted(TASKS)} (or 'all')")
    return _ALIASES[key]


def resolve_tasks(spec: str | Sequence[str]) -> list[str]:
    """``"all"``, ``"classification"``, ``"segmentation"`` or a comma list / sequence of names -> task names."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in (i.strip() for i in items if i.strip()):
        low = item.lower()
        names = (list(TASKS) if low == "all" else CLASSIFICATION_TASKS if low in ("classification", CLASSIFICATION)
                 else SEGMENTATION_TASKS if low in ("segmentation", SEGMENTATION) else [canonical_task(item)])  # fmt: skip
        out += [n for n in names if n not in out]
    return out


def geo_bench_dir(path: str | os.PathLike | None = None) -> Path:
    """The benchmark root: ``path``, else ``$GEO_BENCH_DIR``, else ``~/dataset/geobench`` (official default)."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("GEO_BENCH_DIR")
    return Path(env).expanduser() if env else Path("~").expanduser() / "dataset" / "geobench"


_DATE_RE = re.compile(r"_(\d{4}-\d{2}-\d{2}(_[\w-]*)?|NoDate)$")


def band_base_name(descriptor: str) -> str:
    """Strip a ``_YYYY-MM-DD`` (or ``_NoDate``) suffix from an HDF5 band key."""
    return _DATE_RE.sub("", descriptor)


# ----------------------------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class BandStats:
    """Per-band statistics from ``band_stats.json`` (values in the units stored on disk)."""

    mean: float
    std: float
    min: float
    max: float
    percentile_1: float | None = None
    percentile_99: float | None = None


class GeoBenchTask:
    """One task directory: metadata, partitions, band selection, and per-sample arrays.

    ``bands``: ``"rgb"`` (default; R, G, B order), ``"all"`` (every image band in file order, hyperspectral cubes
    expanded), or a list of band names / alt names (``["red", "green", "blue", "nir"]``, ``["08 - NIR"]``).
    """

    def __init__(self, task: str, root: str | os.PathLike | None = None):
        self.name = canonical_task(task)
        self.info = TASKS[self.name]
        self.root = geo_bench_dir(root)
        self.dir = self.root / self.info.benchmark / self.name
        if not self.dir.is_dir():
            # tolerate the paper names on disk too (e.g. an old m-cashew-plantation folder)
            for alias in self.info.aliases:
                alt = self.root / self.info.benchmark / alias
                if alt.is_dir():
                    self.dir = alt
                    break
            else:
                raise DataError(
                    f"GEO-Bench task folder {self.dir} not found; set GEO_BENCH_DIR (or --benchmark-dir) to the folder "
                    f"holding {CLASSIFICATION}/ and {SEGMENTATION}/ (download with 'geobench-download', or make a "
                    "synthetic one with 'eo-dinov3 geobench make-fixtures DIR')"
                )

    # -- metadata -------------------------------------------------------------------------------------------------
    @cached_property
    def task_specs(self) -> TaskSpecifications:
        path = self.dir / "task_specs.pkl"
        if not path.is_file():
            raise DataError(f"{path} is missing; the task folder is incomplete")
        specs = safe_load_file(path)
        if not isinstance(specs, TaskSpecifications):
            raise DataError(f"{path} holds {type(specs).__name__}, expected TaskSpecifications")
        return specs

    @cached_property
    def band_infos(self) -> list[BandInfo]:
        return [b for b in self.task_specs.bands_info if not isinstance(b, SegmentationClasses)]

    @cached_property
    def n_classes(self) -> int:
        return int(self.task_specs.label_type.n_classes)

    @cached_property
    def band_stats(self) -> dict[str, BandStats]:
        path = self.dir / "band_stats.json"
        if not path.is_file():
            raise DataError(f"{path} is missing; the task folder is incomplete")
        raw = json.loads(path.read_text())
        return {k: BandStats(float(v["mean"]), float(v["std"]), float(v["min"]), float(v["max"]),
                             v.get("percentile_1"), v.get("percentile_99")) for k, v in raw.items()}  # fmt: skip

    def partitions(self) -> list[str]:
        return sorted(p.name[: -len("_partition.json")] for p in self.dir.glob("*_partition.json"))

    def partition(self, name: str = "default") -> dict[str, list[str]]:
        path = self.dir / f"{name}_partition.json"
        if not path.is_file():
            raise DataError(f"{self.name}: partition {name!r} not found; available: {self.partitions()}")
        part = json.loads(path.read_text())
        bad = set(part) - set(SPLITS)
        if bad:
            raise DataError(f"{path}: unknown split names {sorted(bad)} (expected train/valid/test)")
        return {s: list(part.get(s, [])) for s in SPLITS}

    def split(self, split: str, partition: str = "default") -> list[str]:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; GEO-Bench splits are {SPLITS} (note: 'valid', not 'val')")
        return self.partition(partition)[split]

    # -- bands ----------------------------------------------------------------------------------------------------
    def select_bands(self, bands: str | Sequence[str] = "rgb") -> list[str]:
        """Full band names for a selection (see class doc); raises :class:`DataError` for an unknown name."""
        if isinstance(bands, str):
            low = bands.lower()
            if low == "rgb":
                bands = list(self.info.rgb)
            elif low == "all":
                return [b.name for b in self.band_infos]
            else:
                bands = [b.strip() for b in bands.split(",") if b.strip()]
        lookup: dict[str, str] = {}
        for b in self.band_infos:
            for alias in (b.name, *b.alt_names):
                lookup.setdefault(alias, b.name)
                lookup.setdefault(alias.lower(), b.name)
        out = []
        for name in bands:
            full = lookup.get(name, lookup.get(name.lower()))
            if full is None:
                raise DataError(
                    f"{self.name} has no band {name!r}; bands: {[b.name for b in self.band_infos]} "
                    "(alt names like red/green/blue/nir also work)"
                )
            out.append(full)
        return out

    def band_channels(self, band_names: Sequence[str]) -> int:
        """Number of channels the selection expands to (a hyperspectral cube counts its bands)."""
        by_name = {b.name: b for b in self.band_infos}
        return sum(int(getattr(by_name[n], "n_bands", None) or 1) for n in band_names)

    def scaling(self, band_names: Sequence[str], mode: str = "zscore") -> tuple[np.ndarray, np.ndarray]:
        """Per-channel ``(offset, scale)`` so that ``(x - offset) / scale`` is the model input, from the task's
        ``band_stats.json``: ``zscore`` = (mean, std); ``unit`` = (p1, p99 - p1) (robust [0, 1] scaling, then a
        model preset's mean/std is applied by the caller); ``none`` = (0, 1)."""
        offs, scales = [], []
        by_name = {b.name: b for b in self.band_infos}
        for n in band_names:
            reps = int(getattr(by_name[n], "n_bands", None) or 1)
            if mode == "none":
                o, s = 0.0, 1.0
            else:
                st = self.band_stats.get(n)
                if st is None:
                    raise DataError(f"{self.dir / 'band_stats.json'} has no entry for band {n!r}")
                if mode == "zscore":
                    o, s = st.mean, st.std
                elif mode == "unit":
                    lo = st.percentile_1 if st.percentile_1 is not None else st.min
                    hi = st.percentile_99 if st.percentile_99 is not None else st.max
                    o, s = float(lo), float(hi) - float(lo)
                else:
                    raise DataError(f"unknown scaling {mode!r}; use zscore, unit or none")
            offs += [o] * reps
            scales += [s if s > 0 else 1.0] * reps
        return np.asarray(offs, np.float32), np.asarray(scales, np.float32)

    # -- samples --------------------------------------------------------------------------------------------------
    def sample_path(self, sample: str) -> Path:
        return self.dir / f"{sample}.hdf5"

    def read_sample(self, sample: str, band_names: Sequence[str]) -> tuple[np.ndarray, Any]:
        """One sample: image ``[C, H, W]`` float32 (raw on-disk values, bands in the requested order, lower
        resolution bands resized to the largest band with bilinear interpolation) and the label (int class,
        ``[n_classes]`` 0/1 int array for multi-label, or ``[H, W]`` int64 class map for segmentation)."""
        path = self.sample_path(sample)
        if not path.is_file():
            raise DataError(f"{self.name}: sample file {path} listed in the partition is missing")
        with h5py.File(path, "r") as fp:
            if "pickle" not in fp.attrs:
                raise DataError(f"{path} has no 'pickle' attribute; not a GEO-Bench sample")
            meta = decode_attr_pickle(fp.attrs["pickle"], str(path))
            keys = list(meta.get("bands_order", fp.keys()))
            by_base: dict[str, str] = {}
            for k in keys:
                by_base.setdefault(band_base_name(k), k)
            arrays = []
            for n in band_names:
                key = by_base.get(n)
                if key is None:
                    raise DataError(f"{path} has no band {n!r}; it holds {keys}")
                a = np.asarray(fp[key])
                arrays.append(a[None] if a.ndim == 2 else np.moveaxis(a, -1, 0))
            if self.info.is_segmentation:
                lkey = "label" if "label" in fp else next((k for k in keys if k.startswith("label")), None)
                if lkey is None:
                    raise DataError(f"{path} has no 'label' band")
                label: Any = np.asarray(fp[lkey]).astype(np.int64)
            else:
                if "label" not in meta:
                    raise DataError(f"{path}: the metadata pickle has no 'label'")
                label = meta["label"]
                label = np.asarray(label).astype(np.int64) if self.info.kind == "multilabel" else int(label)
        if not arrays:
            return np.zeros((0, 1, 1), np.float32), label
        h = max(a.shape[1] for a in arrays)
        w = max(a.shape[2] for a in arrays)
        out = [a.astype(np.float32) if a.shape[1:] == (h, w) else _resize_chw(a.astype(np.float32), h, w)
               for a in arrays]  # fmt: skip
        return np.concatenate(out, 0), label

    def label_only(self, sample: str) -> Any:
        """The label of a sample (no image band read)."""
        return self.read_sample(sample, [])[1]


def _resize_chw(a: np.ndarray, h: int, w: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(a))[None]
    return F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0].numpy()


def load_normalizer(path: str | os.PathLike) -> dict[str, tuple[float, float]]:
    """``normalizer.json`` -> ``{task dir name: (min, max)}`` (keys given as paper aliases are mapped too)."""
    raw = json.loads(Path(path).read_text())
    out = {}
    for k, v in raw.items():
        try:
            name = canonical_task(k)
        except DataError:
            name = k
        out[name] = (float(v[0]), float(v[1]))
    return out
