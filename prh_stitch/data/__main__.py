"""``python -m prh_stitch.data``: the command lives in :mod:`prh_stitch.cli.data`."""
from prh_stitch.cli.data import main
if __name__ == "__main__": raise SystemExit(main())  # noqa: E701
