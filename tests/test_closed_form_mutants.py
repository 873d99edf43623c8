"""Closed-form behaviour that the mutation run of prh_stitch/closed_form showed no other test pinned down.

Each test checks a behaviour against a NumPy reference or an invariant: the rank test's scale invariance, the
``standard`` and ``isotropic`` Procrustes scalings, target whitening's spread restoration at any target scale,
degenerate (constant) sides, caption groups in the held-out choices, and the warning's and errors' wording.
"""

import warnings

import numpy as np
import pytest
import torch

from prh_stitch.closed_form import GAIN_GRID, WHITEN_GRID, NormalEquations, fit_closed_form
from prh_stitch.metrics import retrieval
from prh_stitch.stitchers import Stitcher
from test_closed_form import _features, _orthogonal, _shared_mean_pairs, _stitcher


def _recall(stitcher, pairs, groups=None):
    with torch.no_grad():
        return retrieval(stitcher(pairs[0]), pairs[1], groups=groups, ks=(1,))["a2b/recall@1"]


# ---- least squares: the rank test and its warning ---------------------------------------------------------------

def _nearly_dependent(scale):
    """float64 features whose last column repeats the first up to 1e-6 of its size: Schur pivot ~1e-12 relative."""
    x = _features(300, 6, 30).double()
    noise = torch.randn(300, generator=torch.Generator().manual_seed(31), dtype=torch.float64)
    return scale * torch.cat([x, (x[:, 0] + 1e-6 * noise)[:, None]], 1), scale * x


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e3])
def test_the_rank_test_is_relative_so_scaling_the_features_changes_no_verdict(scale):
    dependent, independent = _nearly_dependent(scale)
    planted = torch.randn(6, 4, generator=torch.Generator().manual_seed(32), dtype=torch.float64)
    y = independent @ planted
    with warnings.catch_warnings():  # well-posed at every scale: exact, and silent
        warnings.simplefilter("error")
        s = _stitcher("linear", independent, y)
        result = fit_closed_form(s, (independent, y), "lstsq")
    assert not result.rank_deficient and result.ridge == 0.0
    torch.testing.assert_close(s.core.weight.T.double(), planted.float().double(), rtol=1e-4, atol=1e-4)
    y = dependent[:, :6] @ planted
    with pytest.warns(RuntimeWarning, match="rank-deficient"):  # relative pivot 1e-12 < 1e-10 at every scale
        result = fit_closed_form(_stitcher("linear", dependent, y), (dependent, y), "lstsq")
    assert result.rank_deficient


# ---- Procrustes scalings ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, output_norm", [("affine", "none"), ("linear", "none"), ("linear", "standard")])
def test_standard_procrustes_equals_the_numpy_reference(name, output_norm):
    # Spreads well below 1 on both sides, so that a per-feature scale is never confused with a floor of 1.
    x = 0.2 * _features(400, 8, 34)
    y = 0.3 * (x @ _orthogonal(8, 35)[:, :5]) * torch.linspace(0.2, 0.6, 5) + 0.01 * _features(400, 5, 36)
    s = _stitcher(name, x, y, "none", output_norm)
    fit_closed_form(s, (x, y), "procrustes", scaling="standard")
    xn, yn = x.double().numpy(), y.double().numpy()
    if output_norm == "standard":  # the core works in the normalised target space (centred, unit spread)
        yn = (yn - s.output_norm.mean.double().numpy()) / s.output_norm.scale.double().numpy()
    if name == "affine":  # z-scored about the means; the intercept carries them
        xc, yc = xn - xn.mean(0), yn - yn.mean(0)
    else:  # a linear core is fitted about 0: root mean squares
        xc, yc = xn, yn
    sx, sy = np.sqrt((xc ** 2).mean(0)), np.sqrt((yc ** 2).mean(0))
    u, _, vh = np.linalg.svd((xc / sx).T @ (yc / sy) / len(xn), full_matrices=False)
    w = (u @ vh) / sx[:, None] * sy[None, :]
    np.testing.assert_allclose(s.core.weight.detach().double().numpy().T, w, rtol=1e-4, atol=1e-5 * np.abs(w).max())
    if name == "affine":
        np.testing.assert_allclose(s.core.bias.detach().double().numpy(), yn.mean(0) - xn.mean(0) @ w, atol=1e-5)


