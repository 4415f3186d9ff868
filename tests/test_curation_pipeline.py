"""End-to-end curation on synthetic GeoTIFF tiles (distinct colour/texture per land-cover type) with a tiny
random ViT: embedding store (resume, rank split, dask), pipeline mix, output manifest, report, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.transform import from_origin

from eo_dinov3.data.curation.embed import EmbedJob, embed_manifest
from eo_dinov3.data.curation.embedder import EmbedderSpec
from eo_dinov3.data.curation.pipeline import load_config, run_curation
from eo_dinov3.data.curation.store import EmbeddingStore
from eo_dinov3.data.manifest import read_manifest, write_manifest
from eo_dinov3.errors import ConfigError

TINY = {"embed_dim": 48, "depth": 1, "num_heads": 2, "ffn_ratio": 2.0}
#: land-cover type -> (RGB base colour, texture)
TYPES = {"water": ((30, 60, 140), "flat"), "forest": ((30, 110, 40), "blobs"), "urban": ((150, 150, 150), "grid"),
         "sand": ((210, 190, 120), "stripes")}
COUNTS = {"water": 36, "forest": 4, "urban": 4, "sand": 4}  # water = 75 % of the archive


def make_tile(kind: str, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    base, texture = TYPES[kind]
    yy, xx = np.mgrid[0:size, 0:size]
    pattern = {"flat": np.zeros((size, size)), "blobs": np.sin(xx / 3.0 + rng.uniform(0, 6)) * np.cos(yy / 3.0),
               "grid": ((xx % 8 < 2) | (yy % 8 < 2)).astype(float), "stripes": np.sin(xx / 1.5)}[texture]
    img = np.stack([c + 40 * pattern + rng.normal(0, 4, (size, size)) for c in base])
    return np.clip(img, 0, 255).astype(np.uint8)


def write_tiles(folder: Path, counts: dict[str, int], seed: int = 0, duplicate: str | None = None,
                name: str = "manifest.parquet") -> Path:
    """GeoTIFF tiles + manifest ``name`` (column ``kind`` = true type); ``duplicate``: copy that type's first
    tile."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    kinds = [k for k, n in counts.items() for _ in range(n)]
    for i, kind in enumerate(kinds):
        img = make_tile(kind, rng)
        names = [f"{kind}_{i:03d}.tif"]
        if duplicate == kind and (not rows or all(r["kind"] != kind for r in rows)):
            names.append(f"{kind}_{i:03d}_copy.tif")
        for fname in names:
            with rasterio.open(folder / fname, "w", driver="GTiff", width=32, height=32, count=3, dtype="uint8",
                               crs="EPSG:32610", transform=from_origin(500000 + 32 * i, 4e6, 1.0, 1.0)) as dst:
                dst.write(img)
            rows.append({"path": fname, "width": 32, "height": 32, "crs": "EPSG:32610", "gsd_m": 1.0, "kind": kind})
    return write_manifest(pd.DataFrame(rows), folder / name)


def spec() -> EmbedderSpec:
    return EmbedderSpec(backbone="dinov3_vits16", overrides=TINY, image_size=32, pooling="patch_mean")


def config(manifest: Path, out: Path, **values) -> dict:
    base = {"manifest": str(manifest), "output_dir": str(out), "device": "cpu",
            "embed": {"backbone": "dinov3_vits16", "overrides": TINY, "image_size": 32, "pooling": "patch_mean",
                      "batch_size": 8, "block_rows": 16},
            "cluster": {"levels": [{"n_clusters": 8}, {"n_clusters": 4, "n_resamples": 3, "sample_size": 1}],
                        "n_iters": 30},
            "dedup": {"threshold": 0.99999},
            "sample": {"target_size": 16},
            "output": {"grid_clusters": 4, "grid_examples": 4}}
    for k, v in values.items():
        base.setdefault(k, {})
        base[k] = {**base[k], **v} if isinstance(v, dict) else v
    return load_config(**base)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return write_tiles(tmp_path_factory.mktemp("archive"), COUNTS, duplicate="sand")


def _store_arrays(root: Path) -> tuple[np.ndarray, np.ndarray]:
    s = EmbeddingStore(root)
    return s.ids(), np.concatenate([c for _, c in s.iter_chunks(1000)])


