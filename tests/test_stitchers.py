import io
import json

import pytest
import torch

from prh_stitch.stitchers import NORMALIZATIONS, STITCHERS, FeatureNorm, Stitcher, build_stitcher

# Options some cores need (or that keep them small); every other registered core is built bare, so a
# new registration is covered by the parametrised tests without editing this file.
CORE_OPTIONS = {"lowrank": {"rank": 3}, "mlp": {"hidden_dim": 16}}


def _features(n, dim, seed, loc=0.0):
    """Features with per-feature offsets and spreads, so normalisation has something to undo."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.rand(dim, generator=g) * 4 + 0.5
    offset = torch.randn(dim, generator=g) * 3 + loc
    return torch.randn(n, dim, generator=g) * spread + offset


def _fitted_stitcher(name, in_dim=12, out_dim=7, seed=0):
    torch.manual_seed(seed)
    s = Stitcher(name, in_dim, out_dim, input_norm="standard", output_norm="center", **CORE_OPTIONS.get(name, {}))
    s.fit_normalization(_features(64, in_dim, seed + 1), _features(64, out_dim, seed + 2))
    return s.eval()


# ---------------------------------------------------------------- FeatureNorm


@pytest.mark.parametrize("kind", NORMALIZATIONS.names())
def test_feature_norm_inverse_undoes_forward(kind):
    x = _features(200, 9, seed=1).double()
    norm = FeatureNorm(9, kind).double().fit(x)
    torch.testing.assert_close(norm.inverse(norm(x)), x, rtol=0, atol=1e-12)


def test_standard_norm_gives_zero_mean_unit_std_and_center_only_shifts():
    x = _features(500, 6, seed=2).double()
    z = FeatureNorm(6, "standard").double().fit(x)(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(6, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(6, dtype=torch.float64), rtol=0, atol=1e-12)

    c = FeatureNorm(6, "center").double().fit(x)(x)
    torch.testing.assert_close(c, x - x.mean(0), rtol=0, atol=1e-12)


def test_constant_feature_is_mapped_to_zero_not_inf():
    x = _features(50, 3, seed=3)
    x[:, 1] = 7.0
    z = FeatureNorm(3, "standard").fit(x)(x)
    assert torch.isfinite(z).all()
    assert torch.equal(z[:, 1], torch.zeros(50))


def test_fit_stream_matches_float64_reference_for_large_offsets():
    # Features far from zero relative to their spread: a float32 sum of squares would lose the
    # variance entirely; the streamed float64 merge must recover it.
    x = (_features(3000, 5, seed=4) * 1e-2 + 1e4).float()
    ref = x.double()
    chunks = list(x.split(777))  # uneven chunk sizes
    streamed = FeatureNorm(5, "standard").fit_stream(iter(chunks))
    whole = FeatureNorm(5, "standard")
    whole.fit_chunk_rows = 1000  # force fit() through several internal chunks too
    whole.fit(x)
    for norm in (streamed, whole):
        torch.testing.assert_close(norm.mean.double(), ref.mean(0), rtol=1e-7, atol=0)
        torch.testing.assert_close(norm.scale.double(), ref.std(0, unbiased=False), rtol=1e-5, atol=0)


def test_feature_norm_rejects_bad_input():
    norm = FeatureNorm(4, "standard")
    with pytest.raises(ValueError, match="last dim 4, got shape \\(10, 3\\)"):
        norm.fit(torch.randn(10, 3))
    with pytest.raises(ValueError, match="no feature rows"):
        norm.fit_stream([])
    bad = torch.randn(10, 4)
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        norm.fit(bad)
    with pytest.raises(ValueError, match="unknown normalization 'standrad'"):
        FeatureNorm(4, "standrad")


@pytest.mark.parametrize("kind", ["center", "standard"])
def test_unfitted_norm_raises_until_fitted_or_loaded(kind):
    s = Stitcher("linear", 4, 3, input_norm=kind)
    with pytest.raises(RuntimeError, match="before being fitted"):
        s(torch.randn(2, 4))

    fitted = Stitcher("linear", 4, 3, input_norm=kind).fit_normalization(torch.randn(20, 4), None)
    s.load_state_dict(fitted.state_dict())
    assert s(torch.randn(2, 4)).shape == (2, 3)

    # and the other way: loading an unfitted state must make the fitted one refuse again
    fitted.load_state_dict(Stitcher("linear", 4, 3, input_norm=kind).state_dict())
    with pytest.raises(RuntimeError, match="before being fitted"):
        fitted(torch.randn(2, 4))


def test_none_norm_is_identity_without_fitting():
    x = torch.randn(5, 4)
    assert torch.equal(FeatureNorm(4, "none")(x), x)


# ---------------------------------------------------------------- Stitcher


@pytest.mark.parametrize("name", STITCHERS.names())
def test_config_and_state_dict_rebuild_identical_stitcher(name):
    s = _fitted_stitcher(name)
    config = json.loads(json.dumps(s.config()))  # must survive a plain-JSON round trip
    assert config["name"] == name and config["in_dim"] == 12 and config["out_dim"] == 7

    rebuilt = Stitcher(**config)
    rebuilt.load_state_dict(s.state_dict(), strict=True)
    rebuilt.eval()
    x = torch.randn(8, 12)
    assert torch.equal(rebuilt(x), s(x))
    assert torch.equal(rebuilt.input_norm.scale, s.input_norm.scale)
    assert torch.equal(rebuilt.output_norm.mean, s.output_norm.mean)


@pytest.mark.parametrize("name", STITCHERS.names())
def test_checkpoint_alone_rebuilds_stitcher(name):
    s = _fitted_stitcher(name, seed=5)
    buffer = io.BytesIO()
    torch.save(s.checkpoint(), buffer)
    buffer.seek(0)
    loaded = Stitcher.from_checkpoint(torch.load(buffer, weights_only=True)).eval()
    x = torch.randn(4, 12)
    assert torch.equal(loaded(x), s(x))


@pytest.mark.parametrize("name", STITCHERS.names())
def test_forward_shape_and_dim_mismatch_error(name):
    s = Stitcher(name, 20, 6, **CORE_OPTIONS.get(name, {}))
    assert s(torch.randn(5, 20)).shape == (5, 6)
    assert s(torch.randn(2, 3, 20)).shape == (2, 3, 6)
    with pytest.raises(ValueError, match="expects 20-d source features, got 6-d"):
        s(torch.randn(5, 6))


def test_dim_mismatch_message_points_at_the_encoder():
    s = build_stitcher("linear", 1280, 384)
    with pytest.raises(ValueError, match="expects 1280-d source features, got 384-d.*check the source encoder/layer"):
        s(torch.randn(2, 384))


def test_output_lives_in_target_space():
    # A core that predicts 0 (the normalised target mean) must come out as the target's raw mean.
    target = _features(100, 5, seed=6, loc=10.0)
    s = build_stitcher("affine", 3, 5, output_norm="standard").fit_normalization(None, target)
    torch.nn.init.zeros_(s.core.weight)
    torch.nn.init.zeros_(s.core.bias)
    out = s(torch.randn(4, 3))
    torch.testing.assert_close(out, target.mean(0).expand(4, 5))


def test_linear_and_affine_cores_accept_assigned_weights():
    # What a closed-form (ridge/Procrustes) fit will do: write weight (out x in) and bias.
    w, b = torch.randn(4, 6), torch.randn(4)
    x = torch.randn(3, 6)
    lin = build_stitcher("linear", 6, 4)
    assert lin.core.weight.shape == (4, 6) and lin.core.bias is None
    aff = build_stitcher("affine", 6, 4)
    with torch.no_grad():
        lin.core.weight.copy_(w)
        aff.core.weight.copy_(w)
        aff.core.bias.copy_(b)
    torch.testing.assert_close(lin(x), x @ w.T)
    torch.testing.assert_close(aff(x), x @ w.T + b)


def test_lowrank_validates_rank_and_limits_it():
    with pytest.raises(ValueError, match="rank must be in \\[1, min\\(in_dim, out_dim\\)\\] = \\[1, 4\\].*got 0"):
        build_stitcher("lowrank", 10, 4, rank=0)
    with pytest.raises(ValueError, match="got 5"):
        build_stitcher("lowrank", 10, 4, rank=5)
    with pytest.raises(ValueError, match="missing required \\['rank'\\]"):
        build_stitcher("lowrank", 10, 4)

    s = build_stitcher("lowrank", 10, 8, rank=2, bias=False)
    effective = s(torch.eye(10))  # rows = images of the basis vectors = the map's matrix
    assert torch.linalg.matrix_rank(effective) == 2
    assert s(torch.zeros(1, 10)).abs().max() == 0  # linear, no hidden nonlinearity or bias
    assert build_stitcher("lowrank", 10, 4, rank=4).config()["rank"] == 4


def test_mlp_options_and_defaults_are_recorded():
    s = build_stitcher("mlp", 8, 3)
    assert s.config()["hidden_dim"] == 1024 and s.config()["dropout"] == 0.0
    assert s.core.fc1.out_features == 1024
    # None means "use the default", as for a key left empty in a config file
    assert build_stitcher("mlp", 8, 3, hidden_dim=None).config()["hidden_dim"] == 1024

    s = build_stitcher("mlp", 8, 3, hidden_dim=32, dropout=0.5)
    x = torch.randn(64, 8)
    s.train()
    assert not torch.equal(s(x), s(x))  # dropout active in training
    s.eval()
    assert torch.equal(s(x), s(x))
    with pytest.raises(ValueError, match="dropout must be in \\[0, 1\\)"):
        build_stitcher("mlp", 8, 3, dropout=1.0)


def test_build_stitcher_rejects_unknown_names_dims_and_options():
    with pytest.raises(ValueError, match="unknown stitcher 'linera'.*Did you mean 'linear'"):
        build_stitcher("linera", 4, 4)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="in_dim must be an integer >= 1"):
            build_stitcher("linear", bad, 4)
    with pytest.raises(ValueError, match="out_dim must be an integer >= 1"):
        build_stitcher("affine", 4, 0)
    with pytest.raises(ValueError, match="unexpected \\['hiden_dim'\\]; it accepts \\['dropout', 'hidden_dim'\\]"):
        build_stitcher("mlp", 4, 4, hiden_dim=8)
    with pytest.raises(ValueError, match="unexpected \\['rank'\\]; it accepts no options"):
        build_stitcher("linear", 4, 4, rank=2)
    with pytest.raises(ValueError, match="not a plain JSON value"):
        build_stitcher("mlp", 4, 4, dropout=torch.tensor(0.1))


def test_linear_stitcher_learns_planted_map():
    torch.manual_seed(0)
    x = torch.randn(512, 32)
    w = torch.randn(32, 16) / 32**0.5
    y = x @ w
    s = build_stitcher("linear", 32, 16, input_norm="standard", output_norm="standard")
    s.fit_normalization(x, y)
    opt = torch.optim.Adam(s.parameters(), lr=3e-2)
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(s(x), y)
        loss.backward()
        opt.step()
    x_new = torch.randn(256, 32)  # held out: the map, not the samples, must have been learned
    with torch.no_grad():
        relative_error = (s(x_new) - x_new @ w).square().mean() / (x_new @ w).square().mean()
    assert relative_error < 1e-6
