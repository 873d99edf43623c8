"""Representational alignment between models: scoring, calibration of the best layer pair, reports, the study.

- :func:`align`: every layer pair of every model pair on a dataset, the best pair (max over layer pairs, as the
  paper reports it) and the last-layer pair, each against chance, a permutation null and a half-sample interval.
- :func:`run_study`: alignment against competence over models and datasets (a config file or mapping).
- :mod:`~prh_stitch.alignment.competence`: bits per byte of causal LMs (two named definitions); correlations.
- :mod:`~prh_stitch.alignment.protocol`: ``prh_stitch`` (default) or ``paper`` (the paper's clamp, layer sets,
  normalisation and bits per byte); every report names the one that produced it.
- :mod:`~prh_stitch.alignment.study_power`: what a study can detect (smallest p over models), the best pair's
  stability across half-samples, mutual kNN across k and N; :mod:`~prh_stitch.alignment.layer_sets`: the best pair
  without non-contextual (input-embedding) layers.

Features come from the feature store (every layer of an encoder in one pass) and each pair's scores from the score
cache, so a second run on the same data never runs an encoder again.
"""

from prh_stitch.alignment.align import AlignResult, Model, align
from prh_stitch.alignment.settings import DEFAULT_METRICS, Inputs, ScoreSettings
from prh_stitch.alignment.study import run_study
from prh_stitch.alignment.study_config import StudyConfig, load_config

__all__ = ["AlignResult", "DEFAULT_METRICS", "Inputs", "Model", "ScoreSettings", "StudyConfig", "align",
           "load_config", "run_study"]