def test_isotropic_procrustes_recovers_a_scale_on_features_of_small_spread():
    x = 0.05 * _features(500, 12, 37)  # tr(QᵀAQ) = total variance ≪ 1
    q = _orthogonal(12, 38)
    s = _stitcher("affine", x, 0.7 * x @ q)
    fit_closed_form(s, (x, 0.7 * x @ q), "procrustes", scaling="isotropic")
    torch.testing.assert_close(s.core.weight.T, 0.7 * q, atol=1e-4, rtol=1e-4)


def test_isotropic_procrustes_of_a_constant_source_is_a_pure_rotation_onto_the_target_mean():
    x = torch.full((50, 4), 2.0)  # no variance: nothing to scale, so the rotation is left unscaled
    y = _features(50, 4, 39)
    s = _stitcher("affine", x, y)
    fit_closed_form(s, (x, y), "procrustes", scaling="isotropic")
    w = s.core.weight.detach().double()
    torch.testing.assert_close(w.T @ w, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(s(x[:1]), y.mean(0, keepdim=True), atol=1e-5, rtol=1e-5)


# ---- target whitening -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target_scale, output_norm", [(0.01, "none"), (100.0, "none"), (1.0, "standard")])
def test_fixed_whitening_matches_its_formula_at_any_target_scale(target_scale, output_norm):
    """W_v = κ·W(C' + w·τ·I)⁻¹ with κ restoring the plain ridge's spread, whether that spread is below or above 1;
    C' is the target covariance in the output norm's space (per-feature scales of 0.1 to 10 here)."""
    x, y = _shared_mean_pairs(800, 1, 0.3)
    y = target_scale * y * (torch.logspace(-1, 1, y.shape[1]) if output_norm == "standard" else 1.0)
    plain = _stitcher("linear", x, y, "standard", output_norm)
    fit_closed_form(plain, (x, y), "ridge", ridge=1e-3, gain=None, whiten=None)
    s = _stitcher("linear", x, y, "standard", output_norm)
    result = fit_closed_form(s, (x, y), "ridge", ridge=1e-3, whiten=1e-2)  # gain "auto" without val: 1.0
    assert (result.whiten, result.gain) == (1e-2, 1.0) and not result.tuning_scores
    w = plain.core.weight.detach().double().numpy().T
    xs = plain.input_norm(x).double().numpy()
    onorm = plain.output_norm
    cov = np.cov(((y.double() - onorm.mean.double()) / onorm.scale.double()).numpy().T, bias=True)
    t = np.linalg.inv(cov + 1e-2 * np.trace(cov) / len(cov) * np.eye(len(cov)))
    spread = lambda m: np.trace(m.T @ (xs.T @ xs / len(xs)) @ m)  # noqa: E731
    expected = w @ t * np.sqrt(spread(w) / spread(w @ t))
    np.testing.assert_allclose(s.core.weight.detach().double().numpy().T, expected, rtol=1e-4,
                               atol=1e-6 * np.abs(expected).max())


def test_all_zero_targets_fit_every_variant_and_a_full_tie_keeps_the_smallest_ridge():
    x = _features(200, 6, 40)
    y = torch.zeros(200, 3)  # all-zero targets (a dead layer): the ridge map is exactly zero, so is its spread
    for whiten in (None, 1e-2, 1.0):
        s = _stitcher("affine", x, y)
        fit_closed_form(s, (x, y), "ridge", ridge=1e-2, whiten=whiten)
        assert not s.core.weight.detach().any()
        with torch.no_grad():
            torch.testing.assert_close(s(x), y)
    # Every strength gives the same (zero) map, so the same held-out scores: the first, smallest strength is kept.
    result = fit_closed_form(_stitcher("affine", x, y), (x, y), "ridge", ridge_grid=[1e-3, 1e-1, 10.0],
                             val=(x[:50], y[:50]), gain=None, whiten=None)
    assert len(set(result.scores.values())) == 1 and result.ridge == 1e-3
    # Likewise every (whitening, gain) candidate of the retrieval tuning: the first, (None, 0.5), is kept.
    result = fit_closed_form(_stitcher("affine", x, y), (x, y), "ridge", ridge=1e-2, val=(x[:50], y[:50]))
    assert len(set(result.tuning_scores.values())) == 1 and (result.whiten, result.gain) == (None, GAIN_GRID[0])


# ---- held-out choices: caption groups, the criterion, and what is tuned ----------------------------------------

def _grouped(pairs, seed):
    """Every row twice, the copy slightly perturbed on both sides, the two sharing a caption group."""
    x, y = pairs
    g = torch.Generator().manual_seed(seed)
    twin = lambda t: t + 0.05 * t.std() * torch.randn(t.shape, generator=g)  # noqa: E731
    x2, y2 = torch.stack([x, twin(x)], 1).flatten(0, 1), torch.stack([y, twin(y)], 1).flatten(0, 1)
    return (x2, y2), torch.arange(len(x2)) // 2


def test_the_ridge_grid_is_scored_with_the_caption_groups():
    g = torch.Generator().manual_seed(41)
    x = _features(500, 30, 42)
    y = x @ torch.randn(30, 12, generator=g) + 3.0 * torch.randn(500, 12, generator=g)
    train = (x[:250], y[:250])
    val, groups = _grouped((x[250:], y[250:]), 43)
    grid = [1e-4, 1e-1, 10.0]
    result = fit_closed_form(_stitcher("affine", *train, "standard"), train, "ridge", ridge_grid=grid, val=val,
                             val_groups=groups, gain=None, whiten=None)
    reference = {}
    for lam in grid:
        alone = _stitcher("affine", *train, "standard")
        fit_closed_form(alone, train, "ridge", ridge=lam)
        reference[repr(lam)] = _recall(alone, val, groups)
        assert reference[repr(lam)] > _recall(alone, val)  # the twins count: grouped recall differs
    assert result.scores == reference


def test_the_gain_is_tuned_with_the_caption_groups_and_says_it_chose_by_recall():
    train = _shared_mean_pairs(1200, 1, 2.0)
    val, groups = _grouped(_shared_mean_pairs(400, 2, 2.0), 44)
    s = _stitcher("affine", *train, "standard")
    result = fit_closed_form(s, train, "ridge", ridge=1e-3, val=val, val_groups=groups, whiten=None)
    assert result.select_by == "recall@1"  # one strength given, but the gain was chosen on val by recall@1
    reference = {}
    for gain in GAIN_GRID:
        alone = _stitcher("affine", *train, "standard")
        fit_closed_form(alone, train, "ridge", ridge=1e-3, gain=gain)  # no val: exactly this gain
        reference[f"whiten=None,gain={gain!r}"] = _recall(alone, val, groups)
    assert result.tuning_scores == reference
    assert reference[f"whiten=None,gain={result.gain!r}"] == max(reference.values())


def test_a_fixed_gain_still_tunes_the_whitening_on_held_out_features():
    train, val = _shared_mean_pairs(1200, 1, 0.3), _shared_mean_pairs(400, 2, 0.3)
    s = _stitcher("linear", *train, "standard")
    result = fit_closed_form(s, train, "ridge", ridge=1e-3, val=val, gain=2.0)  # whiten "auto"
    assert set(result.tuning_scores) == {f"whiten={w!r},gain=2.0" for w in WHITEN_GRID}
    assert result.gain == 2.0 and result.tuning_scores[f"whiten={result.whiten!r},gain=2.0"] == max(
        result.tuning_scores.values())
    alone = _stitcher("linear", *train, "standard")
    fit_closed_form(alone, train, "ridge", ridge=1e-3, gain=2.0, whiten=result.whiten)
    torch.testing.assert_close(s.core.weight, alone.core.weight)


# ---- errors -----------------------------------------------------------------------------------------------------

def test_a_grid_without_held_out_features_names_both_fixes():
    x, y = _features(50, 6, 45), _features(50, 4, 46)
    with pytest.raises(ValueError, match=r"^choosing the ridge strength from a grid of 2 values needs held-out "
                                         r"features \(val=\(source, target\)\); or give one value with ridge=\.\.\.$"):
        fit_closed_form(_stitcher("linear", x, y), (x, y), "ridge", ridge_grid=[1.0, 2.0])


def test_merging_statistics_of_other_widths_is_a_clear_error():
    with pytest.raises(ValueError, match=r"^cannot merge 5->4 statistics into 6->4$"):
        NormalEquations(6, 4).merge(NormalEquations(5, 4))


def test_ridge_grid_errors_are_whole_lines_with_an_example():
    x, y = _features(50, 6, 47), _features(50, 4, 48)
    with pytest.raises(ValueError, match=r"^ridge_grid is empty; give at least one positive ridge strength, "
                                         r"e\.g\. \[1e-4, 1e-2, 1\.0\]$"):
        fit_closed_form(_stitcher("linear", x, y), (x, y), "ridge", ridge_grid=[])
    with pytest.raises(ValueError, match=r"^ridge_grid values must be finite and > 0 \(use method 'lstsq' for no "
                                         r"ridge\), got \[0\.0\]; e\.g\. \[1e-4, 1e-3, 1e-2, 1e-1, 1\.0, 10\.0, "
                                         r"100\.0\]$"):
        fit_closed_form(_stitcher("linear", x, y), (x, y), "ridge", ridge_grid=[0.0, 1.0])


def test_the_result_record_is_a_plain_dict_of_what_the_fit_did():
    x, y = _features(120, 6, 49), _features(120, 4, 50)
    record = fit_closed_form(_stitcher("affine", x, y), (x, y), "ridge", ridge=0.3).as_dict()
    assert record == {"method": "ridge", "ridge": 0.3, "select_by": None, "scores": {}, "rank_deficient": False,
                      "n_train": 120, "scaling": None, "gain": 1.0, "whiten": None, "tuning_scores": {},
                      "unsupervised": {}}


# ---- the all-reduce of the statistics (the two-process sum itself: test_closed_form.py's gloo test) -------------

def test_all_reduce_outside_a_process_group_changes_nothing():
    x, y = _features(80, 5, 51), _features(80, 3, 52)
    stats = NormalEquations.from_pairs((x, y))
    before = [t.clone() for t in stats._tensors()]
    assert stats.all_reduce() is stats
    assert all(torch.equal(a, b) for a, b in zip(before, stats._tensors()))


def test_all_reduce_in_a_one_process_gloo_group_keeps_the_sums_on_the_cpu(tmp_path):
    import torch.distributed as dist

    x, y = _features(80, 5, 53), _features(80, 3, 54)
    stats = NormalEquations.from_pairs((x, y))
    before = [t.clone() for t in stats._tensors()]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        assert stats.all_reduce() is stats
    finally:
        dist.destroy_process_group()
    for a, b in zip(before, stats._tensors()):  # one rank: the sum of one term, where it was
        assert torch.equal(a, b) and b.device.type == "cpu"


# ---- Procrustes centring, precision, unfitted norms --------------------------------------------------------------

def test_procrustes_centring_can_be_asked_for_where_the_offset_has_a_place_and_refused_where_not():
    x = _features(300, 6, 55)
    q = _orthogonal(6, 56)
    y = x @ q + 2.0  # a planted offset
    affine = _stitcher("affine", x, y)
    fit_closed_form(affine, (x, y), "procrustes", center=True)  # explicit, as the bias implies: the rotation back
    torch.testing.assert_close(affine.core.weight.T, q, atol=1e-4, rtol=1e-4)
    y0 = x @ q
    raw = _stitcher("linear", x, y0)  # no centring, nothing to centre with (input norm "none"): a plain rotation
    fit_closed_form(raw, (x, y0), "procrustes", center=False)
    torch.testing.assert_close(raw.core.weight.T, q, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"^Procrustes with center=True needs somewhere to put the offset: use the "
                                         r"'affine' stitcher, or input_norm 'center'/'standard' with the 'linear' "
                                         r"one$"):
        fit_closed_form(_stitcher("linear", x, y), (x, y), "procrustes", center=True)


def test_mixed_precision_is_what_the_fit_uses():
    x, y = _features(900, 10, 57) * 4 + 30, _features(900, 5, 58) - 20  # large means: the precisions differ
    fits = {}
    for name, train in (("mixed", (x, y)), ("from mixed sums", NormalEquations.from_pairs((x, y), 300, "mixed")),
                        ("float64", (x, y))):
        s = _stitcher("affine", x, y, "standard")
        precision = "float64" if name == "float64" else "mixed"
        fit_closed_form(s, train, "ridge", ridge=1e-3, chunk_rows=300, precision=precision)
        fits[name] = s.core.weight.detach().clone()
    assert torch.equal(fits["mixed"], fits["from mixed sums"])  # the fit's own accumulation is the mixed one
    assert not torch.equal(fits["mixed"], fits["float64"])  # (and that is observable here)
    torch.testing.assert_close(fits["mixed"], fits["float64"], rtol=1e-4, atol=1e-5)  # to ~1e-6 of the moments


def test_an_unfitted_output_norm_is_named_with_the_fix():
    x, y = _features(50, 6, 59), _features(50, 4, 60)
    with pytest.raises(ValueError, match=r"^the stitcher's output normalization \('standard'\) is not fitted; call "
                                         r"stitcher\.fit_normalization\(source, target\) on the training features "
                                         r"first$"):
        fit_closed_form(Stitcher("linear", 6, 4, output_norm="standard"), (x, y), ridge=1.0)


# ---- the moments: sizes, and a linear core's offset under an output norm ---------------------------------------

def test_one_training_pair_is_enough_for_a_ridge_fit():
    x, y = _features(1, 5, 61).double(), _features(1, 3, 62).double()
    s = _stitcher("linear", x, y)
    fit_closed_form(s, (x, y), "ridge", ridge=0.5)
    xn, yn = x.numpy(), y.numpy()
    gram = xn.T @ xn
    w = np.linalg.solve(gram + 0.5 * np.trace(gram) / 5 * np.eye(5), xn.T @ yn)
    np.testing.assert_allclose(s.core.weight.detach().double().numpy().T, w, rtol=1e-5, atol=1e-7)


def test_statistics_without_rows_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^no training pairs were accumulated$"):
        fit_closed_form(Stitcher("linear", 6, 4), NormalEquations(6, 4), ridge=1.0)


def test_a_linear_core_under_a_standard_output_norm_equals_the_numpy_ridge():
    """No intercept: the core maps raw x to the normalised targets y' = (y − μ)/σ about 0, the norm adds μ back."""
    x = _features(300, 10, 63)
    y = x @ torch.randn(10, 4, generator=torch.Generator().manual_seed(64)) + 5.0 + 0.5 * _features(300, 4, 65)
    s = _stitcher("linear", x, y, "none", "standard")
    fit_closed_form(s, (x, y), "ridge", ridge=0.1)
    xn, yn = x.double().numpy(), y.double().numpy()
    mu, sd = yn.mean(0), yn.std(0)
    gram = xn.T @ xn / len(xn)
    w = np.linalg.solve(gram + 0.1 * np.trace(gram) / 10 * np.eye(10), xn.T @ ((yn - mu) / sd) / len(xn))
    with torch.no_grad():
        np.testing.assert_allclose(s(x).double().numpy(), xn @ w * sd + mu, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "cholesky"}, r"^unknown closed-form method 'cholesky'; choose one of lstsq, ridge, procrustes, "
                             r"unsupervised$"),
    ({"select_by": "r@5"}, r"^unknown select_by 'r@5'; choose one of recall@1, mse$"),
    ({"method": "procrustes", "scaling": "anisotropic"},
     r"^unknown Procrustes scaling 'anisotropic'; choose one of none, isotropic, standard$"),
    ({"method": "lstsq", "gain": 2.0}, r"^gain and whiten tune a ridge fit for retrieval; method 'lstsq' takes "
                                       r"neither \(use method 'ridge', or leave them at 'auto'\)$"),
])
def test_unknown_options_are_whole_lines_listing_the_choices(kwargs, message):
    x, y = _features(50, 6, 66), _features(50, 4, 67)
    with pytest.raises(ValueError, match=message):
        fit_closed_form(_stitcher("linear", x, y), (x, y), **kwargs)


