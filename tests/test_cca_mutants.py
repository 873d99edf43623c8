"""SVCCA behaviour that the mutation run of metrics/cca.py showed no test pinned down."""

import pytest
import torch

from prh_stitch.metrics import svcca
from test_cca_exact import _data, _np
from test_metrics_reference import ref_svcca


def test_dim_may_equal_the_width():
    a, b = _data(30, 5, 5, seed=11)
    assert svcca(a, b, dim=5) == pytest.approx(ref_svcca(_np(a), _np(b), 5), abs=1e-6)


def test_a_side_short_of_directions_is_named():
    a, b = _data(20, 5, 5, seed=12)
    flat = torch.cat([a[:, :2], a[:, :2], a[:, :1]], 1)  # five columns spanning two directions
    with pytest.raises(ValueError, match=r"^b has fewer than dim=3 independent directions after z-scoring; lower dim$"):
        svcca(a, flat, dim=3, normalize=False)


def test_identical_sides_never_score_above_one():
    """The canonical correlations of a subspace with itself are 1 up to round-off (up to 1 + 7e-16 in float64 for
    these seeds); the score is a correlation, so it is clamped: never above 1."""
    for seed in range(10):
        a = torch.randn(30, 6, generator=torch.Generator().manual_seed(seed))
        assert svcca(a, a.clone(), dim=5, normalize=False) <= 1.0


@pytest.mark.parametrize("dim, message", [(2.5, r"^dim must be a positive integer, got 2\.5$"),
                                          (20, r"^dim=20 needs N > dim samples, got N=20$")])
def test_a_dim_that_is_not_an_integer_or_not_below_n_is_refused(dim, message):
    a, b = _data(20, 25, 25, seed=13)
    with pytest.raises(ValueError, match=message):
        svcca(a, b, dim=dim)


def test_the_default_dim_is_ten():
    a, b = _data(40, 14, 14, seed=14)
    assert svcca(a, b) == svcca(a, b, dim=10) != svcca(a, b, dim=11)


def test_constant_columns_whose_float32_mean_is_inexact_are_zeroed():
    """Constant columns whose float32 mean is off by an ulp (1000000.7 over 30 rows leaves 0.0625 in every row after
    centring, with a std of exactly 0) must still be zeroed, not kept as a constant direction: the score ignores
    them and a dim that would need them is refused."""
    a, b = _data(30, 5, 5, seed=15)
    b2 = b[:, :2]
    const = torch.cat([b2, torch.tensor([0.1, 3.3, 123.456, 1000000.7]).expand(30, 4)], 1)
    residue = (const - const.mean(0, keepdim=True))[:, 2:].abs().amax()
    assert residue > 1e-3  # the case this test is about: centring alone does not zero these columns
    assert svcca(a, const, dim=2, normalize=False) == pytest.approx(svcca(a, b2, dim=2, normalize=False), abs=1e-6)
    with pytest.raises(ValueError, match=r"^b has fewer than dim=3 independent directions after z-scoring; lower dim$"):
        svcca(a, const, dim=3, normalize=False)


def test_a_nearly_dependent_column_counts_as_absent_relative_to_the_largest_direction():
    """Column 3 = column 1 + 3e-6 noise: after z-scoring its own direction has eigenvalue ~1e-10, below the rank
    tolerance 1e-10 times the largest eigenvalue (~61), so dim=3 is refused; dim=2 is fine."""
    g = torch.Generator().manual_seed(5)
    c = torch.randn(30, 2, generator=g)
    near = torch.cat([c, c[:, :1] + 3e-6 * torch.randn(30, 1, generator=g)], 1)
    a, _ = _data(30, 5, 5, seed=16)
    with pytest.raises(ValueError, match=r"^b has fewer than dim=3 independent directions after z-scoring; lower dim$"):
        svcca(a, near, dim=3, normalize=False)
    assert 0.0 <= svcca(a, near, dim=2, normalize=False) <= 1.0
