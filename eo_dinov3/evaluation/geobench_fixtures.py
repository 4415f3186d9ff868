"""Synthetic GEO-Bench v1 benchmark in exactly the official on-disk format, with a planted, learnable signal.

All 12 tasks, the official band descriptors (date suffixes where the real data has them), dtypes, label layout
(int / multi-hot in the metadata pickle for classification, ``label`` dataset for segmentation), ``task_specs.pkl``,
``band_stats.json`` (computed from the written samples like the official ``compute_dataset_statistics``),
``default_partition.json`` + the seven ``{f}x_train`` partitions, ``label_stats.json`` and a per-benchmark
``normalizer.json``. Pickles reference the official class paths (``geobench.dataset.Sentinel2`` …) so the official
package reads them.

Planted signal (in z-score units of each band): every class ``c`` has a random per-band offset ``mu_c`` and a
class-specific stripe texture; pixel values are ``mean_b + std_b * (mu_c[b] + texture + 0.35 * noise)``. Segmentation
labels are blocks of ``size / 4`` pixels, each block one class with its offset and texture,
so a linear head on patch tokens can learn them.
m-cashew-plant's test split never contains class 0 (as in the real data). Deterministic for a given ``seed``.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pickle
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from eo_dinov3.evaluation import geobench_format as gf

#: realistic per-band (mean, std) of the on-disk values, by dtype family
_VALUE_SCALE = {"int16": (1500.0, 600.0), "uint8": (110.0, 40.0), "float32": (0.0, 0.0)}
_FLOAT_SCALE = {"m-bigearthnet": (1200.0, 700.0), "m-brick-kiln": (1400.0, 500.0), "m-so2sat": (0.12, 0.06),
                "m-chesapeake": (100.0, 40.0)}  # fmt: skip
FRACTIONS = ("0.01x_train", "0.02x_train", "0.05x_train", "0.10x_train", "0.20x_train", "0.50x_train", "1.00x_train")


class _OfficialNamePickler(pickle._Pickler):  # type: ignore[name-defined]
    """Pure-Python pickler that names our stand-in classes by their official module path (geobench.dataset …)."""

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if isinstance(obj, type) and gf.GEOBENCH_CLASSES.get(obj.__name__) is obj:
            self.save(gf.OFFICIAL_MODULE[obj.__name__])
            self.save(obj.__name__)
            self.write(pickle.STACK_GLOBAL)
            self.memoize(obj)
            return
        super().save_global(obj, name)


def official_dumps(obj: Any) -> bytes:
    """``pickle.dumps(obj, protocol=4)`` with GEO-Bench stand-ins written under their official class paths."""
    import io

    buf = io.BytesIO()
    _OfficialNamePickler(buf, protocol=4).dump(obj)
    return buf.getvalue()


def _sizes(info: gf.TaskInfo) -> tuple[int, int, int]:
    if info.is_segmentation:
        return 12, 4, 6
    c = 6 if info.kind == "multilabel" else info.n_classes
    return max(24, 3 * c), max(12, c), max(24, 2 * c)


def _scale(info: gf.TaskInfo) -> tuple[float, float]:
    return _FLOAT_SCALE.get(info.name, (1000.0, 400.0)) if info.dtype == "float32" else _VALUE_SCALE[info.dtype]


def _texture(c: int, size: int) -> np.ndarray:
    """Class-specific stripes ``[size, size]`` (orientation and frequency from the class id), amplitude 0.6."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = math.pi * (c * 0.618 % 1.0)
    freq = 1.0 + (c % 4)
    return 0.6 * np.cos(2 * math.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))


def _to_dtype(z: np.ndarray, mean: float, std: float, dtype: str) -> np.ndarray:
    x = mean + std * z
    if dtype == "uint8":
        return np.clip(np.round(x), 0, 255).astype(np.uint8)
    if dtype == "int16":
        return np.clip(np.round(x), 0, 32767).astype(np.int16)
    return x.astype(np.float32)


def _band_list(info: gf.TaskInfo) -> list[gf.BandInfo]:
    return list(info.bands)


