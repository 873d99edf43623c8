"""What a study can and cannot find: its power over models, the best pair's stability, kNN across k and N.

- :func:`power_statement`: the smallest two-sided p the over-models test (exact permutation test of Spearman's
  rho, :func:`~prh_stitch.alignment.competence.rank_permutation_p`) can reach with the models at hand, stated
  before anything is computed. With n models of distinct competence it is 2/n! (3 models: 1/3), so a trend at
  p ≤ 0.05 needs at least 5 models; the report says so plainly rather than printing "no clear trend".
- :func:`best_pair_stability`: how often the best layer pair wins again when it is re-selected in random halves
  of the items (the selection's own variability, which the headline's max hides).
- :func:`knn_grid`: mutual kNN at several k and N with calibrated scores (s − null mean) / (1 − null mean) and z
  against the permutation null, so numbers from data sets of different sizes can be compared.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from prh_stitch.alignment.layer_sets import contextual_indices

ALPHA = 0.05
DEFAULT_GRID_K = (5, 10, 20)
DEFAULT_GRID_N = (256, 512, None)  # None = all items


def smallest_p(competence: Sequence[float]) -> Optional[float]:
    """The smallest p the over-models test can give for these competence values (ties make it larger).

    It is the p of a perfect ranking: alignment ordered exactly as competence. None below 3 models (no test).
    """
    from prh_stitch.alignment.competence import rank_permutation_p

    n = len(competence)
    if n < 3 or len(set(competence)) < 2:
        return None
    order = sorted(range(n), key=lambda i: (competence[i], i))
    concordant = [0.0] * n
    for rank, i in enumerate(order):
        concordant[i] = float(rank)
    return rank_permutation_p(list(competence), concordant)


def models_needed(alpha: float = ALPHA) -> int:
    """The fewest models of distinct competence whose smallest p, 2/n!, is at most ``alpha``."""
    n = 3
    while 2 / math.factorial(n) > alpha:
        n += 1
    return n


def power_statement(side: str, label: str, competence: Sequence[float], measured: bool = False,
                    alpha: float = ALPHA) -> Dict[str, Any]:
    """What the over-models test can detect with these models, in numbers and one sentence.

    ``measured``: the competence is measured during the study (bits per byte), so ``competence`` holds
    placeholders and the count is an upper bound (a model that is not a causal LM drops out), and the values are
    assumed distinct.
    """
    n = len(competence)
    p_min = smallest_p(list(range(n)) if measured else competence)
    need = models_needed(alpha)
    detectable = p_min is not None and p_min <= alpha
    count = f"{'at most ' if measured else ''}{n} {side} model{'s' if n != 1 else ''} with {label}"
    if p_min is None:
        sentence = (f"{count}: no over-models test is possible (it needs at least 3 models with distinct "
                    f"competence), so no trend can be claimed")
    elif detectable:
        sentence = (f"{count}: the smallest achievable two-sided p over models is {p_min:.3g}, so a trend can "
                    f"reach p ≤ {alpha:g} if the ranking is (nearly) perfect")
    else:
        sentence = (f"{count}: the smallest achievable two-sided p over models is {p_min:.3g} (exact permutation "
                    f"test of Spearman's ρ), so a trend cannot be detected at p ≤ {alpha:g} whatever the data show; "
                    f"that needs at least {need} models of distinct competence")
    return {"side": side, "competence": label, "n_models": n, "n_is_upper_bound": measured, "smallest_p": p_min,
            "alpha": alpha, "detectable": detectable, "models_needed": need, "sentence": sentence}


def _winner(matrix: Tensor, rows: Sequence[int], cols: Sequence[int]) -> tuple:
    """The (i, j) of the largest entry among ``rows`` × ``cols``; ties go to the lowest (i, j)."""
    return min((-float(matrix[i, j]), i, j) for i in rows for j in cols)[1:]


def best_pair_stability(a: Sequence[Tensor], b: Sequence[Tensor], names_a: Sequence[str], names_b: Sequence[str],
                        metric: str, opts: Dict[str, Any], draws: int, seed: int) -> Dict[str, Any]:
    """Re-select the best layer pair in ``draws`` random halves of the items; how often does each pair win?

    The halves are :func:`~prh_stitch.alignment.scoring.half_sample_subsets` (the study's own half-samples, same
    seed). Both selections are re-run: over all layer pairs and over contextual layers only. ``stability`` is the
    share of halves in which the full-sample winner wins again; ``winners`` lists every pair that won a half
    (names and count), most frequent first.
    """
    from prh_stitch.alignment.scoring import half_sample_subsets
    from prh_stitch.metrics import layer_alignment

    n = a[0].shape[0]
    all_a, all_b = list(range(len(a))), list(range(len(b)))
    ctx_a, ctx_b = contextual_indices(names_a), contextual_indices(names_b)
    full = layer_alignment(a, b, metric, **opts)["scores"]
    selections = {"all": (all_a, all_b)}
    if ctx_a and ctx_b:
        selections["contextual"] = (ctx_a, ctx_b)
    full_best = {key: _winner(full, *sel) for key, sel in selections.items()}
    counts: Dict[str, Dict[tuple, int]] = {key: {} for key in selections}
    for subset in half_sample_subsets(n, draws, seed):
        subset = subset.to(a[0].device)
        scores = layer_alignment([x[subset] for x in a], [y[subset] for y in b], metric, **opts)["scores"]
        for key, sel in selections.items():
            w = _winner(scores, *sel)
            counts[key][w] = counts[key].get(w, 0) + 1
    out: Dict[str, Any] = {"draws": draws, "half_size": n // 2,
                           "method": f"best layer pair re-selected in each of {draws} random halves of the items"}
    for key in selections:
        ranked = sorted(counts[key].items(), key=lambda kv: (-kv[1], kv[0]))
        out[key] = {"best": [names_a[full_best[key][0]], names_b[full_best[key][1]]],
                    "stability": counts[key].get(full_best[key], 0) / draws,
                    "winners": [{"layer_a_name": names_a[i], "layer_b_name": names_b[j], "count": c}
                                for (i, j), c in ranked]}
    return out


def knn_grid(a: Tensor, b: Tensor, ks: Sequence[int], ns: Sequence[Optional[int]], permutations: int,
             seed: int) -> List[Dict[str, Any]]:
    """Mutual kNN of one layer pair at every (k, N), each against its own permutation null.

    N below the item count takes a fixed random subset of the items (seeded; the same for every model pair of
    the same size); ``None`` or N at least the item count takes them all. Cells with N ≤ k + 1 are left out.
    Each row: ``k``, ``n``, ``score``, ``chance`` (k/(N−1)), ``null_mean``, ``null_std``, ``z`` and
    ``calibrated`` = (score − null mean) / (1 − null mean), 0 at chance and 1 for identical neighbourhoods.
    """
    from prh_stitch.metrics import calibrate

    total = a.shape[0]
    rows = []
    sizes = sorted({total if n is None or n >= total else int(n) for n in ns})
    for n in sizes:
        if n < total:
            subset = torch.randperm(total, generator=torch.Generator().manual_seed(seed + n))[:n].sort().values
            xa, xb = a[subset.to(a.device)], b[subset.to(b.device)]
        else:
            xa, xb = a, b
        for k in sorted(set(ks)):
            if n <= k + 1:
                continue
            cal = calibrate("mutual_knn", xa, xb, permutations=permutations, bootstrap=0, seed=seed, k=k)
            rows.append({"k": k, "n": n, "full": n == total, **{key: cal.get(key) for key in (
                "score", "chance", "null_mean", "null_std", "z", "calibrated")}})
    return rows
