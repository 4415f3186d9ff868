import sys

from eo_dinov3.cli import main

sys.exit(main())
