"""Cross-modal retrieval between paired sets, blocked (no N × N matrix).

For query i of one side, the items of the other side are ranked by cosine similarity, ties broken by lower
index. Correct items are j = i and, when ``groups`` is given, every j with ``groups[j] == groups[i]`` (e.g. the
same caption text: any item with the identical text counts as correct). The rank (1-based) is the position of the
first correct item in that order; recall@k is the fraction of queries whose rank ≤ k (k ≥ N gives 1.0).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

from ._checks import check_block_size, check_pair, to_float32
from .neighbors import auto_block_size


def _check_groups(groups: Optional[Tensor], n: int) -> Optional[Tensor]:
    if groups is None:
        return None
    if not isinstance(groups, Tensor) or groups.ndim != 1 or len(groups) != n:
        raise ValueError(f"groups must be a 1-D tensor with one id per row (N={n}), got "
                         f"{tuple(groups.shape) if isinstance(groups, Tensor) else type(groups).__name__}")
    if groups.is_floating_point() or groups.is_complex() or groups.dtype == torch.bool:
        raise ValueError(f"groups must be an integer tensor, got dtype {groups.dtype}")
    return groups


def ranks(queries: Tensor, items: Tensor, groups: Optional[Tensor] = None, block_size: Optional[int] = None
          ) -> Tensor:
    """1-based rank of the first correct item for every query row (float32 features, any normalisation)."""
    n = queries.shape[0]
    bs = block_size or auto_block_size(n)
    cols = torch.arange(n, device=queries.device)
    out = torch.empty(n, dtype=torch.int64, device=queries.device)
    for i0 in range(0, n, bs):
        i1 = min(n, i0 + bs)
        s = queries[i0:i1] @ items.T
        rows = torch.arange(i1 - i0, device=s.device)
        if groups is None:
            best_j = cols[i0:i1]
            best_s = s[rows, best_j]
        else:
            correct = groups[i0:i1, None] == groups[None, :]
            masked = s.masked_fill(~correct, -torch.inf)
            best_s = masked.max(1).values
            best_j = torch.where(masked == best_s[:, None], cols, n).min(1).values
        ahead = (s > best_s[:, None]) | ((s == best_s[:, None]) & (cols < best_j[:, None]))
        out[i0:i1] = ahead.sum(1) + 1
    return out


def retrieval(a: Tensor, b: Tensor, groups: Optional[Tensor] = None, normalize: bool = True,
              ks: Sequence[int] = (1, 5, 10), block_size: Optional[int] = None) -> Dict[str, float]:
    """Recall@k both ways, mean/median rank and the mean cosine of the true pairs.

    Returns keys ``"a2b/recall@{k}"``, ``"b2a/recall@{k}"`` for k in ``ks``, ``"a2b/mean_rank"``,
    ``"a2b/median_rank"``, ``"b2a/mean_rank"``, ``"b2a/median_rank"`` and ``"mean_cosine"`` (cosine of a_i and b_i,
    whatever ``normalize``). Median of an even count is the mean of the two middle ranks. ``normalize=False``
    ranks by raw inner product.
    """
    n = check_pair(a, b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"retrieval compares a and b directly, so their widths must match: a has {a.shape[1]} "
                         f"features, b has {b.shape[1]} (stitch one side first)")
    groups = _check_groups(groups, n)
    check_block_size(block_size)
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    fa, fb = to_float32(a, normalize, "a"), to_float32(b, normalize, "b")
    out: Dict[str, float] = {}
    r = {"a2b": ranks(fa, fb, groups, block_size), "b2a": ranks(fb, fa, groups, block_size)}
    for d in ("a2b", "b2a"):
        for k in ks:
            out[f"{d}/recall@{k}"] = float((r[d] <= k).double().mean())
    for d in ("a2b", "b2a"):
        out[f"{d}/mean_rank"] = float(r[d].double().mean())
        out[f"{d}/median_rank"] = float(r[d].double().quantile(0.5))
    na = torch.linalg.vector_norm(fa, dim=1).double()
    nb = torch.linalg.vector_norm(fb, dim=1).double()
    if bool(((na == 0) | (nb == 0)).any()):
        raise ValueError("a zero row has no cosine similarity (mean_cosine); remove zero rows")
    out["mean_cosine"] = float(((fa.double() * fb.double()).sum(1) / (na * nb)).mean())
    return out


def chance_recall(groups: Tensor, k: int = 1) -> Tensor:
    """Per-query chance of recall@k (float64, one per row) when all N items are ranked uniformly at random.

    A query whose group (same caption) has g members, itself included, has g correct items among N; the chance
    that none of them is among the first k of a random order is C(N-g, k) / C(N, k) = Π_{j<k} (N-g-j) / (N-j),
    so chance recall@k = 1 - that product; for k = 1 it is g / N, and averaged over all queries Σ|g|² / N².
    """
    groups = _check_groups(groups, len(groups))
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    n = len(groups)
    if n == 0:
        raise ValueError("chance_recall needs at least one row")
    _, inverse, sizes = torch.unique(groups, return_inverse=True, return_counts=True)
    g = sizes[inverse].double()
    miss = torch.ones(n, dtype=torch.float64, device=groups.device)
    for j in range(min(k, n)):
        # The factor reaches 0 once j = N - g (fewer wrong items than draws), before N - j does.
        miss = miss * ((n - g - j) / (n - j)).clamp(min=0.0)
    return 1.0 - miss


def retrieval_subsets(a: Tensor, b: Tensor, groups: Tensor, subsets: Dict[str, Tensor], normalize: bool = True,
                      ks: Sequence[int] = (1, 5, 10), block_size: Optional[int] = None) -> Dict[str, Dict[str, float]]:
    """Recall@k both ways averaged over subsets of the queries (ranked against all N items), with exact chance.

    ``subsets`` maps a name to a boolean mask of the rows (e.g. seen / unseen captions); each gets ``n`` (queries),
    ``distinct`` (distinct groups among them), ``a2b/recall@k``, ``b2a/recall@k`` and ``chance@k`` (the mean of
    :func:`chance_recall` over its queries; the same both ways, as groups are shared). An empty subset gets
    ``n = 0`` and NaN scores.
    """
    n = check_pair(a, b)
    groups = _check_groups(groups, n)
    check_block_size(block_size)
    fa, fb = to_float32(a, normalize, "a"), to_float32(b, normalize, "b")
    r = {"a2b": ranks(fa, fb, groups, block_size), "b2a": ranks(fb, fa, groups, block_size)}
    chance = {k: chance_recall(groups, k) for k in ks}
    out: Dict[str, Dict[str, float]] = {}
    for name, mask in subsets.items():
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (n,):
            raise ValueError(f"subset {name!r} must be a boolean mask with one entry per row (N={n})")
        mask = mask.to(groups.device)
        count = int(mask.sum())
        scores: Dict[str, float] = {"n": count, "distinct": int(torch.unique(groups[mask]).numel())}
        for k in ks:
            for d in ("a2b", "b2a"):
                scores[f"{d}/recall@{k}"] = float((r[d][mask] <= k).double().mean()) if count else float("nan")
            scores[f"chance@{k}"] = float(chance[k][mask].mean()) if count else float("nan")
        out[name] = scores
    return out
