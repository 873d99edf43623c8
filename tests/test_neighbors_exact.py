"""The blocked kNN search, exactly, against a sort-based brute force: values, order, ties, exclusion, relabelling.

The brute force sorts every row of the full similarity matrix by (−similarity, index) with NumPy, so it shares no
code with the blocked search; every test runs several block sizes, including ones that split the rows unevenly.
"""

import numpy as np
import pytest
import torch

from prh_stitch.metrics.neighbors import auto_block_size, knn, lex_top, permute_lists


def brute(x, k, exclude=None):
    s = x.double().numpy() @ x.double().numpy().T
    s = s.astype(np.float32).astype(np.float64)  # the search compares float32 similarities
    np.fill_diagonal(s, -np.inf)
    if exclude is not None:
        e = exclude.numpy()
        s[e[:, None] == e[None, :]] = -np.inf
    order = np.lexsort((np.broadcast_to(np.arange(len(s)), s.shape), -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), order


def _check(x, k, bs, exclude=None):
    v, i = knn(x, k, block_size=bs, exclude=exclude)
    rv, ri = brute(x, k, exclude)
    assert v.dtype == torch.float32 and i.dtype == torch.int64 and v.shape == i.shape == (len(x), k)
    np.testing.assert_array_equal(i.numpy(), ri)
    np.testing.assert_allclose(v.double().numpy(), rv, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,k", [(2, 1), (5, 4), (9, 3), (17, 5), (17, 16)])
def test_random_rows_equal_the_brute_force(n, k):
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(n + k))
    for bs in (None, 1, 2, 3, 7, n):
        _check(x, k, bs)


def test_ties_everywhere_are_broken_by_lower_index():
    g = torch.Generator().manual_seed(0)
    x = torch.eye(4)[torch.randint(4, (23,), generator=g)]  # similarities are exactly 0 or 1
    for k in (1, 3, 6, 12):
        for bs in (None, 1, 2, 5, 8):
            _check(x, k, bs)


def test_negative_and_signed_zero_similarities_keep_their_order():
    # rows whose similarities are negative, +0.0 and −0.0: the order keys must sort them as the floats do
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [-0.5, 0.5], [0.5, -0.25], [-2.0, -1.0]])
    for k in (1, 3, 6):
        for bs in (None, 1, 2, 3):
            _check(x, k, bs)
    vals = torch.tensor([[-0.0, 0.0, -1.0, 2.0, -3.0, 0.5]])
    idx = torch.tensor([[4, 2, 1, 0, 3, 5]])
    v, i = lex_top(vals, idx, 6)
    assert i.tolist() == [[0, 5, 2, 4, 1, 3]]  # 2, 0.5, then ±0 by lower index, then −1, −3
    assert v[0, 0] == 2.0 and v[0, -1] == -3.0


def test_exclusion_by_id_equals_masking_in_the_brute_force():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(19, 3, generator=g)
    ids = torch.randint(7, (19,), generator=g)
    # near-copies of one sample: without the exclusion they would be each other's nearest neighbours
    x[ids == 3] = x[ids == 3][:1] + 1e-3 * torch.randn(int((ids == 3).sum()), 3, generator=g)
    for k in (1, 4, 9):
        for bs in (None, 1, 4, 6):
            _check(x, k, bs, exclude=ids)
    with pytest.raises(ValueError, match="after excluding rows with the same id only 2 candidates remain for k=3"):
        knn(torch.randn(4, 2), 3, exclude=torch.tensor([0, 0, 1, 1]))
    v, i = knn(torch.randn(4, 2, generator=g), 2, exclude=torch.tensor([0, 0, 1, 1]))  # exactly enough remain
    assert sorted(i[0].tolist()) == [2, 3] and sorted(i[2].tolist()) == [0, 1]


def test_non_finite_similarities_are_refused():
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    x[2] = x[3] = 1e30  # their product overflows float32
    with pytest.raises(ValueError, match="not finite"):
        knn(x, 2)


@pytest.mark.parametrize("n,k", [(8, 3), (15, 4)])
def test_permuted_lists_equal_a_fresh_search_of_the_permuted_rows(n, k):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 3, generator=g)
    perm = torch.randperm(n, generator=g)
    v, i = knn(x, k)
    pv, pi = permute_lists(v, i, perm)
    fv, fi = knn(x[perm], k)
    assert torch.equal(pi, fi) and torch.allclose(pv, fv)
    ties = torch.eye(3)[torch.randint(3, (n,), generator=g)]  # with ties the lists are re-sorted by new labels
    tv, ti = permute_lists(*knn(ties, k), perm)
    want_v, want_i = brute(ties[perm], k)
    same_tie_class = np.take_along_axis(want_v, np.zeros((n, 1), int), 1)
    assert np.allclose(tv.numpy(), want_v) and (tv[:, :1].numpy() == same_tie_class).all()
    # within equal similarities the new labels are increasing
    for row_v, row_i in zip(tv.tolist(), ti.tolist()):
        for j in range(k - 1):
            assert row_v[j] > row_v[j + 1] or row_i[j] < row_i[j + 1]


@pytest.mark.parametrize("n,want", [(1, 1), (10, 10), (64, 64), (1000, 1000), (5000, 1024), (300_000, 223),
                                    (2**22, 64), (2**26, 64)])
def test_auto_block_size_bounds(n, want):
    """A block of rows × N float32 similarities stays under 256 MB, between 64 and 1024 rows and at most N."""
    assert auto_block_size(n) == want
