"""The curation pipeline: embed → hierarchical k-means → de-duplicate → retrieval + balanced mix → manifest,
report.

Configuration (YAML, see ``configs/curation/*.yaml``; every key has a default in :data:`DEFAULTS`)::

    manifest: tiles/manifest.parquet     # or samples:tiles (the sample NEON tiles)
    output_dir: runs/curation
    seed: 0
    device: auto                         # cuda when present
    embed:   {backbone, weights, overrides, image_size, normalization, bands, pooling, batch_size, num_workers,
              block_rows, dtype, max_nodata_fraction}
    cluster: {levels: [{n_clusters, n_resamples, sample_size, sample_strategy}, ...], n_iters, chunk_rows}
    dedup:   {threshold: 0.98}           # null: keep near duplicates
    sample:  {target_size: N, strategy: random|closest,
              retrieval: {seed_manifest: forest.csv, fraction: 0.1}}   # 10 % nearest to the seeds, 90 % balanced
    output:  {manifest: curated.parquet, report: true, grid_clusters: 12, grid_examples: 8}

Every step writes its result into ``output_dir`` and is skipped when that result exists for the same settings
(``embeddings/`` store units, ``hierarchy.npz`` + ``hierarchy.json``), so a rerun resumes.
The output manifest has the input columns (``path`` made absolute) plus ``manifest_row`` (0-based row of the input
manifest), ``curation_source`` (``retrieval``/``balanced``), ``curation_score`` (retrieval cosine, NaN for
balanced) and ``cluster_l1`` … ``cluster_lL`` (cluster at each level, 1 = leaves). Pretraining reads it as any
manifest (``data.path=.../curated.parquet``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eo_dinov3.data.curation.dedup import near_duplicates
from eo_dinov3.data.curation.embed import EmbedJob, embed_manifest, embed_manifest_dask, resolve_device, unit_offsets
from eo_dinov3.data.curation.embedder import EmbedderSpec
from eo_dinov3.data.curation.hierarchy import (ALGORITHM_VERSION, Hierarchy, hierarchical_kmeans,
                                                levels_from_config)
from eo_dinov3.data.curation.retrieval import retrieve_nearest
from eo_dinov3.data.curation.sampling import balanced_sample
from eo_dinov3.data.curation.store import ArrayRows, EmbeddingStore
from eo_dinov3.data.manifest import ManifestReader, resolve_tile_path, write_manifest
from eo_dinov3.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "manifest": None,
    "output_dir": None,
    "seed": 0,
    "device": "auto",
    "embed": {"backbone": "dinov3_vits16", "weights": None, "overrides": {}, "image_size": 224,
              "normalization": "sat493m", "bands": [1, 2, 3], "pooling": "cls", "batch_size": 64, "num_workers": 0,
              "block_rows": 4096, "csv_block_bytes": 1 << 20, "dtype": "float16", "max_nodata_fraction": 0.5},
    "cluster": {"levels": [{"n_clusters": 1000}, {"n_clusters": 100, "n_resamples": 10, "sample_size": 5},
                           {"n_clusters": 10, "n_resamples": 10, "sample_size": 5}],
                "n_iters": 20, "chunk_rows": None},
    "dedup": {"threshold": 0.98},
    "sample": {"target_size": 1000, "strategy": "random", "retrieval": {"seed_manifest": None, "fraction": 0.0}},
    "output": {"manifest": "curated.parquet", "report": True, "grid_clusters": 12, "grid_examples": 8},
}
_FREE_KEYS = {"embed.overrides", "cluster.levels"}


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                **values: Any) -> dict[str, Any]:
    """Defaults ← YAML file ← dotted ``key=value`` overrides ← ``values`` (nested dicts); unknown keys raise."""
    from omegaconf import OmegaConf

    from eo_dinov3.config import layered_config

    cfg = layered_config(DEFAULTS, path, overrides, values, free_keys=sorted(_FREE_KEYS), what="curation config",
                         valid_keys_hint="eo_dinov3/data/curation/pipeline.py DEFAULTS")
    out = OmegaConf.to_container(cfg, resolve=True)
    if not out["manifest"]:
        raise ConfigError("no input manifest: set manifest=<tiles manifest .parquet/.csv> (or samples:tiles)")
    if not out["output_dir"]:
        raise ConfigError("no output_dir: set output_dir=<folder for embeddings, clusters, manifest, report>")
    return out


def resolve_manifest(name: str) -> str:
    """``samples:tiles`` → the sample tiles' manifest; other values unchanged (``~`` expanded)."""
    if name.startswith("samples:"):
        from eo_dinov3.data.samples import sample_path

        return str(sample_path(name.split(":", 1)[1]))
    return os.path.expanduser(name)


