"""Invariances, chance levels, block-size independence, dtypes, registry, layers and calibration."""

import math
import sys

import numpy as np
import pytest
import torch

from prh_stitch.metrics import (METRICS, calibrate, cka, cknna, cycle_knn, layer_alignment, mutual_knn,
                                retrieval, svcca, unbiased_cka)
from prh_stitch.metrics.neighbors import knn
from test_metrics_reference import make_data, np_pair, ref_cka, ref_cycle, ref_edit, ref_knn, ref_lcs, ref_mutual

ALL = METRICS.names()
BLOCKED = ["mutual_knn", "cycle_knn", "lcs_knn", "edit_distance_knn", "cknna", "cka", "unbiased_cka"]


def test_registry_maps_names_to_functions():
    assert ALL == sorted(["mutual_knn", "cycle_knn", "lcs_knn", "edit_distance_knn", "cka", "unbiased_cka", "cknna",
                          "svcca"])
    assert METRICS.get("mutual_knn") is mutual_knn
    with pytest.raises(ValueError, match="mutual_knn"):
        METRICS.get("mutual_kn")


@pytest.mark.parametrize("name", ALL)
def test_returns_python_float_for_all_dtypes(name):
    a, b = make_data("noisy", n=64)
    fn = METRICS.get(name)
    ref = fn(a, b)
    assert type(ref) is float and math.isfinite(ref)
    assert fn(a.clone(), b.clone()) == ref  # deterministic (SVCCA included: exact eigendecomposition, no random SVD)
    for dt in (torch.float16, torch.bfloat16):
        # low-precision input is cast to float32 first: the same as casting it yourself
        assert fn(a.to(dt), b.to(dt)) == fn(a.to(dt).float(), b.to(dt).float())


def test_identical_inputs_score_one():
    a, _ = make_data("clusters", n=100)
    assert mutual_knn(a, a, k=10) == 1.0
    assert cka(a, a) == pytest.approx(1.0, abs=1e-6)
    assert unbiased_cka(a, a) == pytest.approx(1.0, abs=1e-6)
    assert cknna(a, a, k=10) == pytest.approx(1.0, abs=1e-6)
    assert svcca(a, a, dim=5) == pytest.approx(1.0, abs=1e-6)
    r = retrieval(a, a)
    assert r["a2b/recall@1"] == r["b2a/recall@1"] == 1.0 and r["mean_cosine"] == pytest.approx(1.0, abs=1e-6)


def test_rotation_and_scaling_invariance():
    a, b = make_data("noisy", n=150)
    q, _ = torch.linalg.qr(torch.randn(24, 24, generator=torch.Generator().manual_seed(5)))
    moved = 3.5 * (a @ q)
    # one flipped neighbour at a float32 near-tie would change mutual_knn by 1/(N·k)
    assert mutual_knn(moved, b) == pytest.approx(mutual_knn(a, b), abs=1 / (150 * 10) + 1e-12)
    assert cka(moved, b) == pytest.approx(cka(a, b), abs=1e-5)
    assert cka(moved, b, normalize=False) == pytest.approx(cka(a, b, normalize=False), abs=1e-5)


def test_independent_features_land_near_chance():
    g = torch.Generator().manual_seed(11)
    n, k = 1000, 10
    a, b = torch.randn(n, 64, generator=g), torch.randn(n, 64, generator=g)
    chance = k / (n - 1)
    assert abs(mutual_knn(a, b, k=k) - chance) < 0.004
    assert abs(cycle_knn(a, b, k=k) - (1 - (1 - chance) ** k)) < 0.04
    assert abs(unbiased_cka(a, b)) < 0.02
    assert cka(a, b) < 0.1  # the biased estimator sits above 0 at this N/D: why the unbiased one exists
    rep = calibrate("mutual_knn", a, b, permutations=20, seed=0)
    assert rep["chance"] == pytest.approx(chance)
    assert abs(rep["null_mean"] - chance) < 0.002
    assert abs(rep["calibrated"]) < 0.005 and rep["p_value"] > 0.01


