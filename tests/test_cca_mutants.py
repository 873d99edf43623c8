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
