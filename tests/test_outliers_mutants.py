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


def test_the_paper_clamp_names_the_model_and_its_layer():
    from prh_stitch.metrics.outliers import clamp_outliers_paper

    layers = [torch.randn(6, 3), torch.randn(6, 3)]
    layers[0][1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"^x layer 0 contains NaN or Inf features"):
        clamp_outliers_paper(layers, 0.95)
    with pytest.raises(ValueError, match=r"^vit layer 0 contains NaN or Inf features"):
        clamp_outliers_paper(layers, 0.95, name="vit")


def test_the_paper_clamp_at_q_1_returns_the_layers_themselves():
    from prh_stitch.metrics.outliers import clamp_outliers_paper

    layers = [torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)]
    out = clamp_outliers_paper(layers, 1.0)
    assert all(o is x for o, x in zip(out, layers))  # off: no copy, no float32 cast


def test_the_paper_clamp_leaves_all_zero_layers_alone_and_refuses_a_zero_threshold_over_sparse_ones():
    from prh_stitch.metrics.outliers import clamp_outliers_paper

    zeros = [torch.zeros(8, 4), torch.zeros(8, 4)]
    assert all(torch.equal(o, x) for o, x in zip(clamp_outliers_paper(zeros, 0.9), zeros))  # nothing to zero
    sparse = torch.zeros(8, 20)  # one non-zero element: every row's 0.9 quantile (interpolated, 20 values) is 0
    sparse[0, 0] = 3.0
    with pytest.raises(ValueError, match=r"^x: the paper's 0\.9 quantile threshold of \|x\| is 0 \(most elements are "
                                         r"exactly 0\), so clamping would set every feature to 0; use a higher "
                                         r"quantile$"):
        clamp_outliers_paper([sparse], 0.9)


def test_the_clamp_names_the_matrix_x_by_default():
    from prh_stitch.metrics.outliers import clamp_outliers

    x = torch.randn(6, 3)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^x contains NaN or Inf features"):
        clamp_outliers(x, 0.9)


def test_the_threshold_names_the_matrix_x_by_default_with_the_repair_hint_and_needs_a_quantile():
    from prh_stitch.metrics.outliers import outlier_threshold

    x = torch.randn(6, 3)
    x[0, 0] = float("inf")
    with pytest.raises(ValueError, match="^" + re.escape(f"x contains NaN or Inf features{_NAN_HINT}") + "$"):
        outlier_threshold(x, 0.9)
    with pytest.raises(ValueError, match=r"^outlier_threshold needs a quantile in \(0, 1\], got None$"):
        outlier_threshold(torch.randn(6, 3), None)


def test_the_clamp_leaves_an_all_zero_matrix_alone_and_refuses_a_zero_threshold_over_a_sparse_one():
    from prh_stitch.metrics.outliers import clamp_outliers

    zeros = torch.zeros(8, 4)
    assert torch.equal(clamp_outliers(zeros, 0.9), zeros)  # nothing to zero
    sparse = torch.zeros(8, 4)
    sparse[0, 0] = 3.0
    with pytest.raises(ValueError, match=r"^x: the 0\.9 quantile of \|x\| is 0 \(more than a fraction 0\.9 of its "
                                         r"elements are exactly 0, e\.g\. sparse ReLU features\), so clamping would "
                                         r"set every feature to 0; use a higher quantile or no clamp for this layer$"):
        clamp_outliers(sparse, 0.9)


def test_the_threshold_is_exactly_the_rank_th_smallest_of_shuffled_distinct_values():
    from prh_stitch.metrics.outliers import outlier_threshold

    for seed in range(20):
        values = torch.randperm(120, generator=torch.Generator().manual_seed(seed)).float() + 1.0
        for q, want in ((0.5, 60.0), (0.25, 30.0), (0.95, 114.0)):  # ⌈q·120⌉-th smallest of 1..120
            assert float(outlier_threshold(values.reshape(12, 10), q)) == want
