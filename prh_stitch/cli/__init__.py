"""The command lines, argument parsing and nothing else: ``train`` (``train.py``, ``prh-train``) and ``evaluate``
(``evaluate.py``, ``prh-evaluate``); the data command is ``python -m prh_stitch.data`` (``prh-data``).

``from prh_stitch.cli import main, build_cli, fit`` are the training command's, as before the package existed.
"""

from prh_stitch.cli.train import LatestCheckpoint, StitchCLI, build_cli, find_last_checkpoint, fit, main

__all__ = ["LatestCheckpoint", "StitchCLI", "build_cli", "find_last_checkpoint", "fit", "main"]
