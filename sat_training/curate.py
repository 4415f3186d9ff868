#!/usr/bin/env python
"""Curate a tile archive: embed, hierarchical k-means, balanced + retrieval sampling, manifest + report
(thin wrapper of :mod:`eo_dinov3.data.curation.cli`).

Example::

    python sat_training/curate.py --config configs/curation/sample_tiles.yaml

Same as ``eo-dinov3 curate``; run with ``--help`` for every option.
"""

import sys

from eo_dinov3.data.curation.cli import main

if __name__ == "__main__":
    sys.exit(main())
