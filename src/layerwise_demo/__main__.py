"""``python -m layerwise_demo``: the same as ``layerwise demo``."""

import sys

from layerwise.cli import main

sys.exit(main(["demo", *sys.argv[1:]]))
