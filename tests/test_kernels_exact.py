"""CKA, unbiased CKA, CKNNA and the median bandwidth, exactly, on small inputs against dense float64 references.

Small N (tens of rows) keeps every reference a full N × N matrix and every test fast; odd sizes and tiny block
sizes make every blocked loop run over several uneven blocks; both exact routes (feature space and kernel rows)
are checked against the same reference, and the prepared sides against the permuted and the raw inputs.
"""

import numpy as np
import pytest
import torch

from prh_stitch.metrics import cka, cknna, unbiased_cka
from prh_stitch.metrics._spec import spec_of
from prh_stitch.metrics.kernels import hsic_b_terms, hsic_u_coo, hsic_u_terms, median_pairwise_distance
from test_metrics_reference import hsic_biased, hsic_unbiased_paper, ref_cka, ref_cknna


def _data(n, da=5, db=4, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, da, generator=g) + shift
    b = a[:, :db] * torch.linspace(0.5, 2.0, db) + 0.7 * torch.randn(n, db, generator=g)
    return a, b


def _np(x, normalize=True):
    x = x.double().numpy()
    return x / np.linalg.norm(x, axis=1, keepdims=True) if normalize else x


def _pairwise(x):
    x = x.double().numpy()
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    return d[np.triu_indices(len(x), 1)]


@pytest.mark.parametrize("n", [7, 13])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_cka_both_routes_and_block_sizes_equal_the_dense_reference(n, normalize):
    a, b = _data(n, shift=1.5)  # off-centre data: the centring must happen
    na, nb = _np(a, normalize), _np(b, normalize)
    want, want_u = ref_cka(na, nb), ref_cka(na, nb, unbiased=True)
    assert 0.2 < want < 0.99 and abs(want_u - want) > 0.01  # informative: neither trivial nor biased == unbiased
    for method in ("features", "samples", "auto"):
        for bs in (None, 1, 3):
            kw = dict(normalize=normalize, method=method, block_size=bs)
            assert cka(a, b, **kw) == pytest.approx(want, abs=1e-6), kw
            assert unbiased_cka(a, b, **kw) == pytest.approx(want_u, abs=1e-6), kw


def test_auto_route_with_more_features_than_samples():
    a, b = _data(6, da=9, db=8, seed=2)
    na, nb = _np(a), _np(b)
    assert cka(a, b) == pytest.approx(ref_cka(na, nb), abs=1e-6)
    assert unbiased_cka(a, b) == pytest.approx(ref_cka(na, nb, unbiased=True), abs=1e-6)
    # one side wide, the other narrow: the routes are chosen per side and must still agree
    a2 = torch.cat([a, torch.randn(6, 3)], 1)
    for wide, narrow in ((a2, b[:, :2]), (b[:, :2], a2)):  # both orders: either side may be the wide one
        assert cka(wide, narrow) == pytest.approx(ref_cka(_np(wide), _np(narrow)), abs=1e-6)
        assert unbiased_cka(wide, narrow) == pytest.approx(ref_cka(_np(wide), _np(narrow), unbiased=True), abs=1e-6)


@pytest.mark.parametrize("n", [9, 14])
def test_rbf_cka_equals_the_dense_reference(n):
    a, b = _data(n, seed=1)
    na, nb = _np(a), _np(b)
    for kw in (dict(), dict(bandwidth=0.6), dict(sigma=0.4), dict(sigma=1.3)):
        want, want_u = ref_cka(na, nb, "rbf", **kw), ref_cka(na, nb, "rbf", unbiased=True, **kw)
        for bs in (None, 3):
            assert cka(a, b, kernel="rbf", block_size=bs, **kw) == pytest.approx(want, abs=1e-6), (kw, bs)
            assert unbiased_cka(a, b, kernel="rbf", block_size=bs, **kw) == pytest.approx(want_u, abs=1e-6), (kw, bs)
    # unnormalised features: the bandwidth follows the raw distances
    ra, rb = a * 3.0, b + 2.0
    assert cka(ra, rb, kernel="rbf", normalize=False) == pytest.approx(
        ref_cka(_np(ra, False), _np(rb, False), "rbf"), abs=1e-6)