@pytest.mark.parametrize("name", BLOCKED)
def test_block_size_does_not_change_results(name):
    a, b = make_data("clusters", n=70)
    fn = METRICS.get(name)
    kw = {"method": "samples"} if "cka" in name else {}
    ref = fn(a, b, **kw)
    # kNN lists are identical; kernel values may differ in the last float32 bit between matmul shapes
    tol = 0.0 if name.endswith("_knn") else 1e-6
    for bs in (1, 9, 64, 1000):
        assert fn(a, b, block_size=bs, **kw) == pytest.approx(ref, abs=tol)
    if "cka" in name:
        assert fn(a, b, kernel="rbf", block_size=7) == pytest.approx(fn(a, b, kernel="rbf"), abs=1e-6)


def test_retrieval_block_size_and_keys():
    a, b = make_data("noisy", n=70)
    ref = retrieval(a, b)
    assert list(ref) == ["a2b/recall@1", "a2b/recall@5", "a2b/recall@10", "b2a/recall@1", "b2a/recall@5",
                         "b2a/recall@10", "a2b/mean_rank", "a2b/median_rank", "b2a/mean_rank", "b2a/median_rank",
                         "mean_cosine"]
    for bs in (1, 8, 500):
        assert retrieval(a, b, block_size=bs) == ref


def test_knn_lists_sorted_and_exclude_self():
    a, _ = make_data("clusters", n=50)
    v, i = knn(torch.nn.functional.normalize(a, dim=1), 7, block_size=6)
    assert (i != torch.arange(50)[:, None]).all()
    assert (v[:, :-1] >= v[:, 1:]).all()
    same = torch.arange(50) // 5  # excluded groups: never neighbours of each other
    _, i2 = knn(a, 7, exclude=same)
    assert (same[i2] != same[:, None]).all()


def test_layer_alignment_matrix_best_last_concat():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(90, 12, generator=g)
    fa = [torch.randn(90, 10, generator=g), base @ torch.randn(12, 20, generator=g), base]
    fb = [base + 0.1 * torch.randn(90, 12, generator=g), torch.randn(90, 7, generator=g)]
    out = layer_alignment(fa, fb, "mutual_knn", k=5, concat=True)
    assert out["scores"].shape == (3, 2)
    for i in range(3):
        for j in range(2):
            assert out["scores"][i, j] == pytest.approx(mutual_knn(fa[i], fb[j], k=5))
    assert out["best"] == pytest.approx(float(out["scores"].max()))
    assert out["best_index"] == (2, 0) and out["last_index"] == (2, 1)
    assert out["last"] == pytest.approx(mutual_knn(fa[2], fb[1], k=5))
    assert out["concat"] == pytest.approx(mutual_knn(torch.cat(fa, 1), torch.cat(fb, 1), k=5))
    cka_out = layer_alignment(fa, fb, cka)
    assert cka_out["scores"][1, 0] == pytest.approx(cka(fa[1], fb[0]), abs=1e-9) and cka_out["concat"] is None
    for name in ALL:
        s = layer_alignment(fa[:1], fb[:1], name)["scores"]
        assert s[0, 0] == pytest.approx(METRICS.get(name)(fa[0], fb[0]), abs=1e-9), name


