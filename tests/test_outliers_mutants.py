"""The paper's outlier threshold: the errors that the mutation run of metrics/outliers.py showed no test pinned down."""

import re

import pytest
import torch

from prh_stitch.metrics.outliers import _NAN_HINT, paper_outlier_threshold


def test_a_non_finite_layer_is_named_by_its_position_with_the_repair_hint():
    layers = [torch.randn(6, 3), torch.randn(6, 4)]
    layers[1][2, 0] = float("inf")
    with pytest.raises(ValueError, match="^" + re.escape(f"x layer 1 contains NaN or Inf features{_NAN_HINT}") + "$"):
        paper_outlier_threshold(layers, 0.95)  # the default name is "x"
    with pytest.raises(ValueError, match=r"^vit layer 1 contains NaN or Inf features; the outlier clamp's"):
        paper_outlier_threshold(layers, 0.95, name="vit")


def test_layers_with_different_row_counts_are_refused_listing_the_counts():
    with pytest.raises(ValueError, match=r"^x: every layer needs the same number of rows, got \[5, 4\]$"):
        paper_outlier_threshold([torch.randn(5, 3), torch.randn(4, 2)], 0.9)


def test_no_quantile_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^paper_outlier_threshold needs a quantile in \(0, 1\], got None$"):
        paper_outlier_threshold([torch.randn(5, 3)], None)
