"""Closed-form stitchers against planted answers and NumPy references written here."""

import os
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from prh_stitch.closed_form import GAIN_GRID, WHITEN_GRID, NormalEquations, check_ridge_grid, fit_closed_form
from prh_stitch.metrics import retrieval
from prh_stitch.stitchers import Stitcher


def _features(n, d, seed, spread=None):
    g = torch.Generator().manual_seed(seed)
    scales = spread if spread is not None else torch.logspace(0, -1, d)  # an uneven spectrum, like real features
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scales + 0.5).float()


def _orthogonal(d, seed):
    q, r = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def _stitcher(name, x, y, input_norm="none", output_norm="none"):
    return Stitcher(name, x.shape[1], y.shape[1], input_norm, output_norm).fit_normalization(x, y)


def test_a_random_rotation_is_recovered_by_procrustes_and_least_squares():
    x = _features(500, 32, 0)
    q = _orthogonal(32, 1)
    y = x @ q
    for method in ("procrustes", "lstsq"):
        s = _stitcher("linear", x, y)
        fit_closed_form(s, (x, y), method)
        assert (s.core.weight.T - q).abs().max() < 1e-4, method
        torch.testing.assert_close(s(x), y, atol=1e-4, rtol=1e-4)
    # With an affine core, centring and a planted offset and isotropic scale.
    y2 = 2.5 * x @ q + torch.linspace(-1, 1, 32)
    s = _stitcher("affine", x, y2)
    result = fit_closed_form(s, (x, y2), "procrustes", scaling="isotropic")
    assert result.method == "procrustes" and result.scaling == "isotropic"
    torch.testing.assert_close(s.core.weight.T, 2.5 * q, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s.core.bias, torch.linspace(-1, 1, 32), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dx, dy", [(24, 10), (10, 24)])
def test_unequal_widths_recover_a_semi_orthogonal_map(dx, dy):
    x = _features(400, dx, 2)
    full = _orthogonal(max(dx, dy), 3)
    planted = full[:dx, :dy]  # orthonormal columns (dx > dy) or rows (dx < dy)
    y = x @ planted
    s = _stitcher("linear", x, y)
    fit_closed_form(s, (x, y), "procrustes")
    w = s.core.weight.detach().T.double()
    gram = w.T @ w if dx >= dy else w @ w.T
    torch.testing.assert_close(gram, torch.eye(min(dx, dy), dtype=torch.float64), atol=1e-5, rtol=0)
    if dx <= dy:  # ||XW|| = ||X|| for orthonormal rows: least squares and Procrustes agree, the map comes back
        torch.testing.assert_close(s.core.weight.T, planted, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(s(x), y, atol=1e-4, rtol=1e-4)
    else:  # zero-pad / rotate / crop: the semi-orthogonal map maximising tr(W^T X^T Y) = nuclear norm of X^T Y
        xty = x.double().numpy().T @ y.double().numpy()
        achieved = np.trace(w.numpy().T @ xty)
        np.testing.assert_allclose(achieved, np.linalg.norm(xty, ord="nuc"), rtol=1e-6)
        assert achieved >= np.trace(planted.double().numpy().T @ xty) - 1e-6


def _numpy_ridge(x, y, lam, input_norm, bias):
    x, y = x.double().numpy(), y.double().numpy()
    mu, sd = (x.mean(0), x.std(0)) if input_norm == "standard" else (0.0, 1.0)
    x = (x - mu) / sd
    if bias:
        xc, yc = x - x.mean(0), y - y.mean(0)
    else:
        xc, yc = x, y
    n, d = xc.shape
    gram = xc.T @ xc / n
    tau = np.trace(gram) / d
    w = np.linalg.solve(gram + lam * tau * np.eye(d), xc.T @ yc / n)
    b = y.mean(0) - x.mean(0) @ w if bias else np.zeros(y.shape[1])
    return lambda q: (q.double().numpy() - mu) / sd @ w + b


@pytest.mark.parametrize("name, input_norm", [("linear", "none"), ("affine", "standard"), ("linear", "standard")])
def test_ridge_equals_the_numpy_normal_equations(name, input_norm):
    x, noise = _features(300, 20, 4), _features(300, 7, 5)
    y = x @ torch.randn(20, 7, generator=torch.Generator().manual_seed(6)) + noise
    s = _stitcher(name, x, y, input_norm=input_norm)
    result = fit_closed_form(s, (x, y), "ridge", ridge=0.3)
    assert result.ridge == 0.3
    expected = _numpy_ridge(x, y, 0.3, input_norm, bias=(name == "affine"))(x)
    np.testing.assert_allclose(s(x).double().detach().numpy(), expected, atol=1e-4)


def test_streaming_over_shards_and_merging_equal_one_shot():
    x, y = _features(1000, 16, 7), _features(1000, 6, 8)
    one_shot = NormalEquations(16, 6).update(x, y)
    streamed = NormalEquations.from_pairs(zip(x.split(97), y.split(97)))
    merged = NormalEquations(16, 6).update(x[:400], y[:400]).merge(NormalEquations(16, 6).update(x[400:], y[400:]))
    for other in (streamed, merged):
        assert other.n == 1000
        for a, b in zip(one_shot._tensors(), other._tensors()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-9)
    # And the fitted maps agree.
    a, b = _stitcher("affine", x, y, "standard"), _stitcher("affine", x, y, "standard")
    fit_closed_form(a, (x, y), "ridge", ridge=1e-2, chunk_rows=10_000)
    fit_closed_form(b, zip(x.split(33), y.split(33)), "ridge", ridge=1e-2)
    torch.testing.assert_close(a.core.weight, b.core.weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.core.bias, b.core.bias, atol=1e-6, rtol=1e-6)


def _ddp_worker(rank, world, rendezvous, path):
    # File-based rendezvous: no port is picked, so nothing can take it between picking and binding.
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        x, y = _features(600, 12, 9), _features(600, 5, 10)
        x, y = x[rank::world], y[rank::world]  # each process sees only its shard
        s = Stitcher("affine", 12, 5)
        fit_closed_form(s, (x, y), "ridge", ridge=0.05, distributed=True)
        torch.save({k: v.clone() for k, v in s.state_dict().items()}, f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_all_reduce_equals_one_process(tmp_path):
    path = str(tmp_path)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rendezvous"), path), nprocs=2, join=True)
    x, y = _features(600, 12, 9), _features(600, 5, 10)
    single = Stitcher("affine", 12, 5)
    fit_closed_form(single, (x, y), "ridge", ridge=0.05)
    for rank in range(2):  # every rank ends with the one-process fit, not only rank 0
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(state["core.weight"], single.core.weight, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(state["core.bias"], single.core.bias, atol=1e-6, rtol=1e-6)


def test_grid_choice_is_the_best_held_out_recall():
    g = torch.Generator().manual_seed(11)
    x = _features(700, 40, 12)
    y = x @ torch.randn(40, 16, generator=g) + 4.0 * torch.randn(700, 16, generator=g)  # noisy: ridge matters
    train, val = (x[:200], y[:200]), (x[200:], y[200:])
    grid = [1e-4, 1e-2, 1.0, 100.0]
    s = _stitcher("affine", *train, input_norm="standard")
    # The ridge grid alone (no retrieval tuning on top): the chosen weight is the plain ridge's at that strength.
    result = fit_closed_form(s, train, "ridge", ridge_grid=grid, val=val, gain=None, whiten=None)
    scores = {}
    for lam in grid:  # reference: fit each value alone and score it with the metric itself
        alone = _stitcher("affine", *train, input_norm="standard")
        fit_closed_form(alone, train, "ridge", ridge=lam)
        with torch.no_grad():
            scores[lam] = retrieval(alone(val[0]), val[1], ks=(1,))["a2b/recall@1"]
    assert result.scores == {repr(k): v for k, v in scores.items()}
    assert scores[result.ridge] == max(scores.values())
    chosen = _stitcher("affine", *train, input_norm="standard")
    fit_closed_form(chosen, train, "ridge", ridge=result.ridge)
    torch.testing.assert_close(s.core.weight, chosen.core.weight)
    mse = fit_closed_form(_stitcher("affine", *train), train, "ridge", ridge_grid=grid, val=val, select_by="mse")
    assert mse.select_by == "mse" and min(mse.scores.values()) == mse.scores[repr(mse.ridge)]


def test_rank_deficient_least_squares_warns_and_falls_back_to_ridge():
    x = _features(200, 8, 13)
    x = torch.cat([x, x[:, :3]], 1)  # duplicated features: X^T X is singular
    y = x[:, :5] * 2.0
    s = _stitcher("affine", x, y)
    with pytest.warns(RuntimeWarning, match="rank-deficient.*falling back to ridge"):
        result = fit_closed_form(s, (x, y), "lstsq")
    assert result.rank_deficient and result.ridge > 0
    assert torch.isfinite(s.core.weight).all()
    torch.testing.assert_close(s(x), y, atol=1e-3, rtol=1e-3)
    with warnings.catch_warnings():  # a well-posed problem stays silent
        warnings.simplefilter("error")
        fit_closed_form(_stitcher("affine", x[:, :8], y), (x[:, :8], y), "lstsq")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "ridge", "ridge_grid": []}, "ridge_grid is empty"),
        ({"method": "ridge", "ridge_grid": [0.0, -1.0]}, r"finite and > 0.*\[0.0, -1.0\]"),
        ({"method": "ridge", "ridge_grid": [float("nan")]}, "finite and > 0"),
        ({"method": "ridge", "ridge_grid": "abc"}, "list of numbers"),
        ({"method": "ridge", "ridge_grid": [1.0, 2.0]}, "needs held-out features"),
        ({"method": "cholesky"}, "unknown closed-form method 'cholesky'"),
        ({"method": "procrustes", "scaling": "anisotropic"}, "unknown Procrustes scaling"),
        ({"method": "procrustes", "center": True}, "needs somewhere to put the offset"),
    ],
)
def test_bad_options_are_clear_errors(kwargs, message):
    x, y = _features(50, 6, 14), _features(50, 4, 15)
    with pytest.raises(ValueError, match=message):
        fit_closed_form(_stitcher("linear", x, y), (x, y), **kwargs)


