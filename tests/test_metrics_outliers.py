"""clamp_outliers: a NumPy brute-force reference, invariances, its effect on mutual kNN, the wrappers, bad input."""

import math

import numpy as np
import pytest
import torch

from prh_stitch.metrics import CKA, MutualKNN, cka, clamp_outliers, mutual_knn, outlier_threshold
from prh_stitch.metrics.outliers import quantile_rank

QUANTILES = [0.5, 0.9, 0.95, 0.99, 0.07, 1 / 3]


def reference(x: np.ndarray, q: float) -> np.ndarray:
    """Brute force: sort |x|, take the ⌈q·n⌉-th smallest (q·n rounded to 9 decimals first to drop float noise such
    as 0.07 · 100 = 7.000000000000001), clip."""
    values = np.sort(np.abs(x).ravel())
    rank = int(np.ceil(round(q * values.size, 9)))
    t = values[rank - 1]
    return np.clip(x, -t, t)


def features(n=100, d=20, seed=0, dtype=torch.float32):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("q", QUANTILES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (100, 20), (33, 65)])
def test_equals_numpy_brute_force(q, shape):
    x = features(*shape, seed=shape[0])
    assert np.array_equal(clamp_outliers(x, q).numpy(), reference(x.numpy(), q))
    # Non-contiguous input (a transposed view) gives the transposed result: the threshold ignores layout.
    assert np.array_equal(clamp_outliers(x.T, q).numpy(), reference(x.numpy().T, q))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_equal_the_reference_and_keep_their_dtype(dtype):
    x = features(64, 16, dtype=dtype)
    out = clamp_outliers(x, 0.95)
    assert out.dtype == dtype and out.shape == x.shape
    # bfloat16/float16 values are exactly representable in float64, so the reference sees the same numbers.
    assert np.array_equal(out.double().numpy(), reference(x.double().numpy(), 0.95))


def test_ties_and_zeros_equal_the_reference():
    x = torch.randint(-4, 5, (50, 8), generator=torch.Generator().manual_seed(1)).float()  # many exact ties
    for q in QUANTILES:
        if reference(x.numpy(), q).any():
            assert np.array_equal(clamp_outliers(x, q).numpy(), reference(x.numpy(), q)), q
        else:  # about 1/9 of the elements are 0, so at q = 0.07 the threshold is 0: refused, never all-zero features
            with pytest.raises(ValueError, match="quantile of \\|x\\| is 0"):
                clamp_outliers(x, q)


def test_threshold_by_hand():
    x = torch.tensor([[-5.0, 1.0], [2.0, -3.0], [4.0, 0.5]])  # sorted |x|: 0.5 1 2 3 4 5
    assert float(outlier_threshold(x, 0.5)) == 2.0  # ⌈0.5 · 6⌉ = 3rd smallest
    assert float(outlier_threshold(x, 0.51)) == 3.0  # ⌈3.06⌉ = 4th
    assert torch.equal(clamp_outliers(x, 0.5), torch.tensor([[-2.0, 1.0], [2.0, -2.0], [2.0, 0.5]]))
    # q is read as the decimal it prints as: 0.07 of 100 elements is rank 7 (0.07 * 100 = 7.000000000000001).
    assert quantile_rank(0.07, 100) == 7 and quantile_rank(0.95, 20) == 19 and quantile_rank(1e-9, 5) == 1
    y = torch.arange(1, 101, dtype=torch.float32).reshape(10, 10)
    assert float(outlier_threshold(y, 0.07)) == 7.0 and float(outlier_threshold(y, 0.95)) == 95.0
    # Same definition as NumPy's inverted-CDF quantile (where q·n is not within float noise of an integer).
    v = features(37, 11).abs().numpy().ravel()
    for q in (0.5, 0.9, 0.95, 0.99):
        assert float(outlier_threshold(features(37, 11), q)) == np.quantile(v, q, method="inverted_cdf")


def test_off_is_the_identity_without_a_copy():
    x = features()
    assert clamp_outliers(x, None) is x and clamp_outliers(x, 1.0) is x and clamp_outliers(x, 1) is x
    assert float(outlier_threshold(x, 1.0)) == float(x.abs().max())  # the threshold at q = 1 clamps nothing


@pytest.mark.parametrize("q", [0.5, 0.9, 0.95])
def test_invariances(q):
    x = features(120, 24, seed=2)
    out, t = clamp_outliers(x, q), outlier_threshold(x, q)
    # Scaling by c > 0 scales t and the result by c, exactly: rounding c·v is monotone in v, so the order
    # statistic of |c·x| is the rounded c·t and every clamp decision is the same.
    c = 3.7
    assert torch.equal(outlier_threshold(c * x, q), c * t)
    assert torch.equal(clamp_outliers(c * x, q), c * out)
    assert torch.equal(clamp_outliers(-x, q), -out)  # odd in x
    rows, cols = torch.randperm(120), torch.randperm(24)
    assert torch.equal(clamp_outliers(x[rows][:, cols], q), out[rows][:, cols])  # element order is irrelevant
    assert torch.equal(clamp_outliers(out, q), out)  # idempotent: the clamped matrix has the same threshold
    # What changes: exactly the elements with |x| > t, each to ±t with its sign; all others bit for bit.
    changed = out != x
    assert torch.equal(changed, x.abs() > t)
    assert torch.equal(out[changed], torch.sign(x[changed]) * t) and torch.equal(out[~changed], x[~changed])
    assert float(out.abs().max()) == float(t)
    # How many: the |x_ij| of Gaussian features are distinct, so exactly n − ⌈q·n⌉ elements change.
    n = x.numel()
    assert len(x.abs().flatten().unique()) == n
    assert int(changed.sum()) == n - math.ceil(round(q * n, 9))


