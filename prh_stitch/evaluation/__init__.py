"""Stitch evaluation: retrieval, the objective reloaded from the checkpoint, alignment, zero-shot, baselines.

``evaluate_stitcher(data, ckpt=...)`` (or ``baseline=...``) returns a :class:`StitchResult`; the command line
``evaluate.py stitch`` is :mod:`prh_stitch.cli.evaluate`.
"""

from prh_stitch.evaluation.stitch import StitchResult, evaluate_stitcher, stitch_report
from prh_stitch.evaluation.zero_shot import ZeroShotInputs, zero_shot


def __getattr__(name: str):
    # ``from prh_stitch.evaluation import main`` was the command's home before it moved to prh_stitch.cli; resolved
    # on use only, so the library never imports the command line.
    if name == "main":
        from prh_stitch.cli.evaluate import main

        return main
    raise AttributeError(f"module 'prh_stitch.evaluation' has no attribute {name!r}")


__all__ = ["StitchResult", "ZeroShotInputs", "evaluate_stitcher", "stitch_report", "zero_shot"]
