"""Kernel-metric behaviour that the mutation run of metrics/kernels.py showed no test pinned down.

Both routes of linear (unbiased) CKA are exact, so a wrong route choice leaves every score unchanged and only
costs time or memory: O(N·D²) in feature space against O(N²·D) over kernel rows. The ``method`` option names the
route, so the prepared side is checked for it: a feature-space side carries ‖AᵀA‖²_F (``gram2``), a kernel-rows
side does not.
"""

import numpy as np
import pytest
import torch

from prh_stitch.metrics import cka, unbiased_cka
from prh_stitch.metrics._spec import spec_of


def _centred_gram2(x):
    x = x.double().numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    x = x - x.mean(0)
    return float(np.linalg.norm(x.T @ x) ** 2)


@pytest.mark.parametrize("fn", [cka, unbiased_cka])
@pytest.mark.parametrize("n,d", [(10, 4), (7, 7), (6, 9)])
def test_the_method_option_picks_the_route_it_names(fn, n, d):
    spec = spec_of(fn)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(n * d))
    for method, feature_space in (("features", True), ("samples", False), ("auto", d <= n)):
        opts = {**spec.defaults, "method": method}
        side = spec.prepare(x, "a", opts)
        assert (side.gram2 is not None) == feature_space, (method, n, d)
        if feature_space:
            assert side.gram2 == pytest.approx(_centred_gram2(x), rel=1e-5)
        # a permuted side keeps its route (‖AᵀA‖_F does not depend on the row order, so it is not recomputed)
        permuted = spec.permute(side, torch.randperm(n, generator=torch.Generator().manual_seed(1)), opts)
        assert permuted.gram2 == side.gram2


def test_the_rbf_kernel_always_takes_the_kernel_rows():
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(2))
    spec = spec_of(cka)
    for method in ("auto", "samples"):
        side = spec.prepare(x, "a", {**spec.defaults, "kernel": "rbf", "method": method})
        assert side.gram2 is None and side.sigma > 0


def test_the_median_of_one_row_is_refused_in_one_line():
    from prh_stitch.metrics.kernels import median_pairwise_distance

    with pytest.raises(ValueError, match=r"^the median pairwise distance needs N >= 2$"):
        median_pairwise_distance(torch.randn(1, 3))


def test_sparse_hsic_with_a_single_entry_equals_the_dense_formula():
    """One stored entry (0, 1): its transpose (1, 0) is absent, so tr(K̃L̃) = 0 and only the sums remain."""
    from prh_stitch.metrics.kernels import hsic_u_coo, hsic_u_terms

    n = 5
    got = hsic_u_coo(n, torch.tensor([0]), torch.tensor([1]), torch.tensor([2.0]), torch.tensor([3.0]))
    # column sums of K̃: 2 at column 1; row sums of L̃: 3 at row 0, so (K̃ᵀ1)·(L̃1) = 0; with (1, 0) stored too,
    # tr(K̃L̃) = K̃₀₁L̃₁₀ + K̃₁₀L̃₀₁ and the column sums of K̃ (5, 2) meet the row sums of L̃ (3, 7)
    assert got == pytest.approx(hsic_u_terms(n, 0.0, 2.0, 3.0, 0.0), abs=1e-15)
    both = hsic_u_coo(n, torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([2.0, 5.0]), torch.tensor([3.0, 7.0]))
    assert both == pytest.approx(hsic_u_terms(n, 2.0 * 7.0 + 5.0 * 3.0, 7.0, 10.0, 5.0 * 3.0 + 2.0 * 7.0), abs=1e-12)


def test_cknna_of_a_side_without_variance_is_refused_naming_cknna():
    """Identical rows and k = N − 1: the masked kernel is all ones off the diagonal, whose unbiased HSIC is exactly 0."""
    from prh_stitch.metrics import cknna

    a = torch.zeros(10, 3)
    a[:, 0] = 1.0
    b = torch.randn(10, 3, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match=r"^CKNNA is undefined here: a self-similarity term is not positive \(0, "
                                         r"[0-9.e-]+\); the features have \(almost\) no variance at this N/k$"):
        cknna(a, b, k=9)


def test_cknna_default_k_is_ten():
    from prh_stitch.metrics import cknna

    g = torch.Generator().manual_seed(4)
    a = torch.randn(40, 6, generator=g)
    b = a + 0.8 * torch.randn(40, 6, generator=g)
    assert cknna(a, b) == cknna(a, b, k=10) != cknna(a, b, k=11)