def write_task(root: Path, info: gf.TaskInfo, *, size: int = 32, seed: int = 0,
               n_splits: tuple[int, int, int] | None = None) -> Path:  # fmt: skip
    """Write one task folder under ``root/<benchmark>/<name>``; returns the folder."""
    rng = np.random.default_rng([seed, sum(map(ord, info.name))])
    task_dir = root / info.benchmark / info.name
    task_dir.mkdir(parents=True, exist_ok=True)
    n_train, n_valid, n_test = n_splits or _sizes(info)
    bands = _band_list(info)
    n_chan = sum(int(getattr(b, "n_bands", None) or 1) for b in bands)
    n_signal = info.n_classes
    mu = rng.normal(0.0, 1.0, size=(n_signal, n_chan))  # class offsets in z units, per channel
    v_mean, v_std = _scale(info)
    band_mean = v_mean * rng.uniform(0.8, 1.2, n_chan)
    band_std = v_std * rng.uniform(0.8, 1.2, n_chan)
    if info.name == "m-so2sat":  # S1 complex parts are centred on zero
        band_mean[:8] = 0.0
    date = datetime.date(2020, 6, 15) if info.dated else None
    res = info.gsd
    seg_label = (gf.SegmentationClasses("label", res, info.n_classes, list(info.class_names))
                 if info.is_segmentation else None)  # fmt: skip

    names: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    label_stats: dict[str, list[float]] = {}
    values: dict[str, list[np.ndarray]] = {}
    idx = 0
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        for i in range(n):
            name = f"id_{idx:06d}"
            idx += 1
            z = 0.35 * rng.normal(size=(n_chan, size, size))
            label: Any
            if info.kind == "classification":
                c = i % info.n_classes  # balanced
                z += mu[c][:, None, None] + _texture(c, size)[None]
                label = int(c)
            elif info.kind == "multilabel":
                active = rng.random(6) < 0.4  # signal on the first 6 of 43 labels
                if not active.any():
                    active[rng.integers(6)] = True
                label = np.zeros(info.n_classes, dtype=np.int64)
                label[:6] = active
                for k in np.flatnonzero(active):
                    z += 0.8 * mu[k][:, None, None] + 0.5 * _texture(k, size)[None]
            else:
                block = size // 4
                lo = 1 if (info.ignore_class0 and split == "test") else 0
                grid = rng.integers(lo, info.n_classes, size=(4, 4))
                grid.flat[: info.n_classes - lo] = np.arange(lo, info.n_classes)[: grid.size]  # all classes present
                grid = grid.reshape(-1)[rng.permutation(16)].reshape(4, 4)
                label = np.kron(grid, np.ones((block, block), dtype=np.int64)).astype(np.int16)
                lab = label.astype(np.int64)
                tex = np.stack([_texture(c, size) for c in range(info.n_classes)])  # [C, size, size]
                yy, xx = np.mgrid[0:size, 0:size]
                z += mu[lab].transpose(2, 0, 1) + tex[lab, yy, xx][None]
            _write_sample(task_dir / f"{name}.hdf5", info, bands, z, band_mean, band_std, date, res, label,
                          seg_label)  # fmt: skip
            names[split].append(name)
            # stats as the official converter computes them: per band, over the written values
            ch = 0
            for b in bands:
                nb = int(getattr(b, "n_bands", None) or 1)
                arr = _to_dtype(z[ch : ch + nb], band_mean[ch], band_std[ch], _band_dtype(info, b))
                values.setdefault(b.name, []).append(arr.reshape(-1)[:: max(1, arr.size // 1000)])
                ch += nb
            if info.is_segmentation:
                counts = np.bincount(np.asarray(label, np.int64).reshape(-1), minlength=info.n_classes)
                label_stats[name] = (counts / counts.sum()).tolist()
            elif info.kind == "multilabel":
                label_stats[name] = np.asarray(label, float).tolist()

    # task_specs.pkl
    if info.kind == "classification":
        label_type: Any = gf.Classification(info.n_classes, list(info.class_names))
    elif info.kind == "multilabel":
        label_type = gf.MultiLabelClassification(info.n_classes, list(info.class_names))
    else:
        label_type = seg_label
    specs = gf.TaskSpecifications(dataset_name=info.name, bands_info=bands, spatial_resolution=res,
                                  benchmark_name=info.benchmark, patch_size=(size, size), n_time_steps=1,
                                  label_type=label_type)  # fmt: skip
    (task_dir / "task_specs.pkl").write_bytes(official_dumps(specs))

    stats = {}
    for bname, vals in values.items():
        v = np.concatenate(vals).astype(np.float64)
        q = np.percentile(v, [0.1, 1, 5, 50, 95, 99, 99.9])
        stats[bname] = dict(min=float(v.min()), max=float(v.max()), mean=float(v.mean()), std=float(v.std()),
                            median=float(q[3]), percentile_0_1=float(q[0]), percentile_1=float(q[1]),
                            percentile_5=float(q[2]), percentile_95=float(q[4]), percentile_99=float(q[5]),
                            percentile_99_9=float(q[6]))  # fmt: skip
    (task_dir / "band_stats.json").write_text(json.dumps(stats, indent=2))

    (task_dir / "default_partition.json").write_text(json.dumps(names, indent=2))
    prng = np.random.default_rng([seed, 7])
    for frac in FRACTIONS:
        f = float(frac.split("x")[0])
        k = max(1, int(round(f * len(names["train"]))))
        sub = sorted(prng.choice(names["train"], size=k, replace=False).tolist())
        (task_dir / f"{frac}_partition.json").write_text(
            json.dumps({"train": sub, "valid": names["valid"], "test": names["test"]}, indent=2)
        )
    if label_stats:
        (task_dir / "label_stats.json").write_text(json.dumps(label_stats))
    return task_dir


def _band_dtype(info: gf.TaskInfo, band: gf.BandInfo) -> str:
    if isinstance(band, gf.ElevationBand):
        return "float32"
    if isinstance(band, gf.HyperSpectralBands):
        return "int16"
    return info.dtype


def _write_sample(path: Path, info: gf.TaskInfo, bands: Sequence[gf.BandInfo], z: np.ndarray, band_mean, band_std,
                  date, res: float, label: Any, seg_label) -> None:  # fmt: skip
    attr: dict[str, Any] = {}
    order: list[str] = []
    with h5py.File(path, "w") as fp:
        ch = 0
        for b in bands:
            nb = int(getattr(b, "n_bands", None) or 1)
            data = _to_dtype(z[ch : ch + nb], band_mean[ch], band_std[ch], _band_dtype(info, b))
            b_res = res
            if isinstance(b, (gf.HyperSpectralBands, gf.ElevationBand)) and info.name == "m-NeonTree":
                # NeonTree: CHM and hyperspectral at 1 m (1/10 of the 0.1 m RGB grid)
                f = 10
                data = data.reshape(nb, data.shape[1] // f, f, data.shape[2] // f, f).mean((2, 4)).astype(data.dtype)
                b_res = 1.0
            data = data[0] if nb == 1 else np.moveaxis(data, 0, -1)  # 2-D band, or [H, W, n] cube
            desc = b.name + (f"_{date.strftime('%Y-%m-%d')}" if date is not None else "")
            fp.create_dataset(desc, data=data)
            attr[desc] = dict(date=date, date_id=date, spatial_resolution=b_res, band_info=b, meta_info=None,
                              transform=None, crs=None)  # fmt: skip
            order.append(desc)
            ch += nb
        if seg_label is not None:
            fp.create_dataset("label", data=np.asarray(label, np.int16))
            attr["label"] = dict(date=None, date_id=None, spatial_resolution=res, band_info=seg_label,
                                 meta_info=None, transform=None, crs=None)  # fmt: skip
            order.append("label")
        else:
            attr["label"] = label
        attr["bands_order"] = order
        fp.attrs["pickle"] = str(official_dumps(attr))


def make_fixtures(out: str | os.PathLike, *, tasks: str | Sequence[str] = "all", size: int = 32,
                  seed: int = 0) -> Path:  # fmt: skip
    """Write the synthetic benchmark under ``out`` (``out/classification_v1.0``, ``out/segmentation_v1.0``).

    ``size``: image side in pixels (multiple of 4; NeonTree needs a multiple of 40 for its 1 m bands, so it uses
    ``max(40, size rounded to 40)``). Returns ``out``."""
    root = Path(out)
    names = gf.resolve_tasks(tasks)
    normalizers: dict[str, dict[str, list[float]]] = {}
    for name in names:
        info = gf.TASKS[name]
        s = max(40, 40 * round(size / 40)) if name == "m-NeonTree" else size
        if s % 4:
            raise ValueError(f"size must be a multiple of 4, got {size}")
        write_task(root, info, size=s, seed=seed)
        lo = 0.0 if info.kind == "multilabel" else (1.0 / info.n_classes if not info.is_segmentation else 0.2)
        normalizers.setdefault(info.benchmark, {})[name] = [round(lo, 4), 1.0]
    for bench, d in normalizers.items():
        path = root / bench / "normalizer.json"
        old = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps({**old, **d}, indent=2))
    return root
