"""eo_dinov3: DINOv3-style self-supervised vision for Earth observation.

Sub-packages: ``models`` (ViT backbones, heads), ``losses``, ``ssl`` (pretraining), ``data`` (tiles, samples),
``canopy`` (canopy-height mapping), ``evaluation`` (frozen-feature probes, GEO-Bench). Named backbone
constructors live in :mod:`eo_dinov3.hub`.
"""

__version__ = "0.1.0"