def test_normalisations_fitted_on_other_rows_equal_the_numpy_ridge_in_their_space():
    """The norms may come from more (or other) data than the closed-form pairs: then the pairs' means in the
    normalised space are not 0, and the intercept must carry them."""
    x, y = _features(600, 8, 68) + 1.0, _features(600, 5, 69) * 2 - 3.0
    y = y + x[:, :5]
    s = Stitcher("affine", 8, 5, "standard", "standard").fit_normalization(x, y)  # all 600 rows
    pairs = (x[:200] * 1.5 + 0.7, y[:200] * 0.8 - 0.4)  # the fit sees a shifted, rescaled subset
    fit_closed_form(s, pairs, "ridge", ridge=0.05)
    inorm, onorm = s.input_norm, s.output_norm
    xs = ((pairs[0].double() - inorm.mean.double()) / inorm.scale.double()).numpy()
    ys = ((pairs[1].double() - onorm.mean.double()) / onorm.scale.double()).numpy()
    xc, yc = xs - xs.mean(0), ys - ys.mean(0)
    gram = xc.T @ xc / len(xc)
    w = np.linalg.solve(gram + 0.05 * np.trace(gram) / 8 * np.eye(8), xc.T @ yc / len(xc))
    expected = ((xs - xs.mean(0)) @ w + ys.mean(0)) * onorm.scale.double().numpy() + onorm.mean.double().numpy()
    with torch.no_grad():
        np.testing.assert_allclose(s(pairs[0]).double().numpy(), expected, rtol=1e-5, atol=1e-4)


def test_the_row_count_stays_exact_beyond_float32_integers():
    stats = NormalEquations(2, 1).update(torch.ones(1, 2), torch.ones(1, 1))
    for _ in range(24):
        stats.merge(stats)  # doubles every sum: 2^24 rows
    stats.merge(NormalEquations(2, 1).update(torch.ones(1, 2), torch.ones(1, 1)))
    assert stats.n == 2 ** 24 + 1  # float32 would round the count to 2^24


def test_an_unknown_precision_lists_the_choices():
    with pytest.raises(ValueError, match=r"^unknown precision 'half'; choose one of float64, mixed$"):
        NormalEquations(3, 2, precision="half")


def test_no_chunks_or_chunks_that_are_not_matrices_are_clear_errors():
    with pytest.raises(ValueError, match=r"^no training pairs were given to the closed-form fit$"):
        NormalEquations.from_pairs([])
    with pytest.raises(ValueError, match=r"^expected paired chunks of shape \(n, 6\) and \(n, 4\), got \(6,\) and "
                                         r"\(4,\)$"):
        NormalEquations.from_pairs([(torch.ones(6), torch.ones(4))])


# ---- the held-out scores themselves ------------------------------------------------------------------------------

def _mse(stitcher, pairs):
    with torch.no_grad():
        return float((stitcher(pairs[0]).double() - pairs[1].double()).square().mean())


def test_the_mse_criterion_scores_each_strength_by_its_held_out_mse():
    g = torch.Generator().manual_seed(70)
    x = _features(400, 20, 71)
    y = x @ torch.randn(20, 6, generator=g) + 2.0 * torch.randn(400, 6, generator=g)
    train, val = (x[:150], y[:150]), (x[150:], y[150:])
    grid = [1e-3, 1e-1, 10.0]
    result = fit_closed_form(_stitcher("affine", *train), train, "ridge", ridge_grid=grid, val=val, select_by="mse")
    reference = {}
    for lam in grid:
        alone = _stitcher("affine", *train)
        fit_closed_form(alone, train, "ridge", ridge=lam)
        reference[lam] = _mse(alone, val)
    assert result.scores == pytest.approx({repr(k): v for k, v in reference.items()}, rel=1e-9)
    assert result.ridge == min(reference, key=reference.get)


def test_float64_held_out_features_are_scored_like_their_float32_copy():
    train, val = _shared_mean_pairs(600, 1, 1.0), _shared_mean_pairs(300, 2, 1.0)
    results = []
    for cast in (torch.float32, torch.float64):
        s = _stitcher("affine", *train, "standard")
        results.append(fit_closed_form(s, train, "ridge", ridge_grid=[1e-3, 1e-1], val=tuple(t.to(cast) for t in val)))
    assert results[0].as_dict() == results[1].as_dict()


