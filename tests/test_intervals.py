"""Half-sample intervals: the draws, the rescaling, the estimands, re-selection of the best pair, and coverage."""

import math

import pytest
import torch

from prh_stitch.alignment.scoring import half_sample_subsets, selection_aware
from prh_stitch.alignment.settings import ScoreSettings
from prh_stitch.metrics import METRICS, calibrate, cka, layer_alignment, mutual_knn
from prh_stitch.metrics.intervals import (N_SAMPLE, POPULATION, best_pair_interval, draw_halves, estimand_of,
                                          method_name, rescale_factor, subsample_interval)


def test_halves_hold_distinct_rows_in_order_and_replay_from_the_seed():
    halves = draw_halves(101, 30, torch.Generator().manual_seed(4))
    for h in halves:
        assert len(h) == 50 and len(set(h.tolist())) == 50  # no row twice, ⌊N/2⌋ rows
        assert torch.equal(h, h.sort().values) and 0 <= int(h.min()) and int(h.max()) < 101
    assert len({tuple(h.tolist()) for h in halves}) == 30
    again = draw_halves(101, 30, torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(halves, again))
    # The study's halves: a prefix property (more draws extend, never change, the first ones) and seed + 1.
    assert all(torch.equal(x, y) for x, y in zip(half_sample_subsets(101, 5, 3), half_sample_subsets(101, 9, 3)))
    assert torch.equal(half_sample_subsets(101, 1, 3)[0], draw_halves(101, 1, torch.Generator().manual_seed(4))[0])


def test_rescale_factor_by_hand():
    # Var(θ̂_m − θ̂_N) = σ²(1/m − 1/N) for a mean of distinct rows; the factor turns it into σ²/N.
    assert rescale_factor(10, 5) == 1.0
    assert rescale_factor(11, 5) == pytest.approx(math.sqrt(5 / 6))
    assert rescale_factor(100, 20) == pytest.approx(0.5)  # σ²(1/20 − 1/100) = σ²/25; × 1/4 = σ²/100
    for m in (0, 10, 12):
        with pytest.raises(ValueError, match="subsample must hold between 1 and N − 1 rows"):
            rescale_factor(10, m)


def test_subsample_interval_by_hand():
    """Five draws, N = 11 (m = 5, c = √(5/6)), level 0.5: torch.quantile interpolates linearly, so the 25 % and
    75 % quantiles of five sorted values are the 2nd and 4th."""
    draws = [0.50, 0.44, 0.47, 0.41, 0.53]  # sorted: 0.41 0.44 0.47 0.50 0.53, mean 0.47
    c = math.sqrt(5 / 6)
    low, high = subsample_interval(0.45, draws, 11, 5, 0.5, POPULATION)  # deviations from 0.45
    assert (low, high) == pytest.approx((0.45 - c * (0.50 - 0.45), 0.45 - c * (0.44 - 0.45)), abs=1e-12)
    low, high = subsample_interval(0.45, draws, 11, 5, 0.5, N_SAMPLE)  # deviations from their mean 0.47
    assert (low, high) == pytest.approx((0.45 - c * 0.03, 0.45 + c * 0.03), abs=1e-12)
    with pytest.raises(ValueError, match="unknown estimand 'median'"):
        subsample_interval(0.45, draws, 11, 5, 0.5, "median")
    with pytest.raises(ValueError, match="at least one subsample draw"):
        subsample_interval(0.45, [], 11, 5, 0.5, POPULATION)


def test_estimand_follows_the_neighbour_count():
    for name in METRICS.names():
        expected = N_SAMPLE if name.endswith("_knn") or name == "cknna" else POPULATION
        if name == "retrieval":
            continue
        assert estimand_of(tuple(METRICS.get(name).spec.defaults)) == expected, name
    assert method_name(200, N_SAMPLE) == "half-sample, 200 draws, N-sample estimand"
    assert method_name(7, POPULATION, selection=True) == \
        "half-sample, 7 draws, population estimand, best pair re-selected in every half"


