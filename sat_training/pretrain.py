#!/usr/bin/env python
"""DINOv3 self-supervised pretraining on satellite tiles.

    python sat_training/pretrain.py                                   # CPU demo on the sample tiles (< 10 min)
    python sat_training/pretrain.py --config configs/pretrain/sat_vitl16_recipe.yaml data.path=/tiles/manifest.parquet
    torchrun --nproc_per_node 8 sat_training/pretrain.py --config ... train.sharding=fsdp

Any config key can be overridden as ``key=value`` (see eo_dinov3/ssl/default_config.yaml). Runs resume
automatically from the newest checkpoint in ``run.output_dir`` (``--no-resume`` starts fresh).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eo_dinov3.errors import EODinoError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "pretrain" / "demo_cpu.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="DINOv3 pretraining (DINO/Sinkhorn-Knopp + iBOT + KoLeo, EMA teacher, multi-crop, optional Gram "
        "anchoring) on satellite tiles. Without arguments: the CPU demo on the sample tiles.",
        epilog="Overrides: key=value pairs, e.g. optim.lr=5e-4 train.batch_size_per_gpu=32 data.path=/data/tiles",
    )
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in run.output_dir")
    p.add_argument("--output-dir", help="shortcut for run.output_dir=...")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from eo_dinov3.ssl.config import load_config
    from eo_dinov3.ssl.trainer import train

    overrides = list(args.overrides)
    if args.no_resume:
        overrides.append("checkpointing.resume=never")
    if args.output_dir:
        overrides.append(f"run.output_dir={args.output_dir}")
    try:
        cfg = load_config(args.config, overrides)
        if cfg.data.path is None and Path(args.config) == DEFAULT_CONFIG:
            from eo_dinov3.data.samples import sample_path

            cfg.data.path = str(sample_path("tiles").parent)
        result = train(cfg, progress=not args.no_progress)
    except EODinoError as e:
        print(f"pretrain: error: {e}", file=sys.stderr)
        return 2
    out = result.output_dir
    print(f"finished at iteration {result.iteration} ({result.skipped_steps} non-finite steps skipped)")
    print(f"  run folder:      {out.resolve()}")
    print(f"  checkpoint:      {result.last_checkpoint}")
    print(f"  teacher backbone (hub format): {result.teacher_export}")
    if result.pca_pictures:
        print(f"  PCA pictures:    {result.pca_pictures[0]} … {result.pca_pictures[-1]}")
    print(f"  metrics:         {out / 'metrics.jsonl'} (TensorBoard: tensorboard --logdir {out / 'tb'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