def embedder_spec(cfg: dict[str, Any]) -> EmbedderSpec:
    e = cfg["embed"]
    return EmbedderSpec(backbone=e["backbone"], weights=e["weights"], overrides=dict(e["overrides"] or {}),
                        image_size=int(e["image_size"]), normalization=e["normalization"],
                        bands=tuple(int(b) for b in e["bands"]), pooling=e["pooling"])


def embed_job(cfg: dict[str, Any], manifest: str, out_dir: str | os.PathLike) -> EmbedJob:
    e = cfg["embed"]
    return EmbedJob(manifest=manifest, out_dir=str(out_dir), spec=embedder_spec(cfg), block_rows=int(e["block_rows"]),
                    csv_block_bytes=int(e["csv_block_bytes"]), batch_size=int(e["batch_size"]),
                    num_workers=int(e["num_workers"]), dtype=e["dtype"], device=cfg["device"],
                    max_nodata_fraction=float(e["max_nodata_fraction"]))


def read_rows(manifest: str, row_ids: np.ndarray, *, block_rows: int = 4096, csv_block_bytes: int = 1 << 20):
    """The manifest rows numbered ``row_ids`` (0-based, file order) as a DataFrame in ``row_ids`` order; only the
    blocks holding them are read. Paths are made absolute (so the new manifest can live anywhere)."""
    import pandas as pd

    reader = ManifestReader(manifest, block_rows=block_rows, csv_block_bytes=csv_block_bytes)
    offsets = unit_offsets(reader)
    row_ids = np.asarray(row_ids, np.int64)
    order = np.argsort(row_ids, kind="stable")
    sorted_ids = row_ids[order]
    unit_of = np.searchsorted(offsets, sorted_ids, side="right") - 1
    records: list[dict[str, Any]] = [None] * len(row_ids)  # type: ignore[list-item]
    for u in np.unique(unit_of):
        rows = reader.read_block(reader.blocks[int(u)])
        sel = np.flatnonzero(unit_of == u)
        for i in sel:
            rec = dict(rows[int(sorted_ids[i] - offsets[u])])
            rec["path"] = resolve_tile_path(str(rec["path"]), manifest)
            records[int(order[i])] = rec
    return pd.DataFrame.from_records(records)


def _fingerprint(cfg: dict[str, Any], store: EmbeddingStore) -> dict[str, Any]:
    return {"cluster": cfg["cluster"], "algorithm": ALGORITHM_VERSION, "seed": cfg["seed"],
            "num_rows": store.num_rows, "units": len(store.completed_units()), "spec": store.meta["spec"]}


def cluster_step(cfg: dict[str, Any], store: EmbeddingStore, out: Path, device: torch.device) -> Hierarchy:
    """Load ``hierarchy.npz`` if it was made with the same settings, else run hierarchical k-means."""
    fp = json.loads(json.dumps(_fingerprint(cfg, store)))
    hpath, fpath = out / "hierarchy.npz", out / "hierarchy.json"
    if hpath.exists() and fpath.exists() and json.loads(fpath.read_text()) == fp:
        log.info("clusters: reusing %s", hpath)
        return Hierarchy.load(hpath)
    c = cfg["cluster"]
    levels = levels_from_config(c["levels"])
    if store.num_rows < levels[0].n_clusters:
        raise ConfigError(f"{store.num_rows} embedded tiles but cluster.levels[0].n_clusters="
                          f"{levels[0].n_clusters}; use fewer clusters")
    h = hierarchical_kmeans(store, levels, n_iters=int(c["n_iters"]), seed=int(cfg["seed"]), device=device,
                            chunk_rows=c["chunk_rows"])
    h.save(hpath)
    fpath.write_text(json.dumps(fp, indent=1))
    return h


