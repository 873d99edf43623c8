"""Scoring one model pair: layer × layer scores, the calibrated best and last pairs (cached by ``score_cache.py``)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from prh_stitch.alignment.features import encoder_record, layer_names, paired
from prh_stitch.alignment.score_cache import ScoreCache, score_key
from prh_stitch.alignment.settings import ScoreSettings, check_n, clamp_layers, metric_options
from prh_stitch.metrics.intervals import best_pair_interval, draw_halves, estimand_of

CALIBRATION_FIELDS = ("score", "chance", "null_mean", "null_std", "z", "p_value", "p_resolution", "calibrated",
                      "ci_low", "ci_high", "interval_method")


def calibration_fields(result: Dict[str, Any]) -> Dict[str, Any]:
    return {k: result.get(k) for k in CALIBRATION_FIELDS}


def half_sample_subsets(n: int, draws: int, seed: int) -> List[Tensor]:
    """Random halves of the rows, without replacement; the same for every model pair with the same N.

    The study rescoring and the best pair's interval share them; see :mod:`prh_stitch.metrics.intervals` for why
    halves (no duplicated rows, spread of the full-sample score without rescaling).
    """
    return draw_halves(n, draws, torch.Generator().manual_seed(seed + 1))


def score_pair(label_a: str, fa, label_b: str, fb, metric: str, settings: ScoreSettings, device: torch.device,
               cache: ScoreCache = ScoreCache(None), prepared=None) -> Dict[str, Any]:
    """Layer × layer scores of one model pair for one metric, with calibrated best and last pairs.

    ``prepared``: a :class:`~prh_stitch.metrics.layers.PreparedLayers` shared by the pairs of one run, so each
    model's layers are prepared once per half-sample and permutation rather than once per partner.
    """
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
    table = layer_alignment(a, b, metric, prepared=prepared, **opts)
    bi, bj = table["best_index"]
    too_few = halves_too_small(metric, opts, n)
    if too_few:  # no intervals rather than no report: the scores and nulls are still valid
        settings = replace(settings, bootstrap=0, half_samples=0)
    cal = dict(permutations=settings.permutations, bootstrap=settings.bootstrap, seed=settings.seed, **opts)
    best = calibrate(metric, a[bi], b[bj], **{**cal, "bootstrap": 0})  # its interval: selection-aware, below
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
    record.update(max_null(a, b, metric, opts, settings, record["score"], device, prepared))
    record.update(selection_aware(a, b, table["scores"], metric, opts, settings, device, prepared))
    if too_few:
        record["interval_method"] = record["last"]["interval_method"] = too_few
    cache.put(key, record)
    return record


def max_null(a: List[Tensor], b: List[Tensor], metric: str, opts: Dict[str, Any], settings: ScoreSettings,
             score: float, device: torch.device, prepared=None) -> Dict[str, Optional[float]]:
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
        maxes.append(layer_alignment(a, [x[perm] for x in b], metric, prepared=prepared, **opts)["best"])
    mean = sum(maxes) / len(maxes)
    std = float(torch.tensor(maxes, dtype=torch.float64).std()) if len(maxes) > 1 else 0.0
    return {"max_null_mean": mean, "max_null_std": std,
            "max_calibrated": (score - mean) / (1 - mean) if mean < 1 else None}


def halves_too_small(metric: str, opts: Dict[str, Any], n: int) -> Optional[str]:
    """Why half-samples of N//2 rows cannot be scored with this metric (e.g. N//2 ≤ k), or None when they can."""
    from prh_stitch.metrics import METRICS

    try:
        METRICS.get(metric).spec.check(n // 2, {**METRICS.get(metric).spec.defaults, **opts})
    except ValueError as exc:
        return f"none: half-samples of N//2 = {n // 2} rows are too few ({exc})"
    return None


def selection_aware(a: List[Tensor], b: List[Tensor], full: Tensor, metric: str, opts: Dict[str, Any],
                    settings: ScoreSettings, device: torch.device, prepared=None) -> Dict[str, Any]:
    """The best pair's interval with the pair re-selected in every half, its stability, and the study's halves.

    The headline is "the best layer pair's score", and which pair is best is itself estimated from the data: a
    pair picked once on all rows and then given its own interval ignores that (the winner changes between halves
    of real data, and the max of several close pairs is inflated more at smaller N). So every half rescores all
    La × Lb pairs and takes its own maximum (:func:`prh_stitch.metrics.intervals.best_pair_interval`).
    ``selection_stability`` is the share of these halves won by the full-sample winner (named apart from the
    study's ``best_pair_stability``, which also covers the contextual selection); ``selection_winners`` lists
    [layer_a, layer_b, halves won] for every pair that won a half. The first ``half_samples`` halves' maxima and
    last-pair scores are kept for the study's correlation intervals (the same halves for every model pair).
    """
    from prh_stitch.metrics import METRICS, layer_alignment

    n = a[0].shape[0]
    draws = max(settings.bootstrap, settings.half_samples)
    out: Dict[str, Any] = {"selection_stability": None, "selection_winners": None}
    if not draws:
        return out
    halves = [s.to(device) for s in half_sample_subsets(n, draws, settings.seed)]
    tables = [layer_alignment([x[s] for x in a], [x[s] for x in b], metric, prepared=prepared, **opts)["scores"]
              for s in halves]
    estimand = estimand_of(tuple(METRICS.get(metric).spec.defaults))
    if settings.bootstrap:
        sel = best_pair_interval(full, tables[: settings.bootstrap], n, 0.95, estimand)
        out.update(ci_low=sel["ci_low"], ci_high=sel["ci_high"], interval_method=sel["interval_method"],
                   selection_stability=sel["stability"], selection_winners=sel["winners"])
    if settings.half_samples:
        used = tables[: settings.half_samples]
        out["half_samples"] = {"best": [float(t.max()) for t in used], "last": [float(t[-1, -1]) for t in used]}
    return out