def test_with_ties_at_most_n_minus_rank_elements_change():
    x = torch.randint(-3, 4, (40, 10), generator=torch.Generator().manual_seed(3)).float()
    for q in (0.5, 0.9, 0.95):
        changed = int((clamp_outliers(x, q) != x).sum())
        assert changed <= x.numel() - quantile_rank(q, x.numel())


def test_large_matrix_beyond_torch_quantile_limit():
    # torch.quantile refuses inputs over 2^24 elements; the clamp must not.
    x = torch.randn(4097, 4096, generator=torch.Generator().manual_seed(0))
    t = outlier_threshold(x, 0.95)
    rank = quantile_rank(0.95, x.numel())
    values = x.abs().flatten()
    assert int((values < t).sum()) < rank <= int((values <= t).sum())  # t is the rank-th smallest


def planted():
    """b is a noisy rotation of a0; a is a0 with feature 0 made 1000× larger (one massive channel)."""
    g = torch.Generator().manual_seed(0)
    a0 = torch.randn(200, 32, generator=g)
    rotation = torch.linalg.qr(torch.randn(32, 32, generator=g))[0]
    b = a0 @ rotation + 0.3 * torch.randn(200, 32, generator=g)
    a = a0.clone()
    a[:, 0] *= 1000
    return a, b


def test_clamp_undoes_a_planted_outlier_feature_in_mutual_knn():
    a, b = planted()
    raw = mutual_knn(a, b, k=10)
    clamped = mutual_knn(clamp_outliers(a, 0.95), clamp_outliers(b, 0.95), k=10)
    # After normalisation the massive channel alone decides a's neighbours; clamped, the other 31 count again.
    assert clamped > raw + 0.15, (raw, clamped)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_wrappers_clamp_all_rows_at_compute():
    a, b = planted()
    pre = clamp_outliers(a, 0.95), clamp_outliers(b, 0.95)
    for metric, fn in ((MutualKNN(k=10, outlier_quantile=0.95), lambda x, y: mutual_knn(x, y, k=10)),
                       (CKA(outlier_quantile=0.95), cka)):
        for chunk in range(0, 200, 64):  # batches: the threshold must be the whole set's, not one batch's
            metric.update(a[chunk:chunk + 64], b[chunk:chunk + 64])
        score = float(metric.compute())
        assert score == pytest.approx(fn(*pre), abs=1e-6)  # compute() returns float32
        assert score != pytest.approx(fn(a, b), abs=1e-3)
        per_batch = [torch.cat([clamp_outliers(x[i:i + 64], 0.95) for i in range(0, 200, 64)]) for x in (a, b)]
        assert score != pytest.approx(fn(*per_batch), abs=1e-6)  # what clamping in update() would have given
    off = MutualKNN(k=10)
    off.update(a, b)
    assert float(off.compute()) == pytest.approx(mutual_knn(a, b, k=10), abs=1e-6)
    with pytest.raises(ValueError, match=r"outlier_quantile must lie in \(0, 1\]"):
        MutualKNN(outlier_quantile=1.5)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_bad_quantiles(bad):
    with pytest.raises(ValueError, match=r"quantile must lie in \(0, 1\] \(e.g. 0.95"):
        clamp_outliers(features(), bad)


def test_bad_input():
    x = features()
    for bad in (True, "0.95", [0.95]):
        with pytest.raises(ValueError, match="quantile must be a number in"):
            clamp_outliers(x, bad)
    for value in (float("nan"), float("inf")):
        y = x.clone()
        y[3, 2] = value
        with pytest.raises(ValueError, match=r"feats contains NaN or Inf features; .*drop or repair those samples"):
            clamp_outliers(y, 0.95, name="feats")
    with pytest.raises(ValueError, match="2-D"):
        clamp_outliers(x[0], 0.95)
    with pytest.raises(ValueError, match="floating-point"):
        clamp_outliers(x.long(), 0.95)
    sparse = torch.zeros(100, 40)
    sparse[:, 0] = torch.rand(100) + 0.1  # 97.5% exact zeros, as after a ReLU: the 0.95 quantile of |x| is 0
    with pytest.raises(ValueError, match=r"the 0.95 quantile of \|x\| is 0 .* use a higher quantile or no clamp"):
        clamp_outliers(sparse, 0.95)
    # At 0.99 the threshold is the 3960th smallest of 4000: the 60th smallest non-zero element.
    assert torch.equal(clamp_outliers(sparse, 0.99), sparse.clamp(max=float(sparse[:, 0].sort().values[59])))