def test_self_similarity_is_one_and_a_rotation_changes_nothing():
    a, _ = _data(11, seed=5)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(1)))
    for fn in (cka, unbiased_cka):
        for kw in (dict(method="features"), dict(method="samples"), dict(kernel="rbf")):
            assert fn(a, a.clone(), **kw) == pytest.approx(1.0, abs=1e-6), (fn.__name__, kw)
            assert fn(a, a @ q, **kw) == pytest.approx(1.0, abs=1e-5), (fn.__name__, kw)


def test_hsic_term_formulas_equal_the_dense_estimators():
    g = np.random.default_rng(0)
    for n in (5, 8):
        x, y = g.normal(size=(n, 3)), g.normal(size=(n, 2)) + 1.0
        K, L = x @ x.T, np.exp(-((y[:, None] - y[None]) ** 2).sum(-1))
        Kt, Lt = K - np.diag(np.diag(K)), L - np.diag(np.diag(L))
        u = hsic_u_terms(n, float(np.sum(Kt * Lt.T)), float(Kt.sum()), float(Lt.sum()),
                         float(Kt.sum(0) @ Lt.sum(1)))
        assert u == pytest.approx(hsic_unbiased_paper(K, L), rel=1e-10, abs=1e-12)
        b = hsic_b_terms(n, float(np.sum(K * L)), float(K.sum()), float(L.sum()), float(K.sum(1) @ L.sum(1)))
        assert b == pytest.approx(hsic_biased(K, L) / (n - 1) ** 2, rel=1e-10)


def test_sparse_unbiased_hsic_with_asymmetric_support_equals_dense():
    g = torch.Generator().manual_seed(3)
    n = 9
    support = torch.rand(n, n, generator=g) < 0.4
    support.fill_diagonal_(False)
    support[0, 1], support[1, 0] = True, False  # a one-way pair
    support[2, 3] = support[3, 2] = True  # a two-way pair
    rows, cols = support.nonzero(as_tuple=True)
    kv, lv = torch.randn(len(rows), generator=g), torch.randn(len(rows), generator=g)
    K, L = np.zeros((n, n)), np.zeros((n, n))
    K[rows.numpy(), cols.numpy()], L[rows.numpy(), cols.numpy()] = kv.double().numpy(), lv.double().numpy()
    shuffle = torch.randperm(len(rows), generator=g)  # the entries need not come in any order
    got = hsic_u_coo(n, rows[shuffle], cols[shuffle], kv[shuffle], lv[shuffle])
    assert got == pytest.approx(hsic_unbiased_paper(K, L), rel=1e-9, abs=1e-12)
    empty = torch.zeros(0, dtype=torch.long)
    assert hsic_u_coo(n, empty, empty, torch.zeros(0), torch.zeros(0)) == 0.0


@pytest.mark.parametrize("n,k", [(8, 2), (13, 4), (16, 7)])
def test_cknna_equals_the_dense_paper_formula(n, k):
    a, b = _data(n, seed=n)
    assert cknna(a, b, k=k) == pytest.approx(ref_cknna(_np(a), _np(b), k), abs=1e-6)
    assert cknna(a, b, k=k, block_size=3) == pytest.approx(ref_cknna(_np(a), _np(b), k), abs=1e-6)
    assert cknna(a, b, k=k, normalize=False) == pytest.approx(ref_cknna(_np(a, False), _np(b, False), k), abs=1e-6)


def test_cknna_with_hubs_and_one_way_neighbours():
    g = torch.Generator().manual_seed(7)
    a = torch.randn(15, 3, generator=g) + torch.tensor([3.0, 0.0, 0.0])
    b = torch.randn(15, 3, generator=g)
    b[:4] = b[:4] * 0.1 + torch.tensor([0.0, 2.0, 0.0])  # a tight cluster in b only
    for k in (3, 6):
        assert cknna(a, b, k=k) == pytest.approx(ref_cknna(_np(a), _np(b), k), abs=1e-6)
        assert cknna(b, a, k=k) == pytest.approx(ref_cknna(_np(b), _np(a), k), abs=1e-6)


