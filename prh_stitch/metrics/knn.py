"""Nearest-neighbour alignment metrics (Huh et al. 2024): mutual, cycle, LCS and edit-distance kNN.

All four compare, for every sample i, its k nearest neighbours among the other samples in space A with those in
space B (cosine similarity after row L2 normalisation by default; self excluded; ties broken by lower index, see
:mod:`prh_stitch.metrics.neighbors`). Each side's neighbour lists are computed once by a blocked search (no N × N
matrix) and then shared: between the four metrics in :func:`prh_stitch.metrics.layer_alignment`, and across the
permutations of :func:`prh_stitch.metrics.calibrate`.

Differences from the paper's code (platonic-rep ``metrics.py``), on purpose:
- ``lcs_knn`` divides the LCS length by k so it lies in [0, 1]; the paper's code reports the undivided length
  (multiply by k to compare).
- Ties are broken by lower index; the paper's ``argsort`` leaves the order of equal similarities unspecified.
Otherwise the definitions are the paper's, and on tie-free data the numbers agree with its code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor

from ._checks import check_block_size, check_k, to_float32
from ._spec import attach, run
from .neighbors import knn, permute_lists


@dataclass
class KnnSide:
    """Neighbour lists of one side: ``values``/``indices`` are N × k, sorted, self excluded."""

    values: Tensor
    indices: Tensor


def _prepare(x: Tensor, name: str, opts: Dict[str, Any], origin: Optional[Tensor] = None) -> KnnSide:
    v, i = knn(to_float32(x, opts["normalize"], name), opts["k"], opts["block_size"], exclude=origin)
    return KnnSide(v, i)


def _permute(side: KnnSide, perm: Tensor, opts: Dict[str, Any]) -> KnnSide:
    return KnnSide(*permute_lists(side.values, side.indices, perm))


def _check(n: int, opts: Dict[str, Any]) -> None:
    check_k(opts["k"], n)
    check_block_size(opts["block_size"])


def mutual_items(sa: KnnSide, sb: KnnSide) -> Tensor:
    """|N_A(i) ∩ N_B(i)| / k for every i."""
    ia, ib = sa.indices, sb.indices
    return (ia[:, :, None] == ib[:, None, :]).any(-1).sum(-1).double() / ia.shape[1]


def cycle_items(sa: KnnSide, sb: KnnSide) -> Tensor:
    """1 if i ∈ N_A(j) for some j ∈ N_B(i), else 0, for every i."""
    n = sa.indices.shape[0]
    hops = sa.indices[sb.indices]  # (N, k, k): A-neighbours of each B-neighbour of i
    me = torch.arange(n, device=hops.device)[:, None, None]
    return (hops == me).flatten(1).any(1).double()


def lcs_items(sa: KnnSide, sb: KnnSide) -> Tensor:
    """Longest common subsequence of the ordered lists, divided by k, for every i.

    Row-vectorised DP: with T_j = max(L[r−1][j], L[r−1][j−1] + match), L[r][j] = max_{j' ≤ j} T_j' (a cummax).
    """
    ia, ib = sa.indices, sb.indices
    n, k = ia.shape
    prev = torch.zeros(n, k + 1, dtype=torch.int32, device=ia.device)
    for r in range(k):
        match = (ia[:, r : r + 1] == ib).to(torch.int32)
        t = torch.maximum(prev[:, 1:], prev[:, :-1] + match)
        prev = torch.cat([prev[:, :1], torch.cummax(t, dim=1).values], dim=1)
    return prev[:, -1].double() / k


def edit_items(sa: KnnSide, sb: KnnSide) -> Tensor:
    """1 − Levenshtein(ordered lists) / k for every i.

    Row-vectorised DP: with T_j = min(D[r−1][j] + 1, D[r−1][j−1] + cost), D[r][j] = min_{j' ≤ j} T_j' + (j − j'),
    i.e. j + cummin(T_j' − j') with T_0 = r.
    """
    ia, ib = sa.indices, sb.indices
    n, k = ia.shape
    cols = torch.arange(k + 1, dtype=torch.int32, device=ia.device)
    prev = cols.expand(n, k + 1)
    for r in range(1, k + 1):
        cost = (ia[:, r - 1 : r] != ib).to(torch.int32)
        t = torch.minimum(prev[:, 1:] + 1, prev[:, :-1] + cost)
        t = torch.cat([torch.full((n, 1), r, dtype=torch.int32, device=ia.device), t], dim=1)
        prev = cols + torch.cummin(t - cols, dim=1).values
    return 1.0 - prev[:, -1].double() / k


@dataclass(frozen=True)
class _ItemScores:
    """``pair`` and ``per_item`` of a metric whose score is the mean of per-sample scores ``items(sa, sb)``.

    Methods of a class rather than closures built at import, so that each call runs the current code (a mutation
    tester swaps function bodies at call time; a closure made once at import would keep the original).
    """

    items: Callable[[KnnSide, KnnSide], Tensor]

    def pair(self, sa: KnnSide, sb: KnnSide, opts: Dict[str, Any]) -> float:
        return float(self.items(sa, sb).double().mean())

    def per_item(self, sa: KnnSide, sb: KnnSide, opts: Dict[str, Any]) -> Tensor:
        return self.items(sa, sb)


def _mutual_chance(n: int, opts: Dict[str, Any]) -> float:
    """E|N_A(i) ∩ N_B(i)| / k = k / (N − 1) when B's list is a uniform random k-subset of the N − 1 others."""
    return opts["k"] / (n - 1)


def _cycle_chance(n: int, opts: Dict[str, Any]) -> float:
    """1 − (1 − k/(N − 1))^k: each of i's k B-neighbours has i among its A-neighbours with chance k/(N − 1)."""
    return 1.0 - (1.0 - opts["k"] / (n - 1)) ** opts["k"]


def mutual_knn(a: Tensor, b: Tensor, k: int = 10, normalize: bool = True, block_size: Optional[int] = None) -> float:
    """Mean over samples of |N_A(i) ∩ N_B(i)| / k (order inside the lists ignored). Symmetric, in [0, 1].

    Chance level for unrelated features: k / (N − 1). ``block_size`` only trades memory for speed.
    """
    return run(mutual_knn.spec, a, b, dict(k=k, normalize=normalize, block_size=block_size))


def cycle_knn(a: Tensor, b: Tensor, k: int = 10, normalize: bool = True, block_size: Optional[int] = None) -> float:
    """Fraction of samples i with i ∈ N_A(j) for at least one j ∈ N_B(i) (B-neighbours, then A-neighbours).

    Not symmetric. Chance level about 1 − (1 − k/(N − 1))^k.
    """
    return run(cycle_knn.spec, a, b, dict(k=k, normalize=normalize, block_size=block_size))


def lcs_knn(a: Tensor, b: Tensor, k: int = 10, normalize: bool = True, block_size: Optional[int] = None) -> float:
    """Mean longest common subsequence of the two ordered neighbour lists, **divided by k** (in [0, 1]).

    The paper's code reports the undivided length; multiply by k to compare with it.
    """
    return run(lcs_knn.spec, a, b, dict(k=k, normalize=normalize, block_size=block_size))


def edit_distance_knn(a: Tensor, b: Tensor, k: int = 10, normalize: bool = True,
                      block_size: Optional[int] = None) -> float:
    """Mean of 1 − Levenshtein(ordered N_A(i), ordered N_B(i)) / k; 1 for identical lists, in [0, 1]."""
    return run(edit_distance_knn.spec, a, b, dict(k=k, normalize=normalize, block_size=block_size))


_SIDES = dict(prepare=_prepare, permute=_permute, check=_check)  # every kNN metric prepares its sides alike
_MUTUAL, _CYCLE, _LCS, _EDIT = (_ItemScores(f) for f in (mutual_items, cycle_items, lcs_items, edit_items))
attach(mutual_knn, **_SIDES, chance=_mutual_chance, pair=_MUTUAL.pair, per_item=_MUTUAL.per_item)
attach(cycle_knn, **_SIDES, chance=_cycle_chance, pair=_CYCLE.pair, per_item=_CYCLE.per_item)
attach(lcs_knn, **_SIDES, pair=_LCS.pair, per_item=_LCS.per_item)
attach(edit_distance_knn, **_SIDES, pair=_EDIT.pair, per_item=_EDIT.per_item)
