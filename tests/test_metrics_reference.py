"""Every metric against a brute-force NumPy reference (full N × N matrices, float64, small N).

The references follow the definitions literally (and for CKNNA / HSIC_u the paper's own formula), sharing no code
with the implementation. Other metric test files import the reference functions from here.
"""

import numpy as np
import pytest
import torch

from prh_stitch.metrics import (cka, cknna, cycle_knn, edit_distance_knn, lcs_knn, mutual_knn, retrieval, svcca,
                                unbiased_cka)
from prh_stitch.metrics.kernels import median_pairwise_distance

# ----------------------------------------------------------------------------------------------- references


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ref_knn(x, k):
    """Sort-based: all similarities, self at −inf, stable argsort of −sim (lower index first on ties)."""
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def ref_mutual(a, b, k):
    na, nb = ref_knn(a, k), ref_knn(b, k)
    return np.mean([len(set(na[i]) & set(nb[i])) / k for i in range(len(a))])


def ref_cycle(a, b, k):
    na, nb = ref_knn(a, k), ref_knn(b, k)
    return np.mean([any(i in na[j] for j in nb[i]) for i in range(len(a))])


def ref_lcs_len(x, y):
    t = np.zeros((len(x) + 1, len(y) + 1), dtype=int)
    for i in range(len(x)):
        for j in range(len(y)):
            t[i + 1, j + 1] = t[i, j] + 1 if x[i] == y[j] else max(t[i, j + 1], t[i + 1, j])
    return t[-1, -1]


def ref_levenshtein(x, y):
    t = np.zeros((len(x) + 1, len(y) + 1), dtype=int)
    t[:, 0], t[0, :] = np.arange(len(x) + 1), np.arange(len(y) + 1)
    for i in range(len(x)):
        for j in range(len(y)):
            t[i + 1, j + 1] = min(t[i, j + 1] + 1, t[i + 1, j] + 1, t[i, j] + (x[i] != y[j]))
    return t[-1, -1]


def ref_lcs(a, b, k):
    na, nb = ref_knn(a, k), ref_knn(b, k)
    return np.mean([ref_lcs_len(na[i], nb[i]) / k for i in range(len(a))])


def ref_edit(a, b, k):
    na, nb = ref_knn(a, k), ref_knn(b, k)
    return np.mean([1 - ref_levenshtein(na[i], nb[i]) / k for i in range(len(a))])


def hsic_unbiased_paper(K, L):
    """platonic-rep's hsic_unbiased, literally (O(n³) through K̃ @ L̃)."""
    m = K.shape[0]
    Kt, Lt = K.copy(), L.copy()
    np.fill_diagonal(Kt, 0)
    np.fill_diagonal(Lt, 0)
    value = np.sum(Kt * Lt.T) + np.sum(Kt) * np.sum(Lt) / ((m - 1) * (m - 2)) - 2 * np.sum(Kt @ Lt) / (m - 2)
    return value / (m * (m - 3))


def hsic_biased(K, L):
    n = K.shape[0]
    H = np.eye(n) - 1.0 / n
    return np.trace(K @ H @ L @ H)


def ref_kernel(x, kernel, sigma=None, bandwidth=1.0):
    if kernel == "linear":
        return x @ x.T
    d = np.sqrt(np.maximum(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1), 0))
    if sigma is None:
        sigma = bandwidth * np.median(d[np.triu_indices(len(x), 1)])
    return np.exp(-(d**2) / (2 * sigma**2))


def ref_cka(a, b, kernel="linear", unbiased=False, **kw):
    K, L = ref_kernel(a, kernel, **kw), ref_kernel(b, kernel, **kw)
    h = hsic_unbiased_paper if unbiased else hsic_biased
    return h(K, L) / np.sqrt(h(K, K) * h(L, L))


def ref_cknna(a, b, k):
    """The paper's cknna with dense masks (scatter of the top-k), without its + 1e-6 in the denominator."""
    n = len(a)
    K, L = a @ a.T, b @ b.T

    def mask(M):
        m = np.zeros((n, n))
        np.put_along_axis(m, ref_knn_from_kernel(M, k), 1.0, axis=1)
        return m

    def similarity(M1, M2):
        alpha = mask(M1) * mask(M2)
        return hsic_unbiased_paper(alpha * M1, alpha * M2)

    return similarity(K, L) / np.sqrt(similarity(K, K) * similarity(L, L))


