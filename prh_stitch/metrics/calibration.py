"""Honest scores: chance level, permutation null, calibrated score and bootstrap interval."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Union

import torch
from torch import Tensor

from ._checks import check_pair
from ._spec import options, spec_of


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
    - Bootstrap ``ci_low``/``ci_high`` (percentile interval, level ``ci``) when ``bootstrap > 0``. For the kNN
      metrics (means of per-sample scores) the per-sample scores are resampled, conditional on the neighbour
      graph. For the others rows are resampled with replacement and the metric recomputed; copies of one
      sample are never each other's neighbours in CKNNA's search.

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
    out.update(ci_low=None, ci_high=None, ci=ci)
    if bootstrap:
        boots = []
        items = spec.per_item(sa, sb, opts) if spec.per_item is not None else None
        for _ in range(bootstrap):
            idx = torch.randint(n, (n,), generator=gen).to(a.device)
            if items is not None:
                boots.append(float(items[idx].mean()))
            else:
                boots.append(float(spec.pair(spec.prepare(a[idx], "a", opts, origin=idx),
                                             spec.prepare(b[idx], "b", opts, origin=idx), opts)))
        t = torch.tensor(boots, dtype=torch.float64)
        q = torch.tensor([(1 - ci) / 2, (1 + ci) / 2], dtype=torch.float64)
        lo, hi = torch.quantile(t, q).tolist()
        out.update(ci_low=lo, ci_high=hi)
    return out