@pytest.mark.parametrize("fn,kw", [(cka, dict(method="features")), (cka, dict(method="samples")),
                                   (unbiased_cka, dict(method="features")), (unbiased_cka, dict(kernel="rbf")),
                                   (cknna, dict(k=3))], ids=lambda v: getattr(v, "__name__", str(v)))
def test_a_permuted_prepared_side_equals_preparing_the_permuted_rows(fn, kw):
    """What calibration's permutation null relies on: permute(prepare(b)) pairs like prepare(b[perm])."""
    a, b = _data(12, seed=9)
    spec = spec_of(fn)
    opts = {**spec.defaults, **kw}
    sa, sb = spec.prepare(a, "a", opts), spec.prepare(b, "b", opts)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(2))
    got = spec.pair(sa, spec.permute(sb, perm, opts), opts)
    assert got == pytest.approx(fn(a, b[perm], **kw), abs=1e-6)
    assert abs(got - fn(a, b, **kw)) > 1e-3  # the permutation matters for these data


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 21])
def test_median_pairwise_distance_odd_and_even_pair_counts(n):
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(n))
    for bs in (None, 1, 4):
        assert median_pairwise_distance(x, block_size=bs) == pytest.approx(float(np.median(_pairwise(x))),
                                                                          rel=1e-6)


def test_median_pairwise_distance_with_ties_repeats_and_extremes():
    # repeated rows (zero distances), exact ties, and antipodal rows at the largest possible distance
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [1.0, 0.0], [0.6, 0.8]])
    for bs in (None, 2, 3):
        assert median_pairwise_distance(x, block_size=bs) == pytest.approx(float(np.median(_pairwise(x))), rel=1e-6)
    far = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 0.0]])
    assert median_pairwise_distance(far) == pytest.approx(3.0, rel=1e-6)
    pair = torch.tensor([[0.0, 5.0], [0.0, -5.0]])
    assert median_pairwise_distance(pair) == pytest.approx(10.0, rel=1e-6)
    with pytest.raises(ValueError, match="N >= 2"):
        median_pairwise_distance(x[:1])


def test_cka_values_are_clipped_only_by_rounding():
    a, _ = _data(10, seed=4)
    assert cka(a, -a) == pytest.approx(1.0, abs=1e-6)  # linear CKA sees only the Gram matrix: sign-blind
    assert cka(a, a) <= 1.0 and unbiased_cka(a, a) <= 1.0


def test_the_smallest_valid_n_for_unbiased_hsic():
    """N = 4 is the first N where unbiased HSIC is defined (its n(n − 3) denominator): accepted and exact."""
    a, b = _data(4, seed=11)
    na, nb = _np(a), _np(b)
    assert unbiased_cka(a, b) == pytest.approx(ref_cka(na, nb, unbiased=True), abs=1e-6)
    assert unbiased_cka(a, b, method="samples") == pytest.approx(ref_cka(na, nb, unbiased=True), abs=1e-6)
    for k in (2, 3):
        assert cknna(a, b, k=k) == pytest.approx(ref_cknna(na, nb, k), abs=1e-6)
    # CKNNA's masks differ between numerator and denominators: no Cauchy–Schwarz bound, and here it exceeds 1
    assert ref_cknna(na, nb, 2) > 1.001 and cknna(a, b, k=2) > 1.001
    with pytest.raises(ValueError, match="N >= 4"):
        cknna(a[:3], b[:3], k=1)


def test_option_errors_are_one_exact_line():
    a, b = _data(8, seed=1)
    with pytest.raises(ValueError, match=r"^unknown method 'fast'; choose one of \('auto', 'features', 'samples'\)$"):
        cka(a, b, method="fast")
    with pytest.raises(ValueError, match=r"^method='features' needs kernel='linear' "
                                         r"\(the RBF kernel has no feature-space form\)$"):
        cka(a, b, kernel="rbf", method="features")
    with pytest.raises(ValueError, match=r"^bandwidth must be positive, got 0\.0$"):
        cka(a, b, kernel="rbf", bandwidth=0.0)
    with pytest.raises(ValueError, match=r"^CKA needs N >= 2 samples, got N=1$"):
        cka(a[:1], b[:1])
    with pytest.raises(ValueError, match=r"^unbiased HSIC needs N >= 4 samples, got N=3$"):
        unbiased_cka(a[:3], b[:3])
