"""Tile curation: balanced sampling of huge satellite archives by hierarchical k-means.

The pipeline follows the curation of DINOv3's LVD-1689M (and of the DINOv2 curation paper, Vo et al. 2024,
"Automatic Data Curation for Self-Supervised Learning: A Clustering-Based Approach"):

1. :mod:`~eo_dinov3.data.curation.embed` — embed every tile of a manifest with a backbone
   (:mod:`~eo_dinov3.data.curation.embedder`) into a sharded, resumable on-disk store
   (:mod:`~eo_dinov3.data.curation.store`; torchrun ranks or a ``dask.distributed`` cluster split the work).
2. :mod:`~eo_dinov3.data.curation.hierarchy` — hierarchical k-means with resampling steps
   (:mod:`~eo_dinov3.data.curation.kmeans`: chunked, torch, exact k-means++, seeded; CUDA when present).
3. :mod:`~eo_dinov3.data.curation.dedup` — near-duplicate removal by cosine threshold within leaf clusters;
   :mod:`~eo_dinov3.data.curation.sampling` — balanced hierarchical sampling;
   :mod:`~eo_dinov3.data.curation.retrieval` — the tiles nearest to a seed set.
4. :mod:`~eo_dinov3.data.curation.pipeline` — the configurable mix (e.g. 10 % retrieval + 90 % balanced), the
   output manifest and :mod:`~eo_dinov3.data.curation.report` (cluster sizes before/after, example grid PNG).

Command line: ``eo-dinov3 curate --config configs/curation/sample_tiles.yaml`` (:mod:`~eo_dinov3.data.curation.cli`).
"""
