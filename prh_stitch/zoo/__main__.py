import sys

from prh_stitch.cli.zoo import main

sys.exit(main())
