"""Blocked exact k-nearest-neighbour search by inner product, without an N × N matrix.

``knn(x, k)`` returns, for every row i, the k rows j ≠ i with the largest ``x_i · x_j`` (cosine similarity when
rows are L2-normalised), ordered by decreasing similarity. **Ties are broken by lower index**: the list of row i is
the first k entries of all j ≠ i sorted by the key (−sim_ij, j). This holds for exact ties of the float32 values
as computed, so the result is reproducible and does not depend on how ``torch.topk`` orders equal values.

How it works: the similarity matrix is symmetric, so only its upper block triangle is computed. Row block I
(rows i0:i1) is multiplied with columns i0:N once; its row-wise top-k updates the candidates of rows I and its
column-wise top-k updates the candidates of the rows after I. This halves the dominant N²·D matmul work. Memory is
O(N·k + block·N); matmuls run in float32 on the input's device.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._checks import check_block_size, check_k

# Aim for a similarity block of at most ~256 MB (block · N · 4 bytes), and at most 1024 rows: small enough that
# the symmetric half-product saves ~45% of the matmul work, large enough for full matmul efficiency.
_BLOCK_BYTES = 256 * 2**20
_MAX_BLOCK = 1024
_MIN_BLOCK = 64


def auto_block_size(n: int) -> int:
    """Rows per similarity block for N rows: block·N·4 bytes ≤ 256 MB, between 64 and 1024 rows."""
    return max(1, min(n, _MAX_BLOCK, max(_MIN_BLOCK, _BLOCK_BYTES // (4 * max(n, 1)))))


def _order_keys(vals: Tensor, idx: Tensor) -> Tensor:
    """int64 keys whose descending order is (−value, index): float32 bits made order-preserving in the high word,
    the complement of the index in the low word. −0.0 is folded into +0.0 first."""
    bits = (vals.to(torch.float32) + 0.0).view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # monotone in the float value, as a signed integer
    return (ordered.to(torch.int64) << 32) | (0xFFFFFFFF - idx)


def lex_top(vals: Tensor, idx: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """The first k candidates of each row by (−value, index): decreasing similarity, lower index first on ties."""
    _, pos = _order_keys(vals, idx).topk(min(k, vals.shape[1]), dim=1)
    return vals.gather(1, pos), idx.gather(1, pos)


def _block_topk(s: Tensor, k: int, col_offset: int) -> Tuple[Tensor, Tensor]:
    """Top-min(k, ncols) of each row of ``s`` (columns are indices col_offset + c), exact under the tie rule."""
    ncols = s.shape[1]
    if ncols <= k:
        vals, pos = s.sort(dim=1, descending=True, stable=True)
        return vals, pos + col_offset
    vals, pos = torch.topk(s, k + 1, dim=1)
    # A tie at the k-th place means topk may have picked any of the tied columns: redo those rows with a stable
    # sort (columns are in increasing index order, so a stable sort keeps the lower index first).
    tied = (vals[:, k] == vals[:, k - 1]).nonzero()[:, 0]
    vals, pos = vals[:, :k], pos[:, :k]
    if len(tied):
        v2, p2 = s[tied].sort(dim=1, descending=True, stable=True)
        vals = vals.clone()
        pos = pos.clone()
        vals[tied] = v2[:, :k]
        pos[tied] = p2[:, :k]
    return vals, pos + col_offset


def _merge(best_v: Tensor, best_i: Tensor, rows: slice, new_v: Tensor, new_i: Tensor, k: int) -> None:
    v, i = lex_top(torch.cat([best_v[rows], new_v], dim=1), torch.cat([best_i[rows], new_i], dim=1), k)
    best_v[rows] = v
    best_i[rows] = i


def knn(x: Tensor, k: int, block_size: Optional[int] = None, exclude: Optional[Tensor] = None
        ) -> Tuple[Tensor, Tensor]:
    """Exact k nearest neighbours of every row of ``x`` (N × D) by inner product, self excluded.

    Args:
        x: features (float32 recommended; other float dtypes are cast to float32). Not normalised here.
        k: neighbours per row, 1 ≤ k < N.
        block_size: rows per similarity block (default: :func:`auto_block_size`). Does not change the result.
        exclude: optional integer id per row; rows sharing an id are never each other's neighbours (used for
            resamples with replacement, where copies of one sample must not count as neighbours).

    Returns:
        ``(values, indices)``, both N × k: similarities (float32) and neighbour indices (int64), sorted by
        decreasing similarity with ties broken by lower index.
    """
    n = x.shape[0]
    check_k(k, n)
    check_block_size(block_size)
    if exclude is not None:
        counts = torch.unique(exclude, return_counts=True)[1]
        if n - int(counts.max()) < k:
            raise ValueError(f"N must exceed k: after excluding rows with the same id only {n - int(counts.max())} "
                             f"candidates remain for k={k}")
    x = x.to(torch.float32)
    bs = block_size or auto_block_size(n)
    best_v = torch.full((n, k), -torch.inf, dtype=torch.float32, device=x.device)
    best_i = torch.full((n, k), n, dtype=torch.int64, device=x.device)  # placeholders, all replaced
    for i0 in range(0, n, bs):
        i1 = min(n, i0 + bs)
        s = x[i0:i1] @ x[i0:].T  # rows I against columns i0:N (upper block triangle)
        s[:, : i1 - i0].fill_diagonal_(-torch.inf)
        if exclude is not None:
            s.masked_fill_(exclude[i0:i1, None] == exclude[None, i0:], -torch.inf)
        rv, ri = _block_topk(s, k, i0)
        _merge(best_v, best_i, slice(i0, i1), rv, ri, k)
        if i1 < n:  # the same block, read by column, holds candidates for rows i1:N among rows I
            cv, ci = _block_topk(s[:, i1 - i0:].T.contiguous(), k, i0)
            _merge(best_v, best_i, slice(i1, n), cv, ci, k)
        del s
    if not bool(torch.isfinite(best_v).all()):
        raise ValueError("similarities are not finite (features too large for float32 inner products?)")
    return best_v, best_i


def permute_lists(vals: Tensor, idx: Tensor, perm: Tensor) -> Tuple[Tensor, Tensor]:
    """Neighbour lists of ``x[perm]`` from those of ``x``, without a new search.

    Row i of ``x[perm]`` is row perm[i] of ``x``; its neighbours are the rows of ``x[perm]`` holding x's neighbours
    of perm[i], i.e. ``inv[idx[perm[i]]]``. Lists are re-sorted with the tie rule under the new labels (identical
    to a fresh search unless exact ties straddle the k-th place).
    """
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm), device=perm.device)
    return lex_top(vals[perm], inv[idx[perm]], idx.shape[1])
