"""Confidence intervals for alignment scores by half-sampling: no duplicated rows, neighbours searched anew.

Why not the bootstrap with replacement: a resample holding row i twice adds the pair (i, i) to both kernels, so
CKA and its relatives are inflated in every resample (the old 95 % interval covered the population CKA in 2 of
20 simulated data sets and its own point estimate in 0 of 20); and a kNN score resampled per item on the fixed
neighbour graph misses the graph's own variability (too narrow). So every draw here is a subset of m = ⌊N/2⌋
*distinct* rows, and the metric is recomputed from scratch on it (neighbour search, bandwidth, centring, all).

The rescaling. For a score that behaves like a mean of N terms with variance σ², a subset of m distinct rows out
of N has Var(θ̂_m − θ̂_N | data) = σ²(1/m − 1/N), while the score's own sampling error has variance σ²/N; so the
deviations θ̂_m − θ̂_N multiplied by c = √(m / (N − m)) have the spread of θ̂_N − θ (subsampling, Politis &
Romano 1994, with the finite-population factor of the delete-d jackknife, Shao & Wu 1989). With m = N/2, c = 1:
half-sampling needs no rescaling at all. The interval is the *basic* one, [θ̂_N − c·q_hi, θ̂_N − c·q_lo], with q
the quantiles of the deviations.

What the interval is for (the estimand) decides where the deviations are measured from:

- ``population`` (CKA, unbiased CKA, SVCCA): the score's value for infinitely many samples. These estimators are
  consistent with a bias of order 1/N; at m = N/2 that bias is twice the full sample's, so the deviations
  θ̂_m − θ̂_N keep their mean, which estimates the full sample's bias, and the basic interval removes it.
- ``N-sample`` (every metric with a neighbour count k: mutual/cycle/LCS/edit-distance kNN and CKNNA): at fixed k
  the score changes with N (neighbourhoods shrink as samples are added; a neighbour list of 10 among 512 is a
  different quantity from 10 among 1024), and there is no useful N → ∞ value. The estimand is the expected score
  of an N-sample at the same k — what a replication on fresh data of the same size would give — which θ̂_N
  estimates without bias. The half-samples' mean shift is this N-dependence, not error, so the deviations are
  measured from their own mean; only their spread is used.

Re-selection (the best layer pair) uses the same recipe with θ̂ = the maximum over layer pairs, re-selected
inside each half (see :mod:`prh_stitch.alignment.scoring`).
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
from torch import Tensor

POPULATION = "population"
N_SAMPLE = "N-sample"


def half_size(n: int) -> int:
    """Rows per half-sample: ⌊N/2⌋ (c = 1 for even N)."""
    return n // 2


def rescale_factor(n: int, m: int) -> float:
    """c = √(m / (N − m)): deviations of m-row subsets times c have the spread of the N-row score's error."""
    if not 0 < m < n:
        raise ValueError(f"a subsample must hold between 1 and N − 1 rows, got m={m} of N={n}")
    return math.sqrt(m / (n - m))


def draw_halves(n: int, draws: int, generator: torch.Generator) -> List[Tensor]:
    """``draws`` random subsets of ⌊N/2⌋ distinct rows each, from ``generator`` (CPU), each in increasing order.

    Sorted, so a half keeps the rows' relative order and the lower-index tie rule of the neighbour search picks
    the same neighbours as it would in a data set made of just those rows.
    """
    m = half_size(n)
    return [torch.randperm(n, generator=generator)[:m].sort().values for _ in range(draws)]


def estimand_of(option_names: Sequence[str]) -> str:
    """``N-sample`` for metrics with a neighbour count k (their value depends on N), else ``population``."""
    return N_SAMPLE if "k" in option_names else POPULATION


def subsample_interval(full: float, draws: Sequence[float], n: int, m: int, ci: float, estimand: str
                       ) -> Tuple[float, float]:
    """Basic interval of level ``ci`` from subsample scores ``draws`` (each on m of the N rows).

    ``population``: deviations from the full-sample score (their mean corrects the 1/N bias);
    ``N-sample``: deviations from the draws' own mean (θ̂_N is already unbiased for the N-sample value).
    """
    if estimand not in (POPULATION, N_SAMPLE):
        raise ValueError(f"unknown estimand {estimand!r}; use {POPULATION!r} or {N_SAMPLE!r}")
    if not draws:
        raise ValueError("an interval needs at least one subsample draw")
    t = torch.tensor(list(draws), dtype=torch.float64)
    dev = t - (t.mean() if estimand == N_SAMPLE else full)
    q = torch.tensor([(1 - ci) / 2, (1 + ci) / 2], dtype=torch.float64)
    q_lo, q_hi = torch.quantile(dev, q).tolist()
    c = rescale_factor(n, m)
    return full - c * q_hi, full - c * q_lo


def method_name(draws: int, estimand: str, selection: bool = False) -> str:
    """How a report names the interval, e.g. ``half-sample, 200 draws, N-sample estimand``."""
    name = f"half-sample, {draws} draws, {estimand} estimand"
    return name + ", best pair re-selected in every half" if selection else name



def best_pair_interval(full: Tensor, halves: Sequence[Tensor], n: int, ci: float, estimand: str) -> dict:
    """Selection-aware interval for "the best layer pair's score" from the La × Lb score matrices.

    ``full`` is the matrix on all N rows, ``halves`` the matrices on each half-sample. The statistic is the
    maximum over pairs *re-selected in every half*, so the interval carries the selection's own variability (a
    winner that changes from half to half widens it; for population estimands the mean shift of the half maxima
    also subtracts the max's upward bias). ``stability`` is the share of halves in which the full-sample winner
    wins again; ``winners`` counts every pair that won a half, most frequent first.
    """
    if not halves:
        raise ValueError("a selection-aware interval needs at least one half-sample")
    best = int(full.argmax())
    maxima = [float(h.max()) for h in halves]
    wins = [int(h.argmax()) for h in halves]
    cols = full.shape[1]
    counts: dict = {}
    for w in wins:
        counts[w] = counts.get(w, 0) + 1
    low, high = subsample_interval(float(full.max()), maxima, n, half_size(n), ci, estimand)
    return {"ci_low": low, "ci_high": high, "interval_method": method_name(len(halves), estimand, selection=True),
            "stability": counts.get(best, 0) / len(halves),
            "winners": [[w // cols, w % cols, c] for w, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))],
            "draws": maxima}
