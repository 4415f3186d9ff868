#!/usr/bin/env python
"""DINOv3 self-supervised pretraining on satellite tiles (thin entry: eo_dinov3.ssl.cli).

    python sat_training/pretrain.py                                   # CPU demo on the sample tiles
    python sat_training/pretrain.py --config configs/pretrain/sat_vitl16_recipe.yaml data.path=/tiles/manifest.parquet
    torchrun --nproc_per_node 8 sat_training/pretrain.py --config ... train.sharding=fsdp
"""

import sys

from eo_dinov3.ssl.cli import DEMO_CONFIG, main  # noqa: F401  (DEMO_CONFIG: the default --config)

if __name__ == "__main__":
    sys.exit(main())
