"""Neighbour-search behaviour that the mutation run of metrics/neighbors.py showed no test pinned down: the order
keys of ``lex_top`` (signed zeros, tiny values, other float dtypes), float64 input searched in float32, and the
errors of ``knn`` as whole lines."""

import pytest
import torch

from prh_stitch.metrics.neighbors import knn, lex_top


def test_signed_zeros_tie_and_the_lower_index_wins_whichever_sign_it_has():
    vals = torch.tensor([[-0.0, 0.0, -1.0], [0.0, -0.0, -1.0]])
    idx = torch.tensor([[1, 3, 0], [1, 3, 0]])
    _, i = lex_top(vals, idx, 3)
    assert i.tolist() == [[1, 3, 0], [1, 3, 0]]  # −0.0 == +0.0: index 1 first, in both rows


def test_tiny_similarities_keep_their_order():
    """Values far below 1 must not be merged into ties: 2e-8 > 1e-8 > 3e-30 > 0 > −1e-8, whatever the indices."""
    vals = torch.tensor([[1e-8, 2e-8, -1e-8, 3e-30, 0.0]])
    idx = torch.tensor([[0, 1, 2, 3, 4]])
    v, i = lex_top(vals, idx, 5)
    assert i.tolist() == [[1, 0, 3, 4, 2]]
    assert v.tolist() == vals[0, [1, 0, 3, 4, 2]][None].tolist()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_dtypes_are_ordered_like_their_float32_values(dtype):
    g = torch.Generator().manual_seed(3)
    vals = torch.randn(4, 7, generator=g).to(dtype)
    idx = torch.randperm(7, generator=g).repeat(4, 1)
    v, i = lex_top(vals, idx, 5)
    v32, i32 = lex_top(vals.float(), idx, 5)
    assert torch.equal(i, i32) and v.dtype == dtype and torch.equal(v.float(), v32)


def test_float64_features_are_compared_as_float32_similarities():
    """Rows 1 and 2 differ by 1e-12, below float32 resolution: their similarities to row 0 tie in float32, so the
    lower index is row 0's single neighbour (a float64 search would pick row 2)."""
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6 + 1e-12, 0.8], [-1.0, 0.0]], dtype=torch.float64)
    for bs in (None, 1, 2):
        v, i = knn(x, 1, block_size=bs)
        assert i[0, 0] == 1 and v.dtype == torch.float32 and float(v[0, 0]) == pytest.approx(0.6)
        assert i[1, 0] == 2 and i[2, 0] == 1  # 1 and 2 are each other's nearest rows


@pytest.mark.parametrize("block_size", [0, -1, 2.5, True])
def test_a_bad_block_size_is_refused_in_one_line(block_size):
    with pytest.raises(ValueError, match=rf"^block_size must be a positive integer or None, got {block_size!r}$"):
        knn(torch.randn(6, 3), 2, block_size=block_size)


def test_non_finite_similarities_are_refused_in_one_line():
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    x[2] = x[3] = 1e30  # their product overflows float32
    with pytest.raises(ValueError, match=r"^similarities are not finite \(features too large for float32 inner "
                                         r"products\?\)$"):
        knn(x, 2)