def test_best_pair_interval_re_selects_in_every_half():
    """A planted case: pair (0, 1) wins on all rows, but (1, 0) wins two of the four halves. The statistic is each
    half's own maximum, not the full-sample winner's score in that half."""
    full = torch.tensor([[0.30, 0.52], [0.50, 0.10]], dtype=torch.float64)
    halves = [torch.tensor(x, dtype=torch.float64) for x in (
        [[0.3, 0.54], [0.49, 0.1]], [[0.3, 0.47], [0.56, 0.1]], [[0.3, 0.51], [0.58, 0.1]], [[0.3, 0.50], [0.4, 0.1]])]
    sel = best_pair_interval(full, halves, 100, 0.5, POPULATION)
    maxima = [0.54, 0.56, 0.58, 0.50]
    assert sel["draws"] == maxima and sel["stability"] == 0.5
    assert sel["winners"] == [[0, 1, 2], [1, 0, 2]]  # most frequent first, then by index
    assert (sel["ci_low"], sel["ci_high"]) == pytest.approx(subsample_interval(0.52, maxima, 100, 50, 0.5, POPULATION))
    fixed = subsample_interval(0.52, [0.54, 0.47, 0.51, 0.50], 100, 50, 0.5, POPULATION)  # the old, fixed pair
    assert (sel["ci_low"], sel["ci_high"]) != pytest.approx(fixed)
    assert sel["interval_method"].endswith("best pair re-selected in every half")


def close_layers(n, seed):
    """Two layers per side that align with the other side almost equally well: the best pair flips."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, generator=g)
    wa, wb = torch.randn(4, 12, generator=g), torch.randn(4, 10, generator=g)
    a = [z @ wa + 1.5 * torch.randn(n, 12, generator=g) for _ in range(2)]
    b = [z @ wb + 1.5 * torch.randn(n, 10, generator=g) for _ in range(2)]
    return a, b


def test_selection_aware_interval_of_the_scoring_replays_layer_alignment_on_the_study_halves():
    a, b = close_layers(120, 0)
    settings = ScoreSettings(k=5, bootstrap=40, half_samples=10, seed=2)
    full = layer_alignment(a, b, "mutual_knn", k=5)["scores"]
    out = selection_aware(a, b, full, "mutual_knn", {"k": 5}, settings, torch.device("cpu"))
    halves = half_sample_subsets(120, 40, 2)
    tables = [layer_alignment([x[h] for x in a], [y[h] for y in b], "mutual_knn", k=5)["scores"] for h in halves]
    wins = [int(t.argmax()) for t in tables]
    assert len(set(wins)) > 1 and 0 < out["selection_stability"] < 1  # the planted flip happens
    assert out["selection_stability"] == wins.count(int(full.argmax())) / 40
    expected = best_pair_interval(full, tables, 120, 0.95, N_SAMPLE)
    assert (out["ci_low"], out["ci_high"]) == (expected["ci_low"], expected["ci_high"])
    assert out["interval_method"] == "half-sample, 40 draws, N-sample estimand, best pair re-selected in every half"
    assert out["half_samples"] == {"best": [float(t.max()) for t in tables[:10]],
                                   "last": [float(t[-1, -1]) for t in tables[:10]]}
    bi, bj = divmod(int(full.argmax()), 2)  # the full-sample winner given its own interval: not the same thing
    fixed = calibrate("mutual_knn", a[bi], b[bj], k=5, permutations=0, bootstrap=40, seed=2)
    assert (fixed["ci_low"], fixed["ci_high"]) != pytest.approx((out["ci_low"], out["ci_high"]))


def test_half_samples_too_small_for_the_metric_give_no_interval_and_say_why():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(11, 3, generator=g), torch.randn(11, 3, generator=g)
    asked = calibrate("mutual_knn", a, b, k=5, permutations=2, bootstrap=3)
    assert asked["ci_low"] is None and asked["ci_high"] is None and asked["ci_draws"] is None
    assert asked["interval_method"] == ("none: half-samples of N//2 = 5 rows are too few (N must exceed k: k=5 "
                                        "neighbours need at least 6 rows, got N=5)")
    plain = calibrate("mutual_knn", a, b, k=5, permutations=2)
    assert plain["interval_method"] is None  # none asked for
    assert {k: v for k, v in asked.items() if k not in ("bootstrap", "interval_method")} == \
        {k: v for k, v in plain.items() if k not in ("bootstrap", "interval_method")}  # score and null unchanged


# -- coverage by simulation -------------------------------------------------------------------------------------
# Small, seeded versions of benchmarks/bench_calibration.py: two noisy linear views of a shared latent. The old
# with-replacement row bootstrap (percentile interval, replayed here in a few lines) must fail where the
# half-sample interval covers.

@pytest.fixture
def one_thread():
    """Thousands of tiny metric calls: one torch thread is ~15× faster than two on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


