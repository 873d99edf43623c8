"""Train a stitcher between two frozen encoders. ``python train.py --help`` lists every option."""

import sys

from prh_stitch.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