def ref_knn_from_kernel(M, k):
    s = M.copy()
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def ref_svcca(a, b, dim):
    """z-score, project onto the top right singular vectors, CCA via whitened cross-covariance."""

    def reduce(x):
        x = x - x.mean(0)
        sd = x.std(0, ddof=1)
        x = np.where(sd > 0, x / np.where(sd > 0, sd, 1), 0)
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        return x @ vt[:dim].T

    ra, rb = reduce(a), reduce(b)

    def inv_sqrt(c):
        w, v = np.linalg.eigh(c)
        return v @ np.diag(w**-0.5) @ v.T

    caa, cbb, cab = ra.T @ ra, rb.T @ rb, ra.T @ rb
    return np.linalg.svd(inv_sqrt(caa) @ cab @ inv_sqrt(cbb), compute_uv=False).mean()


def ref_ranks(q, it, groups=None):
    n = len(q)
    s = q @ it.T
    out = []
    for i in range(n):
        order = np.lexsort((np.arange(n), -s[i]))  # by −sim, then index
        correct = (np.arange(n) == i) if groups is None else (groups == groups[i])
        out.append(int(np.nonzero(correct[order])[0][0]) + 1)
    return np.array(out)


def ref_retrieval(a, b, groups=None, ks=(1, 5, 10)):
    out = {}
    ranks = {"a2b": ref_ranks(a, b, groups), "b2a": ref_ranks(b, a, groups)}
    for d, r in ranks.items():
        for k in ks:
            out[f"{d}/recall@{k}"] = np.mean(r <= k)
        out[f"{d}/mean_rank"] = r.mean()
        out[f"{d}/median_rank"] = np.median(r)
    out["mean_cosine"] = np.mean(np.sum(a * b, 1))
    return out


# ----------------------------------------------------------------------------------------------- data


def make_data(kind, n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 24, generator=g)
    if kind == "independent":
        b = torch.randn(n, 16, generator=g)
    elif kind == "clusters":
        labels = torch.randint(6, (n,), generator=g)
        a = torch.randn(6, 24, generator=g)[labels] * 2 + torch.randn(n, 24, generator=g)
        b = torch.randn(6, 16, generator=g)[labels] * 2 + torch.randn(n, 16, generator=g)
    elif kind == "rotated":
        q, _ = torch.linalg.qr(torch.randn(24, 24, generator=g))
        b = a @ q
    elif kind == "noisy":
        b = a + 0.5 * torch.randn(n, 24, generator=g)
    else:
        raise AssertionError(kind)
    return a, b


KINDS = ["independent", "clusters", "rotated", "noisy"]


def np_pair(a, b):
    return unit(a.numpy()), unit(b.numpy())


# ----------------------------------------------------------------------------------------------- tests

KNN_CASES = [(mutual_knn, ref_mutual), (cycle_knn, ref_cycle), (lcs_knn, ref_lcs), (edit_distance_knn, ref_edit)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fn,ref", KNN_CASES, ids=lambda f: getattr(f, "__name__", ""))
def test_knn_metrics_match_reference(fn, ref, kind):
    a, b = make_data(kind)
    na, nb = np_pair(a, b)
    for k in (1, 5, 10):
        assert fn(a, b, k=k) == pytest.approx(ref(na, nb, k), abs=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_metrics_match_reference(kind):
    a, b = make_data(kind, n=90)
    na, nb = np_pair(a, b)
    for method in ("features", "samples"):
        assert cka(a, b, method=method) == pytest.approx(ref_cka(na, nb), abs=1e-5)
        assert unbiased_cka(a, b, method=method) == pytest.approx(ref_cka(na, nb, unbiased=True), abs=1e-5)
    assert cka(a, b, kernel="rbf") == pytest.approx(ref_cka(na, nb, "rbf"), abs=1e-5)
    assert cka(a, b, kernel="rbf", bandwidth=0.5) == pytest.approx(ref_cka(na, nb, "rbf", bandwidth=0.5), abs=1e-5)
    assert unbiased_cka(a, b, kernel="rbf", sigma=0.7) == pytest.approx(
        ref_cka(na, nb, "rbf", unbiased=True, sigma=0.7), abs=1e-5)
    for k in (2, 5, 10):
        assert cknna(a, b, k=k) == pytest.approx(ref_cknna(na, nb, k), abs=1e-5)
    assert svcca(a, b, dim=8) == pytest.approx(ref_svcca(na, nb, 8), abs=1e-5)


def test_unnormalized_inputs_match_reference():
    a, b = make_data("noisy", n=80)
    a, b = a * torch.linspace(0.5, 3, 80)[:, None], b + 1.0
    na, nb = a.double().numpy(), b.double().numpy()
    assert mutual_knn(a, b, k=5, normalize=False) == pytest.approx(ref_mutual(na, nb, 5), abs=1e-9)
    assert cka(a, b, normalize=False) == pytest.approx(ref_cka(na, nb), abs=1e-5)
    assert unbiased_cka(a, b, normalize=False) == pytest.approx(ref_cka(na, nb, unbiased=True), abs=1e-5)
    assert cknna(a, b, k=6, normalize=False) == pytest.approx(ref_cknna(na, nb, 6), abs=1e-5)


def test_cknna_on_asymmetric_neighbourhoods():
    """Hubs make the kNN masks strongly non-symmetric: the transpose in tr(K̃L̃) must be honoured."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(70, 6, generator=g)
    a[:5] *= 0.05  # near the origin: after normalisation these still differ, but shift the hub structure
    a = a + torch.tensor([2.0, 0, 0, 0, 0, 0])
    b = a[:, :4] + 0.3 * torch.randn(70, 4, generator=g)
    na, nb = np_pair(a, b)
    for k in (3, 8):
        assert cknna(a, b, k=k) == pytest.approx(ref_cknna(na, nb, k), abs=1e-5)


@pytest.mark.parametrize("kind", ["noisy", "independent"])
def test_retrieval_matches_reference(kind):
    a, b = make_data(kind, n=75)
    b = torch.cat([b, b[:, :8]], dim=1) if b.shape[1] != a.shape[1] else b  # retrieval needs equal widths
    na, nb = np_pair(a, b)
    ours = retrieval(a, b, block_size=16)
    ref = ref_retrieval(na, nb)
    assert set(ours) == set(ref)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key


def test_retrieval_groups_count_same_caption_as_correct():
    a, b = make_data("noisy", n=60)
    b = b[torch.randperm(60, generator=torch.Generator().manual_seed(0))]  # unpaired: groups matter
    groups = torch.arange(60) // 3  # three images per caption
    na, nb = np_pair(a, b)
    ours = retrieval(a, b, groups=groups, ks=(1, 3, 100))
    ref = ref_retrieval(na, nb, groups.numpy(), ks=(1, 3, 100))
    assert set(ours) == set(ref) and any(k.startswith("b2a/") for k in ref)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key
    assert ours["a2b/recall@100"] == 1.0  # k > N is clipped: every query ranks its match somewhere


def tie_heavy_pair(n=48, seed=0):
    """Small-integer rows drawn from a palette of 4 (exact float32 inner products: many exact ties), and groups
    that put identical rows under one caption *and* under different captions, in scattered index order."""
    g = torch.Generator().manual_seed(seed)
    palette = torch.tensor([[2.0, 0, 1], [0, 2, 1], [1, 1, 1], [2, 1, 0]])
    a = palette[torch.randint(4, (n,), generator=g)]
    b = palette[torch.randint(4, (n,), generator=g)]
    groups = torch.randint(n // 4, (n,), generator=g)
    return a, b, groups


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_ranks_with_ties_match_brute_force_in_both_directions(seed):
    """Exact ties among same-caption items and between correct and wrong items, per query, both ways."""
    from prh_stitch.metrics.retrieval import ranks

    a, b, groups = tie_heavy_pair(seed=seed)
    na, nb, ng = a.double().numpy(), b.double().numpy(), groups.numpy()
    for q, it in ((a, b), (b, a)):
        expected = ref_ranks(q.double().numpy(), it.double().numpy(), ng)
        plain = ref_ranks(q.double().numpy(), it.double().numpy())
        assert (expected != plain).any()  # the groups change some ranks, so they are really exercised
        for bs in (None, 5, 48):
            assert ranks(q, it, groups, block_size=bs).dtype == torch.int64
            assert ranks(q, it, groups, block_size=bs).tolist() == expected.tolist()
            assert ranks(q, it, None, block_size=bs).tolist() == plain.tolist()
    ours = retrieval(a, b, groups=groups, normalize=False, ks=(1, 2, 5), block_size=7)
    ref = ref_retrieval(na, nb, ng, ks=(1, 2, 5))
    ref["mean_cosine"] = np.mean(np.sum(unit(na) * unit(nb), 1))  # cosine whatever normalize (docstring)
    assert set(ours) == set(ref)
    for key, value in ref.items():  # ranks are exact; the cosine goes through float32 norms
        assert ours[key] == pytest.approx(value, abs=1e-6 if key == "mean_cosine" else 1e-12), key


def test_duplicated_items_of_one_caption_are_found_in_both_directions():
    """Rows 2j and 2j+1 are exact copies on both sides, both under caption j. Rows are distinct 4-of-10 binary
    patterns, so every cosine is an exact multiple of 1/4 and the copies tie exactly with the true item."""
    g = torch.Generator().manual_seed(0)
    patterns = torch.stack([torch.randperm(10, generator=g)[:4] for _ in range(400)])
    rows = torch.zeros(400, 10).scatter_(1, patterns, 1.0).unique(dim=0)[:30]
    x = rows[torch.randperm(30, generator=g)].repeat_interleave(2, dim=0)  # 60 rows, copies side by side
    grp = torch.arange(60) // 2
    with_groups = retrieval(x, x.clone(), groups=grp)
    for way in ("a2b", "b2a"):
        assert with_groups[f"{way}/recall@1"] == 1.0 and with_groups[f"{way}/mean_rank"] == 1.0, way
    # without groups the copy at the lower index comes first: odd rows rank their own item second
    plain = retrieval(x, x.clone())
    for way in ("a2b", "b2a"):
        assert plain[f"{way}/recall@1"] == 0.5 and plain[f"{way}/mean_rank"] == 1.5, way


def test_median_pairwise_distance_is_exact():
    g = torch.Generator().manual_seed(1)
    for n in (2, 3, 57, 200):
        x = torch.randn(n, 5, generator=g)
        d = np.sqrt(((x.double().numpy()[:, None] - x.double().numpy()[None]) ** 2).sum(-1))
        assert median_pairwise_distance(x, block_size=13) == pytest.approx(np.median(d[np.triu_indices(n, 1)]),
                                                                           rel=1e-5)


def test_ties_broken_by_lower_index():
    """One-hot rows with repeats: similarities are exactly 0 or 1, so neighbour lists are all about ties."""
    g = torch.Generator().manual_seed(0)
    a = torch.eye(5)[torch.randint(5, (40,), generator=g)]
    b = torch.eye(7)[torch.randint(7, (40,), generator=g)]
    na, nb = a.double().numpy(), b.double().numpy()
    from prh_stitch.metrics.neighbors import knn

    for bs in (1, 3, 16, None):
        assert (knn(a, 6, block_size=bs)[1].numpy() == ref_knn(na, 6)).all()
    for fn, ref in KNN_CASES:
        assert fn(a, b, k=6, block_size=5) == pytest.approx(ref(na, nb, 6), abs=1e-9), fn.__name__
    assert cknna(a + 0.0, b, k=6) == pytest.approx(ref_cknna(na, nb, 6), abs=1e-6)
    b5 = torch.eye(5)[torch.randint(5, (40,), generator=g)]
    ours = retrieval(a, b5)
    for key, value in ref_retrieval(na, b5.double().numpy()).items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key
