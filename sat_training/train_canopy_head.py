"""Train a canopy-height DPT head on a frozen DINOv3 backbone (see :mod:`eo_dinov3.canopy.training`).

    python sat_training/train_canopy_head.py --config configs/canopy/autzen_demo.yaml [key=value ...]
"""

from __future__ import annotations

import sys

from eo_dinov3.canopy.training import main

if __name__ == "__main__":
    sys.exit(main())
