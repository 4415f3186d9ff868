#!/usr/bin/env python
"""GEO-Bench v1 leaderboard run on frozen features (same as ``eo-dinov3 geobench run``).

    python geobench/run.py --backbone dinov3_vitl16 --weights dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth \\
        --tasks all --protocol dinov3 --out results/

Options: ``python geobench/run.py --help``; library: :mod:`eo_dinov3.evaluation.geobench_run`.
"""

import sys

from eo_dinov3.evaluation.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main())
