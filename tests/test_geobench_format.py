"""GEO-Bench v1 reader and fixture generator: layout, band selection, partitions, scaling, restricted unpickling."""

from __future__ import annotations

import json
import pickle
import sys

import h5py
import numpy as np
import pytest

from eo_dinov3.errors import DataError
from eo_dinov3.evaluation import geobench_format as gf
from eo_dinov3.evaluation.geobench_fixtures import make_fixtures, official_dumps


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return make_fixtures(tmp_path_factory.mktemp("geobench"), size=16, seed=0)


def test_all_twelve_tasks_written_in_official_layout(bench):
    assert len(gf.TASKS) == 12
    for name, info in gf.TASKS.items():
        d = bench / info.benchmark / name
        assert (d / "task_specs.pkl").is_file() and (d / "band_stats.json").is_file()
        parts = {p.name for p in d.glob("*_partition.json")}
        assert parts == {f"{p}_partition.json" for p in gf.PARTITIONS}
        assert any(d.glob("id_*.hdf5"))
    for b in (gf.CLASSIFICATION, gf.SEGMENTATION):
        norm = json.loads((bench / b / "normalizer.json").read_text())
        assert set(norm) == {n for n, t in gf.TASKS.items() if t.benchmark == b}


def test_paper_names_are_aliases():
    assert gf.canonical_task("m-cashew-plantation") == "m-cashew-plant"
    assert gf.canonical_task("m-chesapeake-landcover") == "m-chesapeake"
    assert gf.canonical_task("eurosat") == "m-eurosat"
    assert gf.resolve_tasks("all") == list(gf.TASKS)
    assert gf.resolve_tasks("segmentation,m-eurosat")[-1] == "m-eurosat"
    with pytest.raises(DataError, match="unknown GEO-Bench task"):
        gf.canonical_task("m-imagenet")


def test_geo_bench_dir_env(bench, monkeypatch):
    monkeypatch.setenv("GEO_BENCH_DIR", str(bench))
    t = gf.GeoBenchTask("m-cashew-plantation")
    assert t.dir == bench / gf.SEGMENTATION / "m-cashew-plant"
    monkeypatch.setenv("GEO_BENCH_DIR", str(bench / "nowhere"))
    with pytest.raises(DataError, match="GEO_BENCH_DIR"):
        gf.GeoBenchTask("m-eurosat")


def test_band_selection_order_and_aliases(bench):
    eu = gf.GeoBenchTask("m-eurosat", bench)
    assert eu.select_bands("rgb") == ["04 - Red", "03 - Green", "02 - Blue"]
    assert len(eu.select_bands("all")) == 13
    assert eu.select_bands(["8A", "nir"]) == ["08A - Vegetation Red Edge", "08 - NIR"]
    with pytest.raises(DataError, match="no band"):
        eu.select_bands(["thermal"])
    so = gf.GeoBenchTask("m-so2sat", bench)
    allb = so.select_bands("all")
    assert allb[0] == "01 - VH.Real" and allb[8] == "02 - Blue" and len(allb) == 18  # S1 first, then S2
    assert gf.GeoBenchTask("m-chesapeake", bench).select_bands("red,green,blue,nir")[-1] == "NearInfrared"


def test_read_sample_matches_raw_hdf5_and_dated_keys(bench):
    t = gf.GeoBenchTask("m-forestnet", bench)
    name = t.split("train")[0]
    with h5py.File(t.sample_path(name), "r") as fp:
        keys = list(fp.keys())
        raw_red = np.asarray(fp["04 - Red_2020-06-15"])
    assert all(k.endswith("_2020-06-15") for k in keys)
    x, y = t.read_sample(name, t.select_bands("rgb"))
    assert x.shape == (3, 16, 16) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0], raw_red.astype(np.float32))
    assert isinstance(y, int) and 0 <= y < 12


def test_labels_multilabel_segmentation_and_neon_cube(bench):
    ben = gf.GeoBenchTask("m-bigearthnet", bench)
    _, y = ben.read_sample(ben.split("test")[0], ben.select_bands(["red"]))
    assert y.shape == (43,) and set(np.unique(y)) <= {0, 1}
    neon = gf.GeoBenchTask("m-NeonTree", bench)
    x, lab = neon.read_sample(neon.split("train")[0], neon.select_bands("all"))
    assert x.shape == (3 + 1 + 369, 40, 40)  # CHM and 369-band cube at 1 m resized to the 0.1 m grid
    assert lab.shape == (40, 40) and lab.dtype == np.int64
    cashew = gf.GeoBenchTask("m-cashew-plant", bench)
    test_labels = np.concatenate([cashew.label_only(n).ravel() for n in cashew.split("test")])
    assert 0 not in test_labels  # like the real data: class 0 never in the test split


def test_partitions_subsample_train_only(bench):
    t = gf.GeoBenchTask("m-eurosat", bench)
    d, p = t.partition("default"), t.partition("0.01x_train")
    assert set(p["train"]) <= set(d["train"]) and 1 <= len(p["train"]) < len(d["train"])
    assert p["valid"] == d["valid"] and p["test"] == d["test"]
    with pytest.raises(DataError, match="not found"):
        t.partition("0.3x_train")
    with pytest.raises(DataError, match="'valid', not 'val'"):
        t.split("val")


