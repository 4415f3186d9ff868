"""Build the pretraining batch stream from ``cfg.data`` and ``cfg.crops``.

* ``data.kind=folder`` (a folder or glob of tiles) and ``data.kind=scene`` (chips sampled from large scene rasters
  with torchgeo): map-style datasets addressed by :class:`~eo_dinov3.ssl.data.StreamSampler`; the global batch is
  independent of the number of processes and a resumed run replays the exact stream.
* ``data.kind=manifest`` (Parquet/CSV manifest, the form that scales to 10^8 tiles): the streaming
  :class:`~eo_dinov3.data.tiles.ManifestTileDataset`, sharded by (rank, worker) without a central listing; resume
  is exact for the same world size and worker count.

Bad tiles (corrupt, wrong band count, mostly nodata, blank) are skipped and counted by the datasets; the counts
end up in the run's ``summary.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from eo_dinov3.data.augmentations import DataAugmentationDINO
from eo_dinov3.errors import ConfigError
from eo_dinov3.ssl.data import AugmentedTiles, SSLCollate, StreamSampler
from eo_dinov3.ssl.distributed import DistInfo


def build_augmentation(cfg: DictConfig, sizes: tuple[int, int, int | None] | None = None) -> DataAugmentationDINO:
    """The multi-crop augmentation of ``cfg.crops``; ``sizes`` = (global, local, Gram) overrides the crop sizes."""
    c = cfg.crops
    g, l, gram = sizes if sizes is not None else (c.global_crops_size, c.local_crops_size, c.gram_teacher_crops_size)
    return DataAugmentationDINO(
        global_crops_scale=tuple(c.global_crops_scale),
        local_crops_scale=tuple(c.local_crops_scale),
        local_crops_number=int(c.local_crops_number),
        global_crops_size=int(g),
        local_crops_size=int(l),
        gram_teacher_crops_size=int(gram) if gram else None,
        gram_teacher_no_distortions=bool(c.gram_teacher_no_distortions),
        horizontal_flips=bool(c.horizontal_flips),
        normalization=str(c.normalization),
        satellite=bool(c.satellite),
    )


def build_augmentations(cfg: DictConfig) -> tuple[list[DataAugmentationDINO], list[float]]:
    """One augmentation per (global, local, Gram) size triple of ``crops.resolution_triples`` (high-resolution
    adaptation) with ``crops.resolution_probabilities``; a single one from the crop sizes otherwise."""
    triples = cfg.crops.get("resolution_triples")
    if not triples:
        return [build_augmentation(cfg)], [1.0]
    probs = list(cfg.crops.get("resolution_probabilities") or [1.0] * len(triples))
    if len(probs) != len(triples):
        raise ConfigError("crops.resolution_probabilities needs one value per crops.resolution_triples entry")
    return [build_augmentation(cfg, tuple(t)) for t in triples], [float(p) for p in probs]


def build_collate(cfg: DictConfig, seed: int) -> SSLCollate:
    return SSLCollate(
        seed=seed,
        mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=float(cfg.ibot.mask_sample_probability),
        mask_group_size=cfg.ibot.mask_group_size,
    )


def summarize_skipped(skip_log_dir: str | Path) -> dict[str, Any]:
    """Counts per reason and the ids of the skipped inputs, from the datasets' per-worker skip logs."""
    reasons: dict[str, set[str]] = {}
    for f in sorted(Path(skip_log_dir).glob("*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            reasons.setdefault(r["reason"], set()).add(r["id"])
    return {
        "total": sum(len(v) for v in reasons.values()),
        "by_reason": {k: len(v) for k, v in sorted(reasons.items())},
        "examples": {k: sorted(v)[:50] for k, v in sorted(reasons.items())},
    }


def build_tile_dataset(cfg: DictConfig, skip_log_dir: str | Path | None = None):
    """The raw tile dataset (items ``(uint8 image [C,H,W], sample_id)``) of ``cfg.data``; skipped inputs are
    logged (one JSON line each) under ``skip_log_dir``."""
    from eo_dinov3.data import tiles

    d = cfg.data
    if not d.path:
        raise ConfigError("data.path is not set: give a folder/glob of tiles, a manifest or scene rasters")
    common = dict(bands=tuple(d.bands), max_nodata_fraction=float(d.max_nodata_fraction), skip_log_dir=skip_log_dir)
    if d.kind == "folder":
        return tiles.TileFolderDataset(str(d.path), **common)
    if d.kind == "scene":
        return tiles.SceneSamplerDataset(str(d.path), size=int(d.scene_chip_size),
                                         length=int(d.scene_samples_per_epoch), bands=tuple(d.bands),
                                         skip_log_dir=skip_log_dir)
    raise ConfigError(f"data.kind must be folder, scene or manifest, got {d.kind!r}")


def _pca_image(dataset, cfg: DictConfig) -> torch.Tensor | None:
    """A fixed normalised tile ``[3, S, S]`` for the PCA picture (the first readable tile, centre crop)."""
    from eo_dinov3.data.normalization import normalize

    try:
        img, _ = dataset[0]
    except Exception:
        return None
    img = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
    if img.shape[0] != 3:
        return None
    return normalize(img, str(cfg.crops.normalization))


def build_batch_stream(cfg: DictConfig, dist: DistInfo, start_step: int = 0
                       ) -> tuple[Iterator[dict[str, Any]], torch.Tensor | None, Callable[[], dict]]:
    """``(batches, pca_image, skipped_stats)`` for this rank, starting at optimiser step ``start_step``."""
    seed = int(cfg.run.seed)
    B = int(cfg.train.batch_size_per_gpu)
    workers = int(cfg.train.num_workers)
    augs, probs = build_augmentations(cfg)
    aug = augs[0]
    collate = build_collate(cfg, seed)
    skip_dir = Path(cfg.run.output_dir) / "skipped_inputs"
    if dist.is_main and start_step == 0 and skip_dir.is_dir():
        for f in skip_dir.glob("*.jsonl"):  # a fresh run starts a fresh log
            f.unlink()
    if cfg.data.kind == "manifest":
        from eo_dinov3.data.tiles import ManifestTileDataset

        if len(augs) > 1:
            raise ConfigError("crops.resolution_triples (high-res phase) needs data.kind=folder or scene")

        def transform(image, generator):
            out = aug(image, generator=generator)
            out["_key"] = int(generator.initial_seed())  # the per-sample seed: a function of the stream order
            return out

        ds = ManifestTileDataset(str(cfg.data.path), bands=tuple(cfg.data.bands), transform=transform, seed=seed,
                                 batch_size=B, rank=dist.rank, world_size=dist.world_size,
                                 max_nodata_fraction=float(cfg.data.max_nodata_fraction), skip_log_dir=skip_dir)
        ds.set_position(start_step * B)

        def collate_manifest(samples):
            return collate([(c, (sid, c.pop("_key"))) for c, sid in samples])

        loader = DataLoader(ds, batch_size=B, num_workers=workers, collate_fn=collate_manifest,
                            persistent_workers=workers > 0)
        return iter(loader), None, lambda: summarize_skipped(skip_dir)
    tiles_ds = build_tile_dataset(cfg, skip_dir)
    sampler = StreamSampler(len(tiles_ds), B, rank=dist.rank, world_size=dist.world_size, seed=seed,
                            start_step=start_step)
    tiles = AugmentedTiles(tiles_ds, augs, seed, probabilities=probs, global_batch=B * dist.world_size)
    loader = DataLoader(tiles, batch_size=B, sampler=sampler, num_workers=workers,
                        collate_fn=collate, persistent_workers=workers > 0, drop_last=True)
    return iter(loader), _pca_image(tiles_ds, cfg), lambda: summarize_skipped(skip_dir)
