#!/usr/bin/env python
"""Cut scene GeoTIFFs into pretraining tiles + a manifest (thin wrapper of :mod:`eo_dinov3.data.prepare`).

Example::

    python sat_training/prepare_tiles.py scenes/*.tif --out data/tiles512 --tile-size 512 --workers 4

Same as ``eo-dinov3 prepare-tiles``; run with ``--help`` for every option.
"""

import sys

from eo_dinov3.data.prepare import main

if __name__ == "__main__":
    sys.exit(main())
