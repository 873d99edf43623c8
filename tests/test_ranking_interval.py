"""Spearman's interval over models (alignment/ranking_interval.py): exact range against brute force, and coverage
of the models' true rho by simulation, where the old percentile interval failed."""

import itertools

import numpy as np
import pytest
from scipy import stats

from prh_stitch.alignment.competence import correlation_report
from prh_stitch.alignment.ranking_interval import resolved_pairs, rho_range, spearman_interval


def brute_range(competence, constraints):
    m = len(competence)
    rhos = []
    for perm in itertools.permutations(range(m)):  # perm[k] = the alignment rank of model k
        if all(perm[low] < perm[high] for low, high in constraints):
            rhos.append(stats.spearmanr(competence, perm)[0])
    return min(rhos), max(rhos)


@pytest.mark.parametrize("seed", range(12))
def test_the_range_over_consistent_rankings_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    m = int(rng.integers(3, 7))
    competence = rng.integers(0, 4, size=m).astype(float) if seed % 3 == 0 else rng.normal(size=m)  # ties too
    if np.all(competence == competence[0]):
        competence[0] += 1
    truth = rng.permutation(m)  # constraints drawn from one true order, so they are consistent
    pairs = [(a, b) for a in range(m) for b in range(m) if truth[a] < truth[b] and rng.random() < 0.4]
    lo, hi = rho_range(competence.tolist(), pairs)
    assert (lo, hi) == pytest.approx(brute_range(competence, pairs))


def test_the_study_report_carries_the_interval_and_its_method():
    competence, scores = [1.0, 2.0, 3.0, 4.0, 5.0], [0.1, 0.2, 0.3, 0.5, 0.4]
    report = correlation_report(competence, scores, [[s + 0.01 * r for s in scores] for r in range(4)])
    assert report["spearman_ci"] == pytest.approx([0.9, 0.9]) and report["pearson_ci"] == [None, None]
    assert "half-samples resolve simultaneously" in report["interval_method"]
    assert correlation_report(competence, scores)["spearman_ci"] == [None, None]  # no replicates, no interval


def test_no_resolved_pair_gives_the_whole_range_and_all_resolved_gives_the_point():
    competence = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert rho_range(competence, []) == pytest.approx((-1.0, 1.0))
    scores = [0.1, 0.3, 0.2, 0.5, 0.4]
    exact = [[s + 0.01 * r for s in scores] for r in range(6)]  # every pairwise difference the same in every half
    result = spearman_interval(competence, scores, exact)
    assert len(result["resolved_pairs"]) == result["pairs"] == 10
    rho = stats.spearmanr(competence, scores)[0]
    assert result["spearman_ci"] == pytest.approx([rho, rho])
    assert rho_range([1.0] * 4, []) is None  # constant competence: rho undefined


def test_resolved_pairs_follow_the_band_and_respect_the_sign():
    rng = np.random.default_rng(0)
    noise = rng.normal(scale=0.01, size=(40, 3))
    scores = np.array([0.10, 0.50, 0.52])  # 0 is far below both; 1 and 2 are within the noise
    reps = scores + noise
    pairs = resolved_pairs(reps.tolist(), scores.tolist())
    assert sorted(pairs) == [(0, 1), (0, 2)]
    with pytest.raises(ValueError, match="at least 2 draws"):
        resolved_pairs([scores.tolist()], scores.tolist())


def simulate(true_scores, item_noise, shared, n_items=128, halves=20, datasets=160, seed=0):
    """Coverage of rho(competence, true scores) and mean width, for the new interval and the old percentile one."""
    rng = np.random.default_rng(seed)
    m = len(true_scores)
    competence = np.arange(m, dtype=float)
    target = stats.spearmanr(competence, true_scores)[0]
    covered = old_covered = 0
    widths = []
    for _ in range(datasets):
        items = (true_scores[:, None] + shared * rng.normal(size=n_items)[None, :]
                 + item_noise * rng.normal(size=(m, n_items)))
        full = items.mean(1)
        reps = [items[:, rng.permutation(n_items)[: n_items // 2]].mean(1) for _ in range(halves)]
        lo, hi = spearman_interval(competence.tolist(), full.tolist(), [r.tolist() for r in reps])["spearman_ci"]
        covered += lo - 1e-9 <= target <= hi + 1e-9
        widths.append(hi - lo)
        old = np.quantile([stats.spearmanr(competence, r)[0] for r in reps], [0.025, 0.975])
        old_covered += old[0] - 1e-9 <= target <= old[1] + 1e-9
    return covered / datasets, float(np.mean(widths)), old_covered / datasets


@pytest.mark.parametrize("true_scores, item_noise", [
    ([0.20, 0.22, 0.24, 0.26, 0.28], 0.6),   # a perfect true trend, measured noisily
    ([0.20, 0.25, 0.22, 0.28, 0.26], 0.6),   # a partial trend (true rho 0.8)
    ([0.25, 0.24, 0.26, 0.25, 0.255], 0.6),  # nearly flat
])
def test_the_interval_covers_the_models_true_rho_at_least_at_its_level(true_scores, item_noise):
    coverage, _, old = simulate(np.array(true_scores), item_noise, shared=0.5)
    assert coverage >= 0.93  # nominal 0.95 and conservative by construction; 160 data sets (se 0.017)
    if true_scores[0] == 0.20 and true_scores[1] == 0.22:
        assert old < 0.5  # the percentile interval this replaced: its spread sits below rho = 1


def test_the_interval_narrows_when_items_resolve_the_ranking():
    coverage, width, _ = simulate(np.array([0.20, 0.22, 0.24, 0.26, 0.28]), item_noise=0.05, shared=0.5)
    assert coverage >= 0.93 and width < 0.3