def test_embed_resume_and_rank_split(archive, tmp_path):
    job = EmbedJob(manifest=str(archive), out_dir=str(tmp_path / "a"), spec=spec(), block_rows=16, batch_size=8,
                   device="cpu")
    store = embed_manifest(job, max_units=1)  # "interrupted" after the first unit
    assert store.completed_units() == [0] and not store.is_complete()
    first = (tmp_path / "a" / "unit-000000.emb.npy").stat().st_mtime_ns
    store = embed_manifest(job)  # resumes: unit 0 is not redone
    assert store.is_complete() and store.num_rows == 49
    assert (tmp_path / "a" / "unit-000000.emb.npy").stat().st_mtime_ns == first
    ids, emb = _store_arrays(tmp_path / "a")
    assert np.array_equal(ids, np.arange(49)) and emb.shape == (49, 48)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=2e-3)  # float16 unit vectors
    # torchrun-style split: two ranks write disjoint units of the same store, same result
    job2 = EmbedJob(**{**job.__dict__, "out_dir": str(tmp_path / "b")})
    embed_manifest(job2, rank=1, world_size=2)
    assert EmbeddingStore(tmp_path / "b").completed_units() == [1, 3]  # 49 rows = 4 units of 16
    embed_manifest(job2, rank=0, world_size=2)
    ids2, emb2 = _store_arrays(tmp_path / "b")
    assert np.array_equal(ids, ids2) and np.array_equal(emb, emb2)
    with pytest.raises(Exception, match="other settings"):
        embed_manifest(EmbedJob(**{**job.__dict__, "spec": EmbedderSpec(overrides=TINY, image_size=48,
                                                                         pooling="patch_mean")}))


@pytest.mark.slow
def test_embed_on_dask_cluster_matches_single_process(archive, tmp_path):
    distributed = pytest.importorskip("distributed")
    from eo_dinov3.data.curation.embed import embed_manifest_dask

    job = EmbedJob(manifest=str(archive), out_dir=str(tmp_path / "single"), spec=spec(), block_rows=16,
                   device="cpu")
    embed_manifest(job)
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as client:
        embed_manifest_dask(EmbedJob(**{**job.__dict__, "out_dir": str(tmp_path / "dask")}), client)
    a, b = _store_arrays(tmp_path / "single"), _store_arrays(tmp_path / "dask")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_pipeline_balances_retrieves_dedups_and_reports(archive, tmp_path):
    seeds = write_tiles(tmp_path / "seeds", {"urban": 2}, seed=7, name="seeds.csv")
    cfg = config(archive, tmp_path / "run", sample={"retrieval": {"seed_manifest": str(seeds), "fraction": 0.25}})
    summary = run_curation(cfg)
    out = read_manifest(summary["output_manifest"])  # a valid manifest for pretraining
    assert summary["output_manifest"].endswith(".parquet") and len(out) == 16
    assert {"manifest_row", "curation_source", "curation_score", "cluster_l1", "cluster_l2"} <= set(out.columns)
    assert all(Path(p).is_absolute() and Path(p).exists() for p in out["path"])
    src = read_manifest(archive)
    assert list(src["path"].iloc[out["manifest_row"]].map(lambda p: str(archive.parent / p))) == list(out["path"])
    retrieved = out[out.curation_source == "retrieval"]
    assert len(retrieved) == 4 and (retrieved["kind"] == "urban").all()  # 25 % nearest to the urban seeds
    kinds = out["kind"].value_counts()
    assert kinds["water"] <= 6  # 36/49 = 73 % of the archive -> ~ a quarter of the balanced part
    assert set(kinds.index) == set(TYPES)
    rep = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    assert rep["duplicates_removed"] >= 1 and summary["duplicates_removed"] == rep["duplicates_removed"]
    dup_rows = src.index[src["path"].str.startswith("sand_") & (src["path"].str.len() <= 12)][0]
    copy_row = src.index[src["path"].str.endswith("_copy.tif")][0]
    assert not {dup_rows, copy_row} <= set(out["manifest_row"])  # never both copies
    assert rep["levels"][1]["after"]["largest_share"] < rep["levels"][1]["before"]["largest_share"]
    for f in ("clusters_grid.png", "cluster_sizes.csv", "cluster_sizes.png"):
        assert (tmp_path / "run" / "report" / f).stat().st_size > 0
    sizes = pd.read_csv(tmp_path / "run" / "report" / "cluster_sizes.csv")
    assert sizes.groupby("level")["size_before"].sum().tolist() == [49, 49]
    assert sizes.groupby("level")["size_after"].sum().tolist() == [16, 16]
    # rerun: embeddings and clusters are reused, the result is identical
    mtime = (tmp_path / "run" / "hierarchy.npz").stat().st_mtime_ns
    again = run_curation(cfg)
    assert (tmp_path / "run" / "hierarchy.npz").stat().st_mtime_ns == mtime
    pd.testing.assert_frame_equal(read_manifest(again["output_manifest"]), out)


def test_cli_curate_and_config_errors(archive, tmp_path, capsys):
    from eo_dinov3.cli import main

    rc = main(["curate", f"manifest={archive}", f"output_dir={tmp_path / 'cli'}", "device=cpu",
               "embed.image_size=32", "embed.pooling=patch_mean", "embed.block_rows=64",
               "embed.overrides={embed_dim: 48, depth: 1, num_heads: 2}",
               "cluster.levels=[{n_clusters: 6}, {n_clusters: 3}]", "sample.target_size=9", "dedup.threshold=null",
               "output.manifest=curated.csv", "output.report=false"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["selected"] == 9 and len(read_manifest(tmp_path / "cli" / "curated.csv")) == 9
    assert main(["curate", f"manifest={archive}", f"output_dir={tmp_path}", "sample.size=3"]) == 2
    assert "unknown curation config key" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="output_dir"):
        load_config(manifest=str(archive))