def test_layer_alignment_searches_each_layer_once(monkeypatch):
    import importlib

    knn_mod = importlib.import_module("prh_stitch.metrics.knn")

    calls = []
    real = knn_mod.knn
    monkeypatch.setattr(knn_mod, "knn", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    fa = [torch.randn(40, 6) for _ in range(3)]
    fb = [torch.randn(40, 5) for _ in range(4)]
    layer_alignment(fa, fb, "cycle_knn", k=3)
    assert len(calls) == 3 + 4


def test_permutation_null_reuses_lists_and_matches_fresh_search():
    a, b = make_data("clusters", n=80)
    rep = calibrate("mutual_knn", a, b, permutations=5, seed=3)
    gen = torch.Generator().manual_seed(3)
    fresh = [mutual_knn(a, b[torch.randperm(80, generator=gen)]) for _ in range(5)]
    assert rep["null_mean"] == pytest.approx(sum(fresh) / 5, abs=1e-12)
    for name in ALL:  # every metric's permuted side equals recomputing on the permuted rows
        gen = torch.Generator().manual_seed(4)
        one = calibrate(name, a, b, permutations=1, seed=4)["null_mean"]
        tol = 0.0 if name.endswith("_knn") else 1e-6  # row order changes float32 sums in the last bits
        assert one == pytest.approx(METRICS.get(name)(a, b[torch.randperm(80, generator=gen)]), abs=tol), name


def test_calibrate_report_on_aligned_data():
    a, b = make_data("noisy", n=120)
    na, nb = np_pair(a, b)
    rep = calibrate(mutual_knn, a, b, k=5, permutations=30, bootstrap=50, seed=1)
    assert rep["score"] == pytest.approx(ref_mutual(na, nb, 5))
    assert rep["p_value"] == pytest.approx(1 / 31) and rep["z"] > 10
    assert rep["ci_low"] < rep["score"] < rep["ci_high"]
    assert calibrate(mutual_knn, a, b, k=5, permutations=30, bootstrap=50, seed=1) == rep  # seeded
    assert calibrate(mutual_knn, a, b, k=5, permutations=30, bootstrap=50, seed=2) != rep
    for name in ("cka", "cknna", "svcca"):
        r = calibrate(name, a, b, permutations=3, bootstrap=4, seed=0)
        assert r["ci_low"] <= r["ci_high"] and r["null_mean"] < r["score"], name
    assert calibrate("unbiased_cka", a, b, permutations=0)["chance"] == 0.0
    default = calibrate("mutual_knn", a, b)  # documented defaults: 20 permutations, no bootstrap, seed 0
    assert (default["permutations"], default["bootstrap"]) == (20, 0)
    assert default == calibrate("mutual_knn", a, b, permutations=20, bootstrap=0, seed=0)
    assert calibrate("lcs_knn", a, b, permutations=2)["chance"] is None


# -- calibration against an independent replay of the same seeded draws ----------------------------------------
# calibrate draws from one CPU generator seeded with ``seed``: first ``permutations`` randperm(N) (the shuffled
# pairings), then ``bootstrap`` half-samples, each the first N//2 entries of a randperm(N), sorted. The replay below
# repeats those draws and recomputes everything with the NumPy brute force of test_metrics_reference, sharing no
# code with calibrate; the interval is written out from its definition (prh_stitch.metrics.intervals).


def replay_draws(n, permutations, bootstrap, seed):
    gen = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(n, generator=gen) for _ in range(permutations)]
    halves = [torch.randperm(n, generator=gen)[: n // 2].sort().values for _ in range(bootstrap)]
    return perms, halves


def mutual_overlaps(na, nb, k):
    """|N_A(i) ∩ N_B(i)| per sample, as integers (so ties between scores are exact in the replay)."""
    ia, ib = ref_knn(na, k), ref_knn(nb, k)
    return np.array([len(set(ia[i]) & set(ib[i])) for i in range(len(na))])


def test_calibrate_replays_permutations_and_half_samples_for_a_knn_metric():
    """Unrelated features, N = 15, k = 2: scores are multiples of 1/30, so many null scores tie with the observed
    one exactly. The one-sided p-value counts them (≥, not >) and its resolution is 1/(1 + permutations); the null
    std is the sample std (ddof 1). The interval: mutual kNN at fixed k estimates the N-sample value, so the
    half-sample scores (neighbours searched anew in each half) are centred on their own mean, rescaled by
    √(m/(N − m)) = √(7/8) for N = 15, and reflected around the score (basic interval)."""
    n, k, perms_n, boots_n, seed, ci = 15, 2, 199, 300, 5, 0.9
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(n, 6, generator=g), torch.randn(n, 5, generator=g)
    na, nb = np_pair(a, b)
    rep = calibrate("mutual_knn", a, b, k=k, permutations=perms_n, bootstrap=boots_n, seed=seed, ci=ci)

    perms, halves = replay_draws(n, perms_n, boots_n, seed)
    observed = mutual_overlaps(na, nb, k).sum()
    null_counts = np.array([mutual_overlaps(na, nb[p.numpy()], k).sum() for p in perms])
    ties, above = int((null_counts == observed).sum()), int((null_counts > observed).sum())
    assert ties >= 5 and above >= 5  # the tie rule and the count both matter for this p-value
    score = observed / (n * k)
    assert rep["score"] == score
    assert rep["p_value"] == (1 + above + ties) / (1 + perms_n) and rep["p_resolution"] == 1 / 200
    null = null_counts / (n * k)
    mean, std = null.mean(), null.std(ddof=1)
    assert rep["null_mean"] == pytest.approx(mean, abs=1e-12)
    assert rep["null_std"] == pytest.approx(std, abs=1e-12)
    assert rep["z"] == pytest.approx((score - mean) / std, abs=1e-9)
    assert rep["calibrated"] == pytest.approx((score - mean) / (1 - mean), abs=1e-12)
    assert rep["chance"] == pytest.approx(k / (n - 1), abs=1e-15)
    assert (rep["metric"], rep["n"], rep["permutations"], rep["bootstrap"]) == ("mutual_knn", n, perms_n, boots_n)

    # each half is a data set of its own: 7 rows, neighbour lists searched among those 7 only
    draws = np.array([ref_mutual(na[h.numpy()], nb[h.numpy()], k) for h in halves])
    assert rep["ci_draws"] == pytest.approx(draws.tolist(), abs=1e-12)
    dev = draws - draws.mean()
    q_lo, q_hi = np.quantile(dev, [(1 - ci) / 2, (1 + ci) / 2])
    c = math.sqrt(7 / 8)
    assert rep["ci"] == ci and rep["interval_method"] == "half-sample, 300 draws, N-sample estimand"
    assert rep["ci_low"] == pytest.approx(score - c * q_hi, abs=1e-12)
    assert rep["ci_high"] == pytest.approx(score - c * q_lo, abs=1e-12)


def test_calibrate_replays_half_samples_for_a_kernel_metric():
    """CKA estimates its population value: deviations are taken from the full-sample score (their mean is the
    estimate of the full sample's 1/N bias), N = 40 gives c = 1, and no half holds a row twice."""
    n, perms_n, boots_n, seed, ci = 40, 6, 25, 3, 0.8
    a, b = make_data("noisy", n=n)
    na, nb = np_pair(a, b)
    rep = calibrate("cka", a, b, permutations=perms_n, bootstrap=boots_n, seed=seed, ci=ci)
    perms, halves = replay_draws(n, perms_n, boots_n, seed)
    score = ref_cka(na, nb)
    null = np.array([ref_cka(na, nb[p.numpy()]) for p in perms])
    assert rep["score"] == pytest.approx(score, abs=1e-6)
    assert rep["null_mean"] == pytest.approx(null.mean(), abs=1e-6)
    assert rep["null_std"] == pytest.approx(null.std(ddof=1), abs=1e-6)
    assert rep["z"] == pytest.approx((score - null.mean()) / null.std(ddof=1), rel=1e-4)
    assert rep["p_value"] == rep["p_resolution"] == 1 / (1 + perms_n) and rep["chance"] is None
    assert all(len(set(h.tolist())) == n // 2 for h in halves)
    draws = np.array([ref_cka(na[h.numpy()], nb[h.numpy()]) for h in halves])
    q_lo, q_hi = np.quantile(draws - score, [(1 - ci) / 2, (1 + ci) / 2])
    assert rep["ci_low"] == pytest.approx(score - q_hi, abs=1e-6)
    assert rep["ci_high"] == pytest.approx(score - q_lo, abs=1e-6)
    assert rep["interval_method"] == "half-sample, 25 draws, population estimand"


def test_calibrate_passes_the_metric_options_to_the_score_the_null_and_the_halves():
    """An RBF kernel goes CKA's sample route, which reads the options on every call: the score, each permuted null
    score and each half-sample score must be the metric's own at those options (here: not the linear default)."""
    n, perms_n, boots_n, seed = 24, 3, 4, 2
    a, b = make_data("noisy", n=n)
    rep = calibrate("cka", a, b, permutations=perms_n, bootstrap=boots_n, seed=seed, kernel="rbf")
    perms, halves = replay_draws(n, perms_n, boots_n, seed)
    assert rep["score"] == pytest.approx(cka(a, b, kernel="rbf"), abs=1e-6)
    assert abs(rep["score"] - cka(a, b)) > 1e-3  # the option changes the score on this data
    null = [cka(a, b[p], kernel="rbf") for p in perms]
    assert rep["null_mean"] == pytest.approx(float(np.mean(null)), abs=1e-6)
    assert rep["ci_draws"] == pytest.approx([cka(a[h], b[h], kernel="rbf") for h in halves], abs=1e-6)


def test_calibrate_edge_cases_saturated_null_one_or_two_permutations_and_no_resampling():
    # N = k + 1: every neighbour list holds all other samples, so every pairing scores 1 and the null is flat
    a, b = make_data("independent", n=5)
    flat = calibrate("mutual_knn", a, b, k=4, permutations=4, seed=0)
    assert flat["score"] == 1.0 and flat["null_mean"] == 1.0 and flat["null_std"] == 0.0
    assert flat["z"] == 0.0 and flat["p_value"] == 1.0 and flat["calibrated"] is None  # not inf, not 0/0
    a, b = make_data("noisy", n=30)
    one = calibrate("mutual_knn", a, b, k=3, permutations=1, seed=0)
    assert one["null_std"] == 0.0 and one["z"] == math.inf  # one draw has no spread; the score is above it
    two = calibrate("mutual_knn", a, b, k=3, permutations=2, seed=0)
    perms, _ = replay_draws(30, 2, 0, 0)
    na, nb = np_pair(a, b)
    null = np.array([ref_mutual(na, nb[p.numpy()], 3) for p in perms])
    assert two["null_std"] == pytest.approx(null.std(ddof=1), abs=1e-12) and two["null_std"] > 0
    none = calibrate("mutual_knn", a, b, k=3, permutations=0)
    assert all(none[key] is None for key in ("null_mean", "null_std", "z", "p_value", "p_resolution", "calibrated",
                                             "ci_low", "ci_high", "interval_method", "ci_draws"))
    assert none["ci"] == 0.95 and none["score"] == pytest.approx(ref_mutual(na, nb, 3), abs=1e-12)


def test_permutation_p_values_are_valid_under_the_null():
    """Simulation: for unrelated features P(p ≤ α) ≤ α (the +1 in numerator and denominator makes the test exact
    up to ties); with 19 permutations the attainable levels are multiples of 1/20."""
    g = torch.Generator().manual_seed(0)
    p_values = []
    for trial in range(150):
        a, b = torch.randn(20, 4, generator=g), torch.randn(20, 4, generator=g)
        p_values.append(calibrate("mutual_knn", a, b, k=3, permutations=19, seed=trial)["p_value"])
    p_values = np.array(p_values)
    for alpha in (0.1, 0.25, 0.5):
        # binomial(150, alpha) upper 99.9 % bound: alpha + 3.1 sd
        assert (p_values <= alpha).mean() <= alpha + 3.1 * np.sqrt(alpha * (1 - alpha) / 150), alpha
    assert (p_values <= 0.5).mean() > 0.25  # not trivially conservative (p ≡ 1 would pass the bound above)


# -- import-time wiring -----------------------------------------------------------------------------------------


def fresh_import(module_name, monkeypatch):
    """A second copy of a metrics module, executed inside the test, so its import-time wiring (the parts each
    metric attaches for layers and calibration) runs here. The registry it writes to is a copy, restored after."""
    import importlib
    import importlib.util

    from prh_stitch.metrics import _spec
    from prh_stitch.registry import Registry

    # A fresh, empty registry for the copy (the real one refuses a second "mutual_knn"); the real one is untouched.
    monkeypatch.setattr(_spec, "METRICS", Registry("metric"))
    original = importlib.import_module(module_name)
    spec = importlib.util.spec_from_file_location(module_name + "_fresh", original.__file__)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = module_name.rpartition(".")[0]
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_fresh_import_of_the_knn_module_wires_every_part(monkeypatch):
    fresh = fresh_import("prh_stitch.metrics.knn", monkeypatch)
    a, b = make_data("clusters", n=40)
    na, nb = np_pair(a, b)
    for name, ref in (("mutual_knn", ref_mutual), ("cycle_knn", ref_cycle), ("lcs_knn", ref_lcs),
                      ("edit_distance_knn", ref_edit)):
        fn, imported = getattr(fresh, name), METRICS.get(name)
        assert fn is not imported and fn.spec is not imported.spec
        assert fn(a, b, k=4) == pytest.approx(ref(na, nb, 4), abs=1e-12), name
        # chance, permutation (relabelled lists), half-sample interval: the same report as the imported metric
        assert calibrate(fn, a, b, k=4, permutations=3, bootstrap=5, seed=0) == \
            calibrate(imported, a, b, k=4, permutations=3, bootstrap=5, seed=0), name
        with pytest.raises(ValueError, match="k must be >= 1"):
            fn(a, b, k=0)
