"""An interval for Spearman's rho between competence and alignment that keeps its promise with a handful of models.

Percentiles of rho over half-samples do not: rho of 5 noisy scores is bounded, discrete and biased towards 0 by
noise, and in simulations the old percentile interval covered the models' true rho in 0–93 % of data sets at a
nominal 95 % (one report printed rho = 1.00 with the "interval" [-0.82, 0.87]). Recentring the half-sample
deviations does not repair it either (14–94 %).

What the half-samples do resolve is which model is more aligned than which. So:

1. For every pair of models (i, j), the difference of their scores in each half-sample (the same halves for every
   model, so the item effects that move all models together cancel), and a simultaneous 95 % band for all pairs:
   each difference ± q·sd, with q the 95 % quantile over halves of max over pairs of |deviation| / sd (a max-t band;
   deviations from the halves' own mean, whose spread at N/2 rows equals the full sample's, see
   :mod:`prh_stitch.metrics.intervals`).
2. A pair whose band excludes 0 is *resolved*: its order is fixed. The interval is the range of rho over every
   ranking of the models that respects all resolved pairs.

If the band covers all true differences (probability ≥ 95 %), the true ranking is one of those rankings, so the
interval covers rho of the models' true alignments with probability ≥ 95 %: conservative by construction, and
checked by simulation in ``tests/test_ranking_interval.py``. The estimand is rho between competence and each
model's expected score at this N (the N-sample value of the alignment metric).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

MAX_MODELS = 9  # the range is found by listing rankings: 9! = 362,880 in the worst case (no pair resolved)

METHOD = ("range of Spearman's rho over the model rankings consistent with the pairwise differences that "
          "{draws} half-samples resolve simultaneously at 95 % (max-t band; conservative)")


def resolved_pairs(replicates: Sequence[Sequence[float]], scores: Sequence[float], ci: float = 0.95
                   ) -> List[Tuple[int, int]]:
    """Pairs (low, high): model ``low``'s score is below model ``high``'s, resolved by the simultaneous band.

    ``replicates[r][m]`` is model m's score in half-sample r (the same halves for every model); ``scores`` are the
    full-sample scores.
    """
    reps = torch.tensor([list(r) for r in replicates], dtype=torch.float64)
    full = torch.tensor(list(scores), dtype=torch.float64)
    m = full.numel()
    if reps.ndim != 2 or reps.shape[1] != m or reps.shape[0] < 2:
        raise ValueError(f"replicates must be draws x models with at least 2 draws and {m} models, got "
                         f"{tuple(reps.shape)}")
    i, j = torch.triu_indices(m, m, offset=1)
    diffs = reps[:, i] - reps[:, j]
    deviations = diffs - diffs.mean(0)
    sd = deviations.std(0)
    # A pair that never varies (identical deviations) is resolved by its full-sample difference alone.
    t = torch.where(sd > 0, deviations.abs() / sd.clamp_min(1e-300), torch.zeros_like(deviations))
    q = float(torch.quantile(t.max(1).values, ci))
    d = full[i] - full[j]
    out = []
    for a, b, diff, spread in zip(i.tolist(), j.tolist(), d.tolist(), sd.tolist()):
        if diff - q * spread > 0:
            out.append((b, a))
        elif diff + q * spread < 0:
            out.append((a, b))
    return out


def rho_range(competence: Sequence[float], order_constraints: Sequence[Tuple[int, int]]
              ) -> Optional[Tuple[float, float]]:
    """Smallest and largest Spearman rho between ``competence`` and a strict ranking of the models that puts
    ``low`` below ``high`` for every constraint; None for more than :data:`MAX_MODELS` models or a constant
    competence.

    A strict ranking is a permutation of 0..m-1, whose mean and norm are fixed, so rho is linear in
    sum_k rank_k * c_k (c: centred competence ranks): the search keeps that sum, not a correlation per ranking.
    """
    from prh_stitch.alignment.competence import _rank

    m = len(competence)
    if m > MAX_MODELS or m < 2:
        return None
    c = _rank(torch.tensor(list(competence), dtype=torch.float64))
    c = (c - c.mean()).tolist()
    scale = (sum(v * v for v in c) * (m * (m * m - 1) / 12.0)) ** 0.5  # |c| * |centred 0..m-1|
    if scale == 0:
        return None
    below = [0] * m  # bit masks: the models that must be ranked lower than k
    for low, high in order_constraints:
        below[high] |= 1 << low
    extremes = [float("inf"), float("-inf")]

    def place(position: int, placed: int, total: float) -> None:
        if position == m:
            extremes[0], extremes[1] = min(extremes[0], total), max(extremes[1], total)
            return
        for k in range(m):  # rank k here once everything that must be below it is placed
            if not placed >> k & 1 and below[k] & ~placed == 0:
                place(position + 1, placed | 1 << k, total + position * c[k])

    place(0, 0, 0.0)
    if extremes[0] > extremes[1]:
        return None  # contradictory constraints (a cycle): cannot come from one set of scores
    return extremes[0] / scale, extremes[1] / scale


def spearman_interval(competence: Sequence[float], scores: Sequence[float], replicates: Sequence[Sequence[float]],
                      ci: float = 0.95) -> Dict[str, object]:
    """The interval of the module docstring, with the resolved pairs and the method's name."""
    pairs = resolved_pairs(replicates, scores, ci)
    bounds = rho_range(competence, pairs)
    return {"spearman_ci": list(bounds) if bounds else [None, None], "resolved_pairs": [list(p) for p in pairs],
            "pairs": len(scores) * (len(scores) - 1) // 2,
            "interval_method": METHOD.format(draws=len(replicates)) if bounds else
            f"none: the range is listed exactly for at most {MAX_MODELS} models"}
