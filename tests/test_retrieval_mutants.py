"""Retrieval behaviour that the mutation run of metrics/retrieval.py showed no test pinned down: the zero-row
error of the mean cosine (``normalize=False``, where no normalisation catches the row first)."""

import pytest
import torch

from prh_stitch.metrics import retrieval

ZERO_ROW = r"^a zero row has no cosine similarity \(mean_cosine\); remove zero rows$"


@pytest.mark.parametrize("side", ["a", "b", "both"])
def test_a_zero_row_on_either_side_is_refused_without_normalisation(side):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    if side in ("a", "both"):
        a[2] = 0
    if side in ("b", "both"):
        b[5 if side == "b" else 2] = 0
    with pytest.raises(ValueError, match=ZERO_ROW):
        retrieval(a, b, normalize=False)
    a[a.norm(dim=1) == 0] = 1e-3  # tiny but non-zero rows are fine
    b[b.norm(dim=1) == 0] = 1e-3
    assert -1.0 <= retrieval(a, b, normalize=False)["mean_cosine"] <= 1.0
