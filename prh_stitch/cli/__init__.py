"""The command lines, argument parsing and nothing else: ``train`` (``train.py``, ``prh-train``) and ``evaluate``
(``evaluate.py``, ``prh-evaluate``); the data command is ``python -m prh_stitch.data`` (``prh-data``).

``from prh_stitch.cli import main, build_cli, fit`` are the training command's, as before the package existed.
They load on first use, so ``evaluate.py`` (which imports ``prh_stitch.cli.evaluate``) never pays for importing
Lightning.
"""

__all__ = ["LatestCheckpoint", "StitchCLI", "build_cli", "find_last_checkpoint", "fit", "main"]


from prh_stitch.lazy import lazy_exports

__getattr__ = lazy_exports(__name__, {name: "train" for name in __all__})