def test_unsupported_stitchers_and_unfitted_norms_are_refused():
    x, y = _features(50, 6, 16), _features(50, 4, 17)
    with pytest.raises(ValueError, match="use stitcher 'linear' or 'affine'"):
        fit_closed_form(Stitcher("mlp", 6, 4, hidden_dim=8), (x, y))
    with pytest.raises(ValueError, match="input normalization .* is not fitted"):
        fit_closed_form(Stitcher("linear", 6, 4, input_norm="standard"), (x, y), ridge=1.0)
    with pytest.raises(ValueError, match="features are 6-d -> 4-d but the stitcher maps 6-d -> 3-d"):
        fit_closed_form(Stitcher("linear", 6, 3), (x, y), ridge=1.0)
    assert check_ridge_grid([1.0, 0.1, 1.0]) == (0.1, 1.0)


# ---- the closed forms inside train.py ---------------------------------------------------------------------------

TINY = str(REPO / "configs" / "tiny.yaml") if (REPO := __import__("pathlib").Path(__file__).resolve().parents[1]) else ""


def _tiny(root, *extra):
    return ["--config", TINY, "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", *extra]


def test_closed_form_run_validates_once_and_writes_ordinary_checkpoints(tmp_path):
    import prh_stitch
    from prh_stitch.cli import build_cli, fit

    cli = build_cli(_tiny(tmp_path, "--model.stitcher.fit", "ridge", "--model.stitcher.name", "affine",
                          "--trainer.max_epochs=5"))
    fit(cli)
    assert cli.trainer.current_epoch == 1 and cli.trainer.global_step == 1  # one epoch, one "step": the solve
    names = {p.name for p in tmp_path.glob("**/*.ckpt")}
    assert "last.ckpt" in names and any(n.startswith("best-") for n in names)
    logged = cli.trainer.logged_metrics  # train.py tested the selected checkpoint last: these are test/* scores
    meta = torch.load(next(tmp_path.glob("**/last.ckpt")), weights_only=True)["prh_stitch"]["fit"]
    # The checkpoint's stitcher is exactly the direct closed-form fit of the same features.
    dm = cli.datamodule
    source, target = dm.training_tensors()
    vs, vt, _, vg = dm.datasets["val"].tensors
    direct = Stitcher("affine", source.shape[1], target.shape[1], "standard").fit_normalization(source, target)
    result = fit_closed_form(direct, (source, target), "ridge", val=(vs, vt), val_groups=vg)
    assert meta["closed_form"]["ridge"] == pytest.approx(result.ridge, rel=1e-6)
    loaded = prh_stitch.load_stitcher(next(tmp_path.glob("**/last.ckpt")))
    with torch.no_grad():
        torch.testing.assert_close(loaded(vs), direct(vs), atol=1e-5, rtol=1e-5)
        r1 = retrieval(loaded(vs), vt, groups=vg)["a2b/recall@1"]
    assert float(cli.trainer.checkpoint_callback.best_model_score) == pytest.approx(r1, abs=1e-6)  # val/recall@1
    ts, tt, _, tg = dm.datasets["test"].tensors
    with torch.no_grad():
        assert float(logged["test/recall@1"]) == pytest.approx(retrieval(loaded(ts), tt, groups=tg)["a2b/recall@1"],
                                                               abs=1e-6)
    assert meta["method"] == "ridge" and meta["closed_form"]["ridge"] == result.ridge


