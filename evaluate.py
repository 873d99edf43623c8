"""Evaluate stitchers and measure representational alignment. ``python evaluate.py --help`` lists the subcommands."""

import sys

from prh_stitch.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
