import sys

from prh_stitch.zoo.cli import main

sys.exit(main())
