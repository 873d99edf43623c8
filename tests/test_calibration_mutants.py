"""calibrate() behaviour that the mutation run of metrics/calibration.py showed no other test pinned down."""

import pytest
import torch

from prh_stitch.metrics import calibrate, svcca


def _one_row_direction(seed):
    """20 × 3 features whose third column varies in row 0 only: three directions over all rows, but a half-sample
    of 10 rows without row 0 z-scores that column to zeros and keeps two."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(20, 3, generator=g)
    x[:, 2] = 0.0
    x[0, 2] = 5.0
    return x


@pytest.mark.parametrize("side", ["a", "b"])
def test_a_half_sample_that_loses_a_direction_is_refused_naming_its_side(side):
    g = torch.Generator().manual_seed(1)
    degenerate, healthy = _one_row_direction(2), torch.randn(20, 3, generator=g)
    a, b = (degenerate, healthy) if side == "a" else (healthy, degenerate)
    # The full-sample score and its null are fine (three directions on both sides over all 20 rows) ...
    report = calibrate("svcca", a, b, dim=3, permutations=3, normalize=False)
    assert report["score"] == pytest.approx(svcca(a, b, dim=3, normalize=False))
    # ... but a half-sample without row 0 (P = 1/2 per draw, so among 20 seeded draws: 1 − 2⁻²⁰) has two: the error
    # says which side ran short, as the full-sample check would.
    with pytest.raises(ValueError, match=rf"^{side} has fewer than dim=3 independent directions after z-scoring"):
        calibrate("svcca", a, b, dim=3, permutations=0, bootstrap=20, seed=0, normalize=False)