LATENT = torch.Generator().manual_seed(123)
NARROW = torch.randn(3, 8, generator=LATENT), torch.randn(3, 6, generator=LATENT)
WIDE = torch.randn(3, 32, generator=LATENT), torch.randn(3, 24, generator=LATENT)


def views(n, g, maps=NARROW):
    z = torch.randn(n, 3, generator=g)
    return tuple(z @ w + 1.2 * torch.randn(n, w.shape[1], generator=g) for w in maps)


def old_bootstrap(metric, a, b, draws, g, **opts):
    n = a.shape[0]
    boots = []
    for _ in range(draws):
        idx = torch.randint(n, (n,), generator=g)
        boots.append(metric(a[idx], b[idx], **opts))
    return torch.quantile(torch.tensor(boots, dtype=torch.float64), torch.tensor([0.025, 0.975],
                                                                                 dtype=torch.float64)).tolist()


def coverage(truths, intervals):
    return sum(lo <= t <= hi for t, (lo, hi) in zip(truths, intervals)) / len(intervals)


def test_cka_half_sample_intervals_cover_the_population_value_where_the_old_bootstrap_does_not(one_thread):
    g = torch.Generator().manual_seed(1)
    population = cka(*views(400_000, g))  # the N → ∞ value, to about ±0.001
    new, old = [], []
    for _ in range(40):
        a, b = views(96, g)
        rep = calibrate("cka", a, b, permutations=0, bootstrap=60, seed=int(torch.randint(10**6, (1,), generator=g)))
        new.append((rep["ci_low"], rep["ci_high"]))
        old.append(old_bootstrap(cka, a, b, 60, g))
    # measured: 0.975 and 0.75; duplicated rows push the old resamples up (the interval misses low)
    assert coverage([population] * 40, new) >= 0.85 > coverage([population] * 40, old)


def test_mutual_knn_half_sample_intervals_cover_the_n_sample_value_where_the_fixed_graph_does_not(one_thread):
    """The estimand is the expected score of a 128-item data set at k = 5, estimated from 200 other data sets.
    The old interval resampled per-item scores on the fixed neighbour graph (too narrow)."""
    g = torch.Generator().manual_seed(2)
    scores = torch.tensor([mutual_knn(*views(128, g, WIDE), k=5) for _ in range(200)], dtype=torch.float64)
    expected, sd = float(scores.mean()), float(scores.std())
    new, old = [], []
    for _ in range(40):
        a, b = views(128, g, WIDE)
        rep = calibrate("mutual_knn", a, b, k=5, permutations=0, bootstrap=60,
                        seed=int(torch.randint(10**6, (1,), generator=g)))
        new.append((rep["ci_low"], rep["ci_high"]))
        items = mutual_knn.spec.per_item(*(mutual_knn.spec.prepare(x, "x", {"k": 5, "normalize": True,
                                                                             "block_size": None}) for x in (a, b)),
                                         {})
        boots = [float(items[torch.randint(128, (128,), generator=g)].mean()) for _ in range(60)]
        old.append(torch.quantile(torch.tensor(boots, dtype=torch.float64),
                                  torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist())
    # 40 data sets cannot tell 0.95 from 0.85 coverage reliably; the interval's width against the true sd can
    def implied_sd(intervals):
        return sum(hi - lo for lo, hi in intervals) / len(intervals) / 3.92

    # measured: coverage 1.0 vs 0.925; implied sd 1.23 vs 0.84 of the true one (at N = 128, k = 5 the half-sample
    # interval is conservative; the benchmark's N = 1024 widths are within 15 % of the truth)
    assert coverage([expected] * 40, new) >= 0.85
    assert 0.95 * sd <= implied_sd(new) <= 1.5 * sd
    assert implied_sd(old) < 0.95 * sd