def test_zscore_scaling_uses_band_stats(bench):
    t = gf.GeoBenchTask("m-eurosat", bench)
    stats = json.loads((t.dir / "band_stats.json").read_text())
    off, scale = t.scaling(t.select_bands("rgb"), "zscore")
    assert off[0] == pytest.approx(stats["04 - Red"]["mean"]) and scale[2] == pytest.approx(stats["02 - Blue"]["std"])
    off, scale = t.scaling(["04 - Red"], "unit")
    assert off[0] == pytest.approx(stats["04 - Red"]["percentile_1"])


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_sample_pickle_is_refused(bench, tmp_path, monkeypatch):
    t = gf.GeoBenchTask("m-eurosat", bench)
    name = t.split("test")[0]
    with h5py.File(t.sample_path(name), "r") as fp:
        meta = gf.decode_attr_pickle(fp.attrs["pickle"], "x")
    meta["label"] = _Evil()
    bad = tmp_path / f"{name}.hdf5"
    with h5py.File(t.sample_path(name), "r") as src, h5py.File(bad, "w") as dst:
        for k in src:
            dst.create_dataset(k, data=np.asarray(src[k]))
        dst.attrs["pickle"] = str(official_dumps(meta))  # genuine metadata + one evil object
    called = []
    monkeypatch.setattr("os.system", lambda cmd: called.append(cmd))  # records an execution, if any
    with pytest.raises(gf.UnsafePickleError, match=r"refusing to unpickle (posix|nt)\.system .*may be malicious"):
        with h5py.File(bad, "r") as fp:
            gf.decode_attr_pickle(fp.attrs["pickle"], str(bad))
    assert called == []
    # the reader refuses it too (and names the file)
    import shutil

    evil_task = tmp_path / "bench"
    shutil.copytree(t.dir, evil_task / gf.CLASSIFICATION / "m-eurosat")
    shutil.copy(bad, evil_task / gf.CLASSIFICATION / "m-eurosat" / f"{name}.hdf5")
    t2 = gf.GeoBenchTask("m-eurosat", evil_task)
    with pytest.raises(gf.UnsafePickleError, match=f"{name}.hdf5"):
        t2.read_sample(name, t2.select_bands("rgb"))
    assert called == []


def test_malicious_task_specs_and_object_arrays_refused(tmp_path):
    (tmp_path / "task_specs.pkl").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(gf.UnsafePickleError):
        gf.safe_load_file(tmp_path / "task_specs.pkl")
    with pytest.raises(DataError, match="object dtypes"):
        gf.safe_loads(pickle.dumps(np.array([1, "a"], dtype=object)))
    ok = gf.safe_loads(pickle.dumps({"label": np.arange(3, dtype=np.int16), "x": np.float32(2.5)}))
    assert ok["label"].dtype == np.int16 and ok["x"] == 2.5


def test_pickles_name_official_classes(bench):
    raw = (bench / gf.CLASSIFICATION / "m-eurosat" / "task_specs.pkl").read_bytes()
    assert b"geobench.task" in raw and b"TaskSpecifications" in raw and b"geobench.label" in raw
    specs = gf.safe_loads(official_dumps(gf.Sentinel2("04 - Red", ("red",), 10, 0.665)))
    assert isinstance(specs, gf.Sentinel2) and specs.alt_names == ("red",)


def test_official_geobench_reads_fixtures(bench, monkeypatch):
    """The official ``geobench`` package (when importable) reads our fixtures and agrees with our reader."""
    monkeypatch.setenv("GEO_BENCH_DIR", str(bench))
    for mod in [m for m in sys.modules if m == "geobench" or m.startswith("geobench.")]:
        monkeypatch.delitem(sys.modules, mod)
    geobench = pytest.importorskip("geobench")
    if not hasattr(geobench, "task_iterator"):  # e.g. the repo's own geobench/ script folder (namespace package)
        pytest.skip("the official geobench package is not installed")
    n = 0
    for bench_name in (gf.CLASSIFICATION, gf.SEGMENTATION):
        for spec in geobench.task_iterator(benchmark_name=bench_name, benchmark_dir=bench / bench_name):
            ds = geobench.GeobenchDataset(bench / bench_name / spec.dataset_name, split="test",
                                          band_names=("red", "green", "blue"))  # fmt: skip
            sample = ds[0]
            x, _ = sample.pack_to_3d(band_names=ds.band_names, resample=True)
            ours = gf.GeoBenchTask(spec.dataset_name, bench)
            mine, label = ours.read_sample(ours.split("test")[0], ours.select_bands("rgb"))
            np.testing.assert_allclose(np.moveaxis(x, -1, 0).astype(np.float32), mine)
            if ours.info.is_segmentation:
                np.testing.assert_array_equal(sample.label.data, label)
            else:
                np.testing.assert_array_equal(np.asarray(sample.label), label)
            n += 1
    assert n == 12