def test_closed_form_initialises_gradient_training(tmp_path):
    from pytorch_lightning import Callback

    from prh_stitch.cli import build_cli, fit

    class StartingWeights(Callback):
        def on_train_start(self, trainer, pl_module):  # after setup(), before the first gradient step
            self.weight = pl_module.stitcher.core.weight.detach().clone()

    cli = build_cli(_tiny(tmp_path, "--model.stitcher.init", "procrustes", "--model.stitcher.closed_form",
                          "{scaling: isotropic}", "--model.objective.name", "mse", "--trainer.max_epochs=1"))
    start = StartingWeights()
    cli.trainer.callbacks.append(start)
    fit(cli)
    source, target = cli.datamodule.training_tensors()
    direct = Stitcher("linear", source.shape[1], target.shape[1], "standard").fit_normalization(source, target)
    fit_closed_form(direct, (source, target), "procrustes", scaling="isotropic")
    torch.testing.assert_close(start.weight, direct.core.weight)
    assert cli.trainer.global_step == len(cli.datamodule.train_dataloader())  # then ordinary gradient steps
    assert not torch.equal(cli.model.stitcher.core.weight, direct.core.weight)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """One feature store for both runs of each fit below: the encoders run once."""
    return tmp_path_factory.mktemp("closed_form_cache")


