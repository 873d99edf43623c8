"""Stitch evaluation: retrieval, the objective reloaded from the checkpoint, alignment, zero-shot, baselines.

``evaluate_stitcher(data, ckpt=...)`` (or ``baseline=...``) returns a :class:`StitchResult`; the command line
``evaluate.py stitch`` is :mod:`prh_stitch.cli.evaluate`.
"""

from prh_stitch.evaluation.stitch import StitchResult, evaluate_stitcher, stitch_report
from prh_stitch.evaluation.zero_shot import ZeroShotInputs, zero_shot

__all__ = ["StitchResult", "ZeroShotInputs", "evaluate_stitcher", "stitch_report", "zero_shot"]