def test_gain_tuning_with_norms_fitted_on_other_rows_scores_as_the_metric():
    """Norms from other rows: the pairs' normalised means are not 0 and the output norm shifts and scales, so the
    tuning's own bookkeeping of the mean part (x̄', ȳ'·σ + μ) is what is checked here."""
    x, y = _shared_mean_pairs(1600, 1, 1.5)
    s = Stitcher("affine", 32, 16, "standard", "standard").fit_normalization(x[:800] * 1.3 - 0.5, y[:800] * 0.7 + 2.0)
    train, val = (x[800:1400], y[800:1400]), (x[1400:], y[1400:])
    result = fit_closed_form(s, train, "ridge", ridge=1e-3, val=val, whiten=None)
    reference = {}
    for gain in GAIN_GRID:
        alone = Stitcher("affine", 32, 16, "standard", "standard")
        alone.load_state_dict(s.state_dict())  # the same norms
        fit_closed_form(alone, train, "ridge", ridge=1e-3, gain=gain)
        reference[f"whiten=None,gain={gain!r}"] = _recall(alone, val)
    assert result.tuning_scores == reference


def test_without_a_mean_part_every_gain_ranks_alike_and_the_held_out_mse_chooses():
    train, val = _shared_mean_pairs(800, 1, 1.0), _shared_mean_pairs(400, 2, 1.0)
    s = _stitcher("linear", *train, "standard")  # no bias, output norm without shift: cosine ignores the gain
    result = fit_closed_form(s, train, "ridge", ridge=1e-3, val=val, whiten=None)
    assert len(set(result.tuning_scores.values())) == 1
    mse = {}
    for gain in GAIN_GRID:
        alone = _stitcher("linear", *train, "standard")
        fit_closed_form(alone, train, "ridge", ridge=1e-3, gain=gain)
        mse[gain] = _mse(alone, val)
    assert result.gain == min(mse, key=mse.get)