def select(cfg: dict[str, Any], store: EmbeddingStore, h: Hierarchy, out: Path, device: torch.device,
           model: torch.nn.Module | None = None) -> dict[str, Any]:
    """De-duplicate, retrieve and sample; returns positions, sources, scores and counts."""
    n_total = store.num_rows
    thr = cfg["dedup"]["threshold"]
    dup = (near_duplicates(store, h.parents[0], float(thr), priority=h.dist2, device=device)
           if thr is not None else np.zeros(n_total, bool))
    eligible = ~dup
    s = cfg["sample"]
    target = int(s["target_size"])
    if target <= 0:
        raise ConfigError(f"sample.target_size must be > 0, got {target}")
    r = s["retrieval"]
    ret_pos = np.zeros(0, np.int64)
    ret_score = np.zeros(0, np.float32)
    if r["seed_manifest"] and float(r["fraction"]) > 0:
        seed_store = embed_manifest(embed_job(cfg, resolve_manifest(r["seed_manifest"]), out / "seed_embeddings"),
                                    model=model)
        queries = ArrayRows(np.concatenate([c for _, c in seed_store.iter_chunks(1 << 16)]))
        if queries.num_rows == 0:
            raise DataError(f"no usable tile in the seed manifest {r['seed_manifest']!r}")
        ret_pos, ret_score = retrieve_nearest(store, queries.data, round(float(r["fraction"]) * target),
                                              mask=eligible, device=device)
    eligible_bal = eligible.copy()
    eligible_bal[ret_pos] = False
    bal_pos = balanced_sample(h, target - len(ret_pos), seed=int(cfg["seed"]), strategy=s["strategy"],
                              mask=eligible_bal)
    positions = np.concatenate([ret_pos, bal_pos])
    if len(positions) < target:
        log.warning("only %d of the requested %d tiles selected: %d tiles embedded, %d near-duplicates removed "
                    "(raise dedup.threshold or lower sample.target_size)", len(positions), target, n_total,
                    int(dup.sum()))
    source = np.array(["retrieval"] * len(ret_pos) + ["balanced"] * len(bal_pos), dtype=object)
    score = np.concatenate([ret_score, np.full(len(bal_pos), np.nan, np.float32)])
    return {"positions": positions, "source": source, "score": score, "duplicates": dup,
            "n_retrieval": int(len(ret_pos)), "n_balanced": int(len(bal_pos))}


def write_output(cfg: dict[str, Any], manifest: str, store: EmbeddingStore, h: Hierarchy, sel: dict[str, Any],
                 out: Path) -> Path:
    """The curated manifest (Parquet or CSV by suffix of ``output.manifest``)."""
    e = cfg["embed"]
    ids = store.ids()
    pos = sel["positions"]
    df = read_rows(manifest, ids[pos], block_rows=int(e["block_rows"]), csv_block_bytes=int(e["csv_block_bytes"]))
    df["manifest_row"] = ids[pos]
    df["curation_source"] = sel["source"]
    df["curation_score"] = sel["score"]
    for lv in range(h.n_levels):
        df[f"cluster_l{lv + 1}"] = h.labels(lv)[pos]
    path = Path(cfg["output"]["manifest"])
    return write_manifest(df, path if path.is_absolute() else out / path)


def run_curation(cfg: dict[str, Any], *, steps: tuple[str, ...] = ("embed", "cluster", "sample", "report"),
                 rank: int = 0, world_size: int = 1, dask_client=None,
                 model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Run the pipeline (module docstring); returns a summary dict (also written to ``report/report.json``).

    ``rank``/``world_size``: torchrun ranks share the embed step; only rank 0 continues (after all units exist).
    ``dask_client``: run the embed step on a ``dask.distributed`` cluster. ``model``: a backbone module to use
    instead of ``embed.backbone`` (tests).
    """
    from eo_dinov3.data.curation.embed import wait_for_store

    t0 = time.perf_counter()
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    manifest = resolve_manifest(cfg["manifest"])
    device = resolve_device(cfg["device"])
    job = embed_job(cfg, manifest, out / "embeddings")
    timings: dict[str, float] = {}
    store = EmbeddingStore(job.out_dir)
    if "embed" in steps:
        t = time.perf_counter()
        if dask_client is not None:
            embed_manifest_dask(job, dask_client)
        else:
            embed_manifest(job, rank=rank, world_size=world_size, model=model)
        timings["embed_s"] = time.perf_counter() - t
    if rank != 0:
        return {"rank": rank, "timings": timings}
    if world_size > 1:
        wait_for_store(store)
    if not store.is_complete():
        raise DataError(f"embedding store {store.root} is incomplete ({len(store.completed_units())}/"
                        f"{store.meta['num_units']} units); run the embed step")
    summary: dict[str, Any] = {"manifest": manifest, "output_dir": str(out), "embedded": store.num_rows,
                               "device": str(device)}
    if not {"cluster", "sample", "report"} & set(steps):
        return summary
    t = time.perf_counter()
    h = cluster_step(cfg, store, out, device)
    timings["cluster_s"] = time.perf_counter() - t
    if "sample" in steps or "report" in steps:
        t = time.perf_counter()
        sel = select(cfg, store, h, out, device, model=model)
        path = write_output(cfg, manifest, store, h, sel, out)
        timings["sample_s"] = time.perf_counter() - t
        summary.update(output_manifest=str(path), selected=int(len(sel["positions"])),
                       retrieval=sel["n_retrieval"], balanced=sel["n_balanced"],
                       duplicates_removed=int(sel["duplicates"].sum()))
        if "report" in steps and cfg["output"]["report"]:
            from eo_dinov3.data.curation.report import write_report

            t = time.perf_counter()
            summary.update(write_report(cfg, manifest, store, h, sel, out / "report"))
            timings["report_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    summary["timings"] = {k: round(v, 2) for k, v in timings.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary
