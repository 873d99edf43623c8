"""kNN metrics' per-sample scores and analytic chance levels, exactly, against brute force and simulation.

``calibrate`` bootstraps the per-sample scores (``spec.per_item``) and reports ``spec.chance``; the reference tests
check only the means. Here each per-sample score is checked against the literal definition on sort-based
neighbour lists, and each chance level against the mean score of independent uniformly random neighbour lists.
"""

import numpy as np
import pytest
import torch

from prh_stitch.metrics import cycle_knn, edit_distance_knn, lcs_knn, mutual_knn
from prh_stitch.metrics._spec import spec_of
from prh_stitch.metrics.knn import KnnSide
from test_metrics_reference import make_data, np_pair, ref_knn, ref_levenshtein, ref_lcs_len


def _per_sample(name, na, nb, k):
    """The definition of each metric for sample i, on the neighbour lists na[i], nb[i] (arrays of indices)."""
    n = len(na)
    if name == "mutual_knn":
        return [len(set(na[i]) & set(nb[i])) / k for i in range(n)]
    if name == "cycle_knn":
        return [float(any(i in na[j] for j in nb[i])) for i in range(n)]
    if name == "lcs_knn":
        return [ref_lcs_len(na[i], nb[i]) / k for i in range(n)]
    return [1 - ref_levenshtein(na[i], nb[i]) / k for i in range(n)]


@pytest.mark.parametrize("fn", [mutual_knn, cycle_knn, lcs_knn, edit_distance_knn], ids=lambda f: f.__name__)
@pytest.mark.parametrize("kind", ["noisy", "clusters"])
def test_per_item_scores_equal_the_definition_and_average_to_the_score(fn, kind):
    a, b = make_data(kind, n=60, seed=4)
    k = 6
    spec, opts = spec_of(fn), dict(k=k, normalize=True, block_size=None)
    sa, sb = spec.prepare(a, "a", opts), spec.prepare(b, "b", opts)
    items = spec.per_item(sa, sb, opts)
    na, nb = (ref_knn(x, k) for x in np_pair(a, b))
    expected = np.array(_per_sample(spec.name, na, nb, k))
    assert items.shape == (60,)
    np.testing.assert_allclose(items.numpy(), expected, atol=1e-12)
    assert 0.0 < expected.mean() < 1.0  # the data make the check informative: neither empty nor perfect
    assert spec.pair(sa, sb, opts) == pytest.approx(expected.mean(), abs=1e-12)
    assert fn(a, b, k=k) == pytest.approx(expected.mean(), abs=1e-12)


def _random_lists(n, k, gen):
    """For every i, a uniformly random ordered k-subset of the other n − 1 rows (what unrelated features give)."""
    keys = torch.rand(n, n, generator=gen)
    keys.fill_diagonal_(2.0)  # self sorts last, never among the first k
    idx = keys.argsort(dim=1)[:, :k]
    return KnnSide(torch.zeros(n, k), idx)


@pytest.mark.parametrize("fn,n,k", [(mutual_knn, 11, 3), (mutual_knn, 30, 7), (cycle_knn, 11, 3),
                                    (cycle_knn, 30, 7)], ids=lambda v: getattr(v, "__name__", str(v)))
def test_chance_level_is_the_mean_score_of_random_neighbour_lists(fn, n, k):
    spec, opts = spec_of(fn), dict(k=k, normalize=True, block_size=None)
    gen = torch.Generator().manual_seed(n * 100 + k)
    trials = 1500
    scores = torch.stack([spec.per_item(_random_lists(n, k, gen), _random_lists(n, k, gen), opts)
                          for _ in range(trials)])
    mean, se = float(scores.mean()), float(scores.std()) / (trials * n) ** 0.5
    # Sample i's scores are independent across trials (rows within a trial are only weakly dependent), so the
    # simulated mean is within a few standard errors of the exact expectation.
    assert spec.chance(n, opts) == pytest.approx(mean, abs=6 * se + 1e-3)
    assert se < 0.004  # tight enough to tell k/(N−1) from k/N or k/(N−2) at these sizes


def test_order_blind_metrics_have_no_analytic_chance_level():
    assert spec_of(lcs_knn).chance is None and spec_of(edit_distance_knn).chance is None


@pytest.mark.parametrize("fn", [mutual_knn, cycle_knn, lcs_knn, edit_distance_knn], ids=lambda f: f.__name__)
def test_a_permuted_prepared_side_equals_searching_the_permuted_rows(fn):
    """What calibration's permutation null relies on: permute(prepare(b)) pairs like prepare(b[perm])."""
    a, b = make_data("clusters", n=40, seed=2)
    spec, opts = spec_of(fn), dict(k=5, normalize=True, block_size=None)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(5))
    sa, sb = spec.prepare(a, "a", opts), spec.prepare(b, "b", opts)
    got = spec.pair(sa, spec.permute(sb, perm, opts), opts)
    assert got == pytest.approx(fn(a, b[perm], k=5), abs=1e-12)
    assert abs(got - fn(a, b, k=5)) > 0.05  # the permutation matters for these data


def test_options_are_checked_against_n():
    a, b = make_data("noisy", n=6)
    with pytest.raises(ValueError, match="N must exceed k"):
        mutual_knn(a, b, k=6)
    with pytest.raises(ValueError, match="block_size"):
        cycle_knn(a, b, k=2, block_size=0)


def test_unnormalised_rows_use_raw_inner_products():
    a, b = make_data("noisy", n=30, seed=1)
    a = a * torch.linspace(0.2, 5.0, 30)[:, None]  # row norms now decide the raw inner products
    raw_a, raw_b = a.double().numpy(), b.double().numpy()
    for fn, k in ((mutual_knn, 4), (edit_distance_knn, 3)):
        spec = spec_of(fn)
        name = spec.name
        want = np.mean(_per_sample(name, ref_knn(raw_a, k), ref_knn(raw_b, k), k))
        assert fn(a, b, k=k, normalize=False) == pytest.approx(want, abs=1e-12)
        assert abs(fn(a, b, k=k) - want) > 0.01  # normalising would give another answer


def test_prepared_side_of_a_resample_never_lists_copies_of_the_same_sample():
    """Bootstrap resamples repeat rows; ``origin`` (the source row of each) keeps copies out of each other's lists."""
    a, _ = make_data("clusters", n=30, seed=6)
    idx = torch.randint(30, (30,), generator=torch.Generator().manual_seed(1))
    assert len(idx.unique()) < 30  # some samples are repeated
    spec, opts = spec_of(mutual_knn), dict(k=4, normalize=True, block_size=3)
    side = spec.prepare(a[idx], "a", opts, origin=idx)
    assert not (idx[side.indices] == idx[:, None]).any()
    rows = np_pair(a[idx], a[idx])[0]
    sims = rows @ rows.T
    sims[idx.numpy()[:, None] == idx.numpy()[None, :]] = -np.inf
    # copies tie exactly, and blocked float32 products may order such ties either way: compare the similarities
    want = -np.sort(-sims, axis=1)[:, :4]
    np.testing.assert_allclose(side.values.double().numpy(), want, atol=1e-6)


@pytest.mark.parametrize("fn", [mutual_knn, cycle_knn, lcs_knn, edit_distance_knn], ids=lambda f: f.__name__)
def test_default_k_is_ten(fn):
    """The paper's setting, k = 10, is every kNN metric's documented default."""
    a, b = make_data("independent", n=80, seed=3)  # unrelated sides: no metric saturates, so k shows
    na, nb = (ref_knn(x, 10) for x in np_pair(a, b))
    want = np.mean(_per_sample(fn.__name__, na, nb, 10))
    assert fn(a, b) == pytest.approx(want, abs=1e-12)
    assert fn(a, b, k=11) != pytest.approx(want, abs=1e-6)
