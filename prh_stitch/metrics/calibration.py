"""Honest scores: chance level, permutation null (z, p and its resolution), calibrated score and interval."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Union

import torch
from torch import Tensor

from ._checks import check_pair
from ._spec import options, spec_of
from .intervals import draw_halves, estimand_of, half_size, method_name, subsample_interval


def calibrate(metric: Union[str, Callable], a: Tensor, b: Tensor, permutations: int = 20, bootstrap: int = 0,
              seed: int = 0, ci: float = 0.95, **kw: Any) -> Dict[str, Any]:
    """Raw score plus what it means against chance.

    - ``chance``: the analytic chance level where one exists (mutual_knn k/(N−1), cycle_knn
      1 − (1 − k/(N−1))^k, unbiased_cka 0), else None.
    - Permutation null: the metric with the pairing of b shuffled (``permutations`` times). Per-side work is
      reused: for kNN metrics b's neighbour lists are relabelled through the permutation, no new search.
      Reports ``null_mean``, ``null_std``, ``z`` = (score − null_mean)/null_std and the one-sided
      ``p_value`` = (1 + #{null ≥ score}) / (1 + permutations).
    - ``calibrated`` = (score − null_mean) / (1 − null_mean): 0 at chance, 1 for a perfect score.
    - ``p_resolution`` = 1/(1 + permutations): the smallest p-value the permutation test can give; a p-value at
      it means "at most this", not "this".
    - ``ci_low``/``ci_high`` (basic interval, level ``ci``) from ``bootstrap`` half-samples when ``bootstrap > 0``:
      subsets of ⌊N/2⌋ distinct rows (drawn after the permutations, from the same generator), on each of which the
      metric is recomputed from scratch — a new neighbour search for the kNN metrics and CKNNA, no duplicated rows
      for the kernel metrics. Deviations are rescaled by √(m/(N − m)) (1 for even N); the estimand is the
      population value for CKA, unbiased CKA and SVCCA and the expected N-sample score (same k) for metrics with
      neighbours: see :mod:`prh_stitch.metrics.intervals`, which also says why not the bootstrap with
      replacement. ``interval_method`` names the method (None when no interval was asked for; "none: …" with
      the reason when N//2 rows are too few for the metric, e.g. N//2 ≤ k); ``ci_draws`` holds the half-sample
      scores, so that callers can combine them.

    Everything is seeded by ``seed`` (a CPU ``torch.Generator``), so the report is reproducible.
    """
    spec = spec_of(metric)
    opts = options(spec, kw)
    n = check_pair(a, b)
    spec.check(n, opts)
    for name, value in (("permutations", permutations), ("bootstrap", bootstrap)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must lie in (0, 1), got {ci!r}")
    gen = torch.Generator().manual_seed(seed)
    sa, sb = spec.prepare(a, "a", opts), spec.prepare(b, "b", opts)
    score = float(spec.pair(sa, sb, opts))
    out: Dict[str, Any] = {"metric": spec.name, "score": score, "n": n, "permutations": permutations,
                           "bootstrap": bootstrap,
                           "chance": spec.chance(n, opts) if spec.chance is not None else None}
    null = torch.tensor([float(spec.pair(sa, spec.permute(sb, torch.randperm(n, generator=gen).to(a.device), opts),
                                         opts)) for _ in range(permutations)], dtype=torch.float64)
    if permutations:
        mean = float(null.mean())
        std = float(null.std()) if permutations > 1 else 0.0
        out.update(null_mean=mean, null_std=std,
                   z=(score - mean) / std if std > 0 else (math.inf if score > mean else 0.0),
                   p_value=(1 + int((null >= score).sum())) / (1 + permutations),
                   calibrated=(score - mean) / (1 - mean) if mean < 1 else None)
    else:
        out.update(null_mean=None, null_std=None, z=None, p_value=None, calibrated=None)
    out.update(p_resolution=1 / (1 + permutations) if permutations else None)
    out.update(ci_low=None, ci_high=None, ci=ci, interval_method=None, ci_draws=None)
    if bootstrap:
        m = half_size(n)
        try:
            spec.check(m, opts)
        except ValueError as exc:  # the score and its null stand; say why there is no interval instead of failing
            out["interval_method"] = f"none: half-samples of N//2 = {m} rows are too few ({exc})"
            return out
        draws = [float(spec.pair(spec.prepare(a[rows], "a", opts), spec.prepare(b[rows], "b", opts), opts))
                 for rows in (r.to(a.device) for r in draw_halves(n, bootstrap, gen))]
        estimand = estimand_of(tuple(spec.defaults))
        lo, hi = subsample_interval(score, draws, n, m, ci, estimand)
        out.update(ci_low=lo, ci_high=hi, interval_method=method_name(bootstrap, estimand), ci_draws=draws)
    return out
