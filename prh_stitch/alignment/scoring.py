"""Scoring one model pair: layer × layer scores, the calibrated best and last pairs (cached by ``score_cache.py``)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from prh_stitch.alignment.features import encoder_record, layer_names, paired
from prh_stitch.alignment.score_cache import SCORE_CACHE_FORMAT, ScoreCache, score_key  # noqa: F401 - re-exported
from prh_stitch.alignment.settings import ScoreSettings, check_n, clamp_layers, metric_options

CALIBRATION_FIELDS = ("score", "chance", "null_mean", "null_std", "z", "p_value", "calibrated", "ci_low", "ci_high")


def calibration_fields(result: Dict[str, Any]) -> Dict[str, Any]:
    return {k: result.get(k) for k in CALIBRATION_FIELDS}


def half_sample_subsets(n: int, draws: int, seed: int) -> List[Tensor]:
    """Random halves of the rows, without replacement; the same for every model pair with the same N.

    A half-sample's spread matches the full-sample bootstrap's for mean-type scores, and unlike a bootstrap
    with replacement it never makes a duplicated row its own nearest neighbour.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    return [torch.randperm(n, generator=gen)[: n // 2].sort().values for _ in range(draws)]


def score_pair(label_a: str, fa, label_b: str, fb, metric: str, settings: ScoreSettings, device: torch.device,
               cache: ScoreCache = ScoreCache(None)) -> Dict[str, Any]:
    """Layer × layer scores of one model pair for one metric, with calibrated best and last pairs."""
    from prh_stitch.metrics import calibrate, layer_alignment

    opts = metric_options(metric, settings.k)
    key = score_key(cache, fa, fb, metric, opts, settings)
    cached = cache.get(key)
    if cached is not None:
        cached.update(model_a=label_a, model_b=label_b)
        return cached
    a, b, _, _ = paired(fa, fb, device)
    n = a[0].shape[0]
    check_n(n, settings, f"{label_a} × {label_b}")
    names_a, names_b = layer_names(fa), layer_names(fb)
    a = clamp_layers(a, names_a, label_a, settings.outlier_quantile)
    b = clamp_layers(b, names_b, label_b, settings.outlier_quantile)
    table = layer_alignment(a, b, metric, **opts)
    bi, bj = table["best_index"]
    cal = dict(permutations=settings.permutations, bootstrap=settings.bootstrap, seed=settings.seed, **opts)
    best = calibrate(metric, a[bi], b[bj], **cal)
    last = calibrate(metric, a[-1], b[-1], **cal)
    record: Dict[str, Any] = {
        "model_a": label_a, "model_b": label_b, "metric": metric, "n": n, "options": opts,
        "selection": "best = max over all layer pairs (the paper's headline; the max inflates it, see "
                     "max_null_mean); last = last layer of each model",
        **calibration_fields(best),
        "layer_a": bi, "layer_b": bj, "layer_a_name": names_a[bi], "layer_b_name": names_b[bj],
        "last": {**calibration_fields(last), "layer_a": len(a) - 1, "layer_b": len(b) - 1,
                 "layer_a_name": names_a[-1], "layer_b_name": names_b[-1]},
        "layers_a": names_a, "layers_b": names_b, "matrix": table["scores"].tolist(),
        "fingerprint_a": encoder_record(fa), "fingerprint_b": encoder_record(fb),
    }
    record.update(max_null(a, b, metric, opts, settings, record["score"], device))
    if settings.half_samples and n // 2 > settings.k + 1:
        record["half_samples"] = half_sample_scores(a, b, (bi, bj), metric, opts, settings, device)
    cache.put(key, record)
    return record


def max_null(a: List[Tensor], b: List[Tensor], metric: str, opts: Dict[str, Any], settings: ScoreSettings,
             score: float, device: torch.device) -> Dict[str, Optional[float]]:
    """The null of the max over layer pairs: the same max with b's rows shuffled.

    The max over La·Lb pairs exceeds a single pair's null even for unrelated models; all layers of b move by one
    permutation, as a real mismatch would.
    """
    from prh_stitch.metrics import layer_alignment

    if not settings.max_null:
        return {"max_null_mean": None, "max_null_std": None, "max_calibrated": None}
    maxes = []
    gen = torch.Generator().manual_seed(settings.seed + 7919)
    for _ in range(settings.max_null):
        perm = torch.randperm(a[0].shape[0], generator=gen).to(device)
        maxes.append(layer_alignment(a, [x[perm] for x in b], metric, **opts)["best"])
    mean = sum(maxes) / len(maxes)
    std = float(torch.tensor(maxes, dtype=torch.float64).std()) if len(maxes) > 1 else 0.0
    return {"max_null_mean": mean, "max_null_std": std,
            "max_calibrated": (score - mean) / (1 - mean) if mean < 1 else None}


def half_sample_scores(a: List[Tensor], b: List[Tensor], best: tuple, metric: str, opts: Dict[str, Any],
                       settings: ScoreSettings, device: torch.device) -> Dict[str, List[float]]:
    """The best and last pairs rescored on the same random halves (the study's correlation intervals)."""
    from prh_stitch.metrics import METRICS

    fn = METRICS.get(metric)
    bi, bj = best
    subsets = [s.to(device) for s in half_sample_subsets(a[0].shape[0], settings.half_samples, settings.seed)]
    return {"best": [fn(a[bi][s], b[bj][s], **opts) for s in subsets],
            "last": [fn(a[-1][s], b[-1][s], **opts) for s in subsets]}