@pytest.mark.parametrize("method", ["ridge", "lstsq"])
def test_closed_form_fit_under_two_process_ddp_equals_one_process(tmp_path, tiny_cache, method):
    """train.py with fit: ridge / lstsq on 2 CPU processes (gloo) writes the stitcher of a 1-process run.

    Under DDP each rank accumulates the float64 normal equations of its strided half of the training rows and the
    sums are all-reduced; one process sums all rows at once. Only the order of the float64 additions differs
    (~n·2⁻⁵³ ≈ 3e-14 relative in the moments at n = 256). The solve amplifies that by up to the condition number
    of the regularised Gram matrix: ~4e7 for lstsq here (the tiny encoder's 64 features are rank-deficient, so
    lstsq falls back to a 1e-6 relative ridge); measured, the float64 weights then differ by 4e-10 of max|W|, far
    below the float32 rounding of the stored weights (2⁻²⁴ ≈ 6e-8 relative). So the float32 weights may differ by
    about one ulp (observed: at most one), and rtol = 1e-6, atol = 1e-6 · max|W| (~16 ulps) is tight: a fit from
    one rank's half of the rows (no all-reduce) moves them by more than max|W| here. The normalisations are fitted
    from the same full tensors on every rank: bit for bit.
    """
    import subprocess
    import sys

    from prh_stitch.cli import build_cli, fit

    fit_args = ["--model.stitcher.fit", method, "--data.cache_dir", str(tiny_cache), "--trainer.accelerator=cpu"]
    env = {**os.environ, "PRH_STITCH_CACHE": str(tiny_cache), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, str(REPO / "train.py"),
                             *_tiny(tmp_path / "ddp", *fit_args, "--trainer.devices=2", "--trainer.strategy=ddp")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # lstsq's rank-deficiency warning, expected here
        fit(build_cli(_tiny(tmp_path / "one", *fit_args, "--trainer.devices=1")))
    ddp, one = (torch.load(next((tmp_path / run).glob("**/last.ckpt")), map_location="cpu", weights_only=True)
                for run in ("ddp", "one"))
    stitcher = {k: v for k, v in one["state_dict"].items() if k.startswith("stitcher.")}
    assert set(stitcher) == {k for k in ddp["state_dict"] if k.startswith("stitcher.")}
    for key, value in stitcher.items():
        if key == "stitcher.core.weight":
            assert value.abs().max() > 0
            torch.testing.assert_close(ddp["state_dict"][key], value, rtol=1e-6, atol=1e-6 * float(value.abs().max()))
        else:  # the input/output normalisation buffers
            assert torch.equal(ddp["state_dict"][key], value), key
    # The same fit was chosen and made from all 256 training rows (not one rank's half), and the same held-out
    # recall@1 validated it: every rank held the same weights while validating its share of the rows.
    fit_ddp, fit_one = ddp["prh_stitch"]["fit"]["closed_form"], one["prh_stitch"]["fit"]["closed_form"]
    assert fit_ddp["n_train"] == fit_one["n_train"] == 256
    for key in ("method", "ridge", "gain", "whiten", "rank_deficient", "scores", "tuning_scores"):
        assert fit_ddp[key] == fit_one[key], key
    score = {name: next(v["best_model_score"] for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint"))
             for name, ckpt in (("ddp", ddp), ("one", one))}
    assert float(score["ddp"]) == pytest.approx(float(score["one"]), abs=1e-6)
    assert ddp["global_step"] == one["global_step"] == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model.stitcher.fit", "cholesky"], "unknown stitcher fit 'cholesky'"),
        (["--model.stitcher.fit", "ridge", "--model.stitcher.name", "mlp"], "need stitcher 'linear' or 'affine'"),
        (["--model.stitcher.fit", "ridge", "--model.stitcher.closed_form", "{ridge_grid: []}"], "ridge_grid is empty"),
        (["--model.stitcher.fit", "ridge", "--model.stitcher.closed_form", "{ridge_grid: [0, -1]}"],
         "must be finite and > 0"),
        (["--model.stitcher.fit", "ridge", "--model.stitcher.init", "ridge"], "applies to fit 'gradient' only"),
        (["--model.stitcher.closed_form", "{ridge: 1.0}"], "neither fit nor init is a closed form"),
        (["--model.stitcher.fit", "ridge", "--model.stitcher.closed_form", "{ridg: 1.0}"],
         r"unknown closed_form option\(s\) \['ridg'\]"),
    ],
)
def test_bad_closed_form_config_is_one_clear_error(tmp_path, capsys, extra, message):
    from prh_stitch.cli import main

    assert main(_tiny(tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert __import__("re").search(message, err) and "Traceback" not in err
    assert not list(tmp_path.glob("**/*.ckpt"))


def test_mixed_precision_moments_match_float64():
    x = _features(3000, 40, 18) * 5 + 20  # large means: where careless float32 sums would cancel
    y = _features(3000, 9, 19) - 7
    exact = NormalEquations.from_pairs((x, y), chunk_rows=700)
    mixed = NormalEquations.from_pairs((x, y), chunk_rows=700, precision="mixed")
    ones = torch.ones(40, dtype=torch.float64)
    for center in (True, False):
        a = exact.moments(torch.zeros(40), ones, torch.zeros(9), torch.ones(9), center)
        b = mixed.moments(torch.zeros(40), ones, torch.zeros(9), torch.ones(9), center)
        scale = a.xx.diagonal().max()
        assert (a.xx - b.xx).abs().max() / scale < 1e-6 and (a.xy - b.xy).abs().max() / scale < 1e-6
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        NormalEquations(3, 2, precision="half")


# ---- retrieval tuning of the ridge fit: deviation gain and target whitening --------------------------------------

def _shared_mean_pairs(n, seed, noise, dx=32, dy=16, latent=8, mean=30.0):
    """A shared latent seen by both sides; the targets sit on a large common mean (all cosines near 1)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(latent, dx, generator=g), torch.randn(latent, dy, generator=g)
    h = torch.Generator().manual_seed(seed)
    z = torch.randn(n, latent, generator=h)
    return z @ a + noise * torch.randn(n, dx, generator=h), mean + z @ b + noise * torch.randn(n, dy, generator=h)


def _r1(stitcher, pairs):
    with torch.no_grad():
        return retrieval(stitcher(pairs[0]), pairs[1], ks=(1,))["a2b/recall@1"]


def test_gain_one_is_the_plain_ridge_bit_for_bit():
    train, val = _shared_mean_pairs(600, 1, 2.0), _shared_mean_pairs(300, 2, 2.0)
    plain = _stitcher("affine", *train, "standard")
    fit_closed_form(plain, train, "ridge", ridge=1e-2)  # no held-out features: nothing to tune, the plain fit
    for kwargs in ({"gain": 1.0, "whiten": None}, {"gain": None, "whiten": None}):
        s = _stitcher("affine", *train, "standard")
        result = fit_closed_form(s, train, "ridge", ridge=1e-2, val=val, **kwargs)
        assert result.gain == 1.0 and result.whiten is None and not result.tuning_scores
        assert torch.equal(s.core.weight, plain.core.weight) and torch.equal(s.core.bias, plain.core.bias)
    # select_by="mse" judges by squared error, which the plain ridge already minimises: "auto" leaves it alone.
    s = _stitcher("affine", *train, "standard")
    fit_closed_form(s, train, "ridge", ridge_grid=[1e-2], val=val, select_by="mse")
    assert torch.equal(s.core.weight, plain.core.weight)


def test_gain_on_a_large_shared_target_mean_retrieves_better_exactly_as_the_formula_says():
    train, val, test = (_shared_mean_pairs(n, seed, 2.0) for n, seed in ((1500, 1), (1000, 2), (1000, 3)))
    plain = _stitcher("affine", *train, "standard")
    fit_closed_form(plain, train, "ridge", ridge=1e-3, gain=None, whiten=None)
    s = _stitcher("affine", *train, "standard")
    result = fit_closed_form(s, train, "ridge", ridge=1e-3, val=val, whiten=None)  # gain="auto"
    # Reference: the formula y = ȳ + g·(x' − x̄')W written by hand for every grid gain, scored by the metric itself.
    w, b = plain.core.weight.detach().double(), plain.core.bias.detach().double()
    xbar = plain.input_norm(train[0]).double().mean(0)
    ybar = train[1].double().mean(0)
    reference = {}
    for gain in GAIN_GRID:
        ref = _stitcher("affine", *train, "standard")
        with torch.no_grad():
            ref.core.weight.copy_(gain * w)
            ref.core.bias.copy_(ybar - gain * (xbar @ w.T))
            pred = ref(val[0])
        reference[gain] = (_r1(ref, val), float((pred.double() - val[1].double()).square().mean()))
    best = min(reference, key=lambda g: (-reference[g][0], reference[g][1]))
    assert result.gain == best > 1.0  # the MSE fit's deviations are too timid for cosine ranking here
    assert result.tuning_scores == {f"whiten=None,gain={g!r}": r for g, (r, _) in reference.items()}
    torch.testing.assert_close(s.core.weight.double(), best * w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.core.bias.double(), ybar - best * (xbar @ w.T), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(b, ybar - xbar @ w.T, atol=1e-4, rtol=1e-5)  # g = 1: the ridge's own intercept
    assert _r1(s, test) > _r1(plain, test)  # and it holds on unseen pairs


def test_target_whitening_lets_a_linear_core_retrieve_and_matches_its_formula():
    # A linear core on centred inputs cannot output the targets' shared mean; the plain ridge's ranking is then
    # dominated by the highest-variance target directions, the whitened (CCA-like) one weighs them all.
    train, val, test = (_shared_mean_pairs(n, seed, 0.3) for n, seed in ((1500, 1), (1000, 2), (1000, 3)))
    plain = _stitcher("linear", *train, "standard")
    fit_closed_form(plain, train, "ridge", ridge=1e-3, gain=None, whiten=None)
    s = _stitcher("linear", *train, "standard")
    result = fit_closed_form(s, train, "ridge", ridge=1e-3, val=val)
    assert result.whiten in WHITEN_GRID and result.whiten is not None and result.gain in GAIN_GRID
    assert _r1(s, test) > _r1(plain, test) + 0.05
    # numpy reference: g·κ·W(C + w·τ·I)⁻¹ with C the target covariance, τ its mean eigenvalue, κ the spread restorer
    w = plain.core.weight.detach().double().numpy().T
    xs = plain.input_norm(train[0]).double().numpy()
    y = train[1].double().numpy()
    cov = np.cov(y.T, bias=True)
    t = np.linalg.inv(cov + result.whiten * np.trace(cov) / len(cov) * np.eye(len(cov)))
    spread = lambda m: np.trace(m.T @ (xs.T @ xs / len(xs)) @ m)  # noqa: E731
    expected = result.gain * w @ t * np.sqrt(spread(w) / spread(w @ t))
    np.testing.assert_allclose(s.core.weight.detach().double().numpy().T, expected, rtol=1e-4,
                               atol=1e-6 * np.abs(expected).max())


def test_fixed_gain_and_whitening_need_no_held_out_features():
    train = _shared_mean_pairs(400, 1, 1.0)
    plain, s = _stitcher("affine", *train, "standard"), _stitcher("affine", *train, "standard")
    fit_closed_form(plain, train, "ridge", ridge=0.1)
    result = fit_closed_form(s, train, "ridge", ridge=0.1, gain=3.0)
    assert (result.gain, result.whiten) == (3.0, None)
    torch.testing.assert_close(s.core.weight, 3.0 * plain.core.weight)
    with torch.no_grad():  # the mean source still maps to the mean target: only the deviations grow
        xbar = train[0].mean(0, keepdim=True)
        torch.testing.assert_close(s(xbar), plain(xbar), atol=1e-3, rtol=1e-5)


def test_mixed_precision_target_gram_matches_float64():
    x, y = _features(2000, 10, 20) * 3 + 9, _features(2000, 12, 21) - 40
    exact = NormalEquations.from_pairs((x, y), chunk_rows=600)
    mixed = NormalEquations.from_pairs((x, y), chunk_rows=600, precision="mixed")
    torch.testing.assert_close(mixed.yty, exact.yty, rtol=1e-9, atol=0)
    torch.testing.assert_close(exact.yty, y.double().T @ y.double(), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"gain": 0.0}, "gain must be 'auto', a finite number > 0"),
        ({"gain": -2.0}, "gain must be 'auto'"),
        ({"gain": "big"}, r"gain must be .*got 'big'"),
        ({"gain": float("inf")}, "gain must be"),
        ({"whiten": -1e-3}, "whiten must be 'auto', null"),
        ({"whiten": "full"}, r"whiten must be .*got 'full'"),
        ({"method": "procrustes", "gain": 2.0}, "method 'procrustes' takes neither"),
        ({"method": "lstsq", "whiten": 1e-2}, "method 'lstsq' takes neither"),
    ],
)
def test_bad_gain_or_whiten_is_a_clear_error(kwargs, message):
    x, y = _features(50, 6, 22), _features(50, 4, 23)
    kwargs = {"method": "ridge", "ridge": 1.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        fit_closed_form(_stitcher("linear", x, y), (x, y), **kwargs)