# ---- NormalEquations.update: what a chunk must be ----------------------------------------------------------------

@pytest.mark.parametrize("x_shape, y_shape", [((5, 6), (5, 3)), ((5, 6, 1), (5, 4)), ((5, 6), (5, 4, 1))])
def test_a_chunk_of_the_wrong_shape_on_either_side_is_refused(x_shape, y_shape):
    got = f"got {x_shape} and {y_shape}".replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=rf"^expected paired chunks of shape \(n, 6\) and \(n, 4\), {got}$"):
        NormalEquations(6, 4).update(torch.ones(x_shape), torch.ones(y_shape))


def test_chunks_with_different_row_counts_are_refused_with_both_counts():
    with pytest.raises(ValueError, match=r"^paired chunks must have the same number of rows, got 5 and 3$"):
        NormalEquations(6, 4).update(torch.ones(5, 6), torch.ones(3, 4))


@pytest.mark.parametrize("side", ["x", "y"])
def test_a_non_finite_value_on_either_side_is_refused(side):
    x, y = torch.ones(5, 6), torch.ones(5, 4)
    (x if side == "x" else y)[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"^features contain NaN or Inf; a closed-form fit needs finite features$"):
        NormalEquations(6, 4).update(x, y)


def test_writing_a_map_without_an_intercept_into_an_affine_core_zeroes_its_bias():
    from prh_stitch.closed_form.stitcher_core import _write

    s = Stitcher("affine", 3, 2)  # nn.Linear's random initial bias
    weight = torch.arange(6, dtype=torch.float64).reshape(3, 2)
    _write(s, weight, None)
    assert torch.equal(s.core.weight, weight.T.float()) and not s.core.bias.any()
