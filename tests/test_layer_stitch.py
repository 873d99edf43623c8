"""Layer-to-layer stitching: surgery, the stitching layer and its least-squares start, the cache, learning, the sweep.

Every number is checked against an independent computation in the test (forward hooks on the whole network, numpy
least squares), never against the code under test.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F

from prh_stitch.encoders import build_encoder
from prh_stitch.encoders.timm_backend import TimmEncoder
from prh_stitch.layer_stitch import (
    LayerStitchDataModule, LayerStitchingModule, StitchLayer, SweepReport, layer_sweep, run_from, run_until,
)
from prh_stitch.layer_stitch.cache import ActivationCache
from prh_stitch.layer_stitch.surgery import require_timm

REPO = Path(__file__).resolve().parents[1]


def _timm(name, **kwargs):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, **kwargs)
    return TimmEncoder(name, model=model)


@pytest.fixture(scope="module")
def encoders():
    return {"tiny_resnet": build_encoder("tiny_resnet", True, None, {}),
            "tiny_vit": build_encoder("tiny_vit", True, None, {}),
            "test_efficientnet": _timm("test_efficientnet"),
            "vit_without_class_token": _timm("test_vit", class_token=False, global_pool="avg")}


def _hooked_output(encoder, name, images):
    """The output of module ``name`` in a plain full forward pass (the reference for ``run_until``)."""
    captured = {}
    handle = encoder.model.get_submodule(name).register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    try:
        encoder.model(images)
    finally:
        handle.remove()
    return captured["out"]


def _forward_with_replaced(encoder, name, replacement, images):
    """Logits of the whole network with module ``name``'s output replaced (the reference for ``run_from``)."""
    handle = encoder.model.get_submodule(name).register_forward_hook(lambda m, i, o: replacement)
    try:
        return encoder.model(images)
    finally:
        handle.remove()


# ---- surgery ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_vit", "test_efficientnet", "vit_without_class_token"])
def test_run_until_and_run_from_match_hooks_on_the_whole_network(encoders, name):
    encoder = encoders[name]
    size = encoder.data_config["input_size"][-1] if "vit" in name else 64  # the ViT takes only its own size
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = encoder.model(images)
        for index, layer in enumerate(encoder.layer_names[:-1]):
            hidden = run_until(encoder, layer, images)
            torch.testing.assert_close(hidden, _hooked_output(encoder, layer, images))
            assert run_until(encoder, index - len(encoder.layer_names), images).shape == hidden.shape
            torch.testing.assert_close(run_from(encoder, layer, hidden), expected, atol=1e-5, rtol=1e-5)
            other = hidden.flip(0)  # another image's activation: B must continue from what it is given
            torch.testing.assert_close(run_from(encoder, layer, other),
                                       _forward_with_replaced(encoder, layer, other, images), atol=1e-5, rtol=1e-5)
        features = encoder.model.forward_head(encoder.model.forward_features(images), pre_logits=True)
        torch.testing.assert_close(run_until(encoder, "pre_logits", images), features)
        torch.testing.assert_close(run_from(encoder, -1, features), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(run_from(encoder, "pre_logits", features, pre_logits=True), features)
        hidden = run_until(encoder, 1, images)
        torch.testing.assert_close(run_from(encoder, 1, hidden, pre_logits=True), features, atol=1e-5, rtol=1e-5)


def test_unsupported_architectures_and_encoders_are_refused(encoders):
    convnext = _timm("test_convnext")
    for call in (lambda: run_from(convnext, 0, torch.zeros(1)), lambda: run_until(convnext, 0, torch.zeros(1)),
                 lambda: require_timm(convnext, "A")):
        with pytest.raises(ValueError, match="supports timm EfficientNet, ResNet and VisionTransformer models; ConvNeXt is not"):
            call()
    with pytest.raises(ValueError, match=r"^model B \('minilm'\) is not a timm vision network"):
        require_timm(type("Text", (), {"name": "minilm"})(), "B")
    assert require_timm(encoders["tiny_vit"], "A") is encoders["tiny_vit"]


# ---- the stitching layer ---------------------------------------------------------------------------------------------

def test_stitch_layer_resizes_maps_and_identity_init_is_exact():
    layer = StitchLayer((8, 10, 10), (12, 5, 5))
    assert layer(torch.randn(3, 8, 10, 10)).shape == (3, 12, 5, 5) and layer.widths == (8, 12)
    identity = StitchLayer((8, 6, 6), (8, 6, 6), init="identity").eval()
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(identity(x), x)
    for shape in ((5, 16), (16,)):
        x = torch.randn(2, *shape)
        torch.testing.assert_close(StitchLayer(shape, shape, init="identity")(x), x)
    assert StitchLayer((5, 16), (5, 24)).widths == (16, 24)


@pytest.mark.parametrize(
    "in_shape, out_shape, init, message",
    [
        ((8, 4, 4), (5, 16), "default", r"cannot stitch a map of shape \(8, 4, 4\) into a tokens of shape \(5, 16\)"),
        ((1, 2, 3, 4), (1, 2, 3, 4), "default", "cannot stitch a unknown"),
        ((8,), (5, 16), "default", r"cannot stitch a vector of shape \(8,\) into a tokens of shape \(5, 16\)"),
        ((5, 16), (6, 16), "default", "cannot stitch 5 tokens into 6: token sequences must have the same length"),
        ((8,), (8,), "random", "unknown stitch init 'random'; choose one of lstsq, identity, default"),
        ((8, 4, 4), (12, 4, 4), "identity", r"identity init needs equal widths, got 8 -> 12"),
    ],
)
def test_bad_stitch_layers_are_clear_errors(in_shape, out_shape, init, message):
    with pytest.raises(ValueError, match=message):
        StitchLayer(in_shape, out_shape, init)


def _independent_least_squares(x_rows, y_rows, ridge):
    """Ridge regression with intercept, solved by numpy's lstsq on the augmented system [Xc; √(nλτ)·I] W = [Yc; 0]."""
    x, y = x_rows.double().numpy(), y_rows.double().numpy()
    xc, yc = x - x.mean(0), y - y.mean(0)
    tau = (xc ** 2).sum(0).mean() / len(x)
    a = np.vstack([xc, np.sqrt(len(x) * ridge * tau) * np.eye(x.shape[1])])
    b = np.vstack([yc, np.zeros((x.shape[1], y.shape[1]))])
    w = np.linalg.lstsq(a, b, rcond=None)[0]
    return torch.from_numpy(w.T), torch.from_numpy(y.mean(0) - x.mean(0) @ w)


def _correlated(n, shape_in, width_out, seed):
    """Source activations and targets that are an affine map of them plus noise (the map to recover)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape_in, generator=g) * 2 + 0.5
    return x, torch.randn(width_out, shape_in[0] if len(shape_in) == 3 else shape_in[-1], generator=g), g


@pytest.mark.parametrize("ridge", [0.0, 1e-4])
def test_lstsq_init_of_maps_matches_an_independent_least_squares_solution(ridge):
    x, true_w, g = _correlated(12, (6, 8, 8), 5, seed=1)
    resized = F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False)  # B's maps are 4x4
    x_rows = resized.permute(0, 2, 3, 1).reshape(-1, 6)
    y_rows = x_rows @ true_w.T + 0.3 + 0.1 * torch.randn(len(x_rows), 5, generator=g)
    y = y_rows.reshape(12, 4, 4, 5).permute(0, 3, 1, 2)
    layer = StitchLayer((6, 8, 8), (5, 4, 4), init="lstsq")
    layer.init_from_data(x, y, "lstsq", chunk=5)
    weight, bias = _independent_least_squares(x_rows, y_rows, 1e-4)
    if ridge == 0.0:  # the relative ridge is too small to move the solution of well-conditioned data
        weight, bias = _independent_least_squares(x_rows, y_rows, 0.0)
        torch.testing.assert_close(layer.conv.weight[:, :, 0, 0].double(), weight, atol=1e-3, rtol=1e-3)
        return
    torch.testing.assert_close(layer.conv.weight[:, :, 0, 0].double(), weight, atol=1e-5, rtol=1e-5)
    expected = (x_rows.double() @ weight.T + bias).reshape(12, 4, 4, 5).permute(0, 3, 1, 2)
    torch.testing.assert_close(layer.eval()(x).double(), expected, atol=1e-4, rtol=1e-4)
    # Training mode normalises by the batch's own statistics; on the whole source they are the calibrated ones.
    torch.testing.assert_close(layer.train()(x).double(), expected, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("shape_in, width_out", [((7, 6), 4), ((6,), 9)])
def test_lstsq_init_of_tokens_and_vectors_matches_an_independent_least_squares_solution(shape_in, width_out):
    x, true_w, g = _correlated(40, shape_in, width_out, seed=2)
    y = x @ true_w.T - 1.0 + 0.1 * torch.randn(*x.shape[:-1], width_out, generator=g)
    out_shape = (*shape_in[:-1], width_out)
    layer = StitchLayer(shape_in, out_shape, init="lstsq")
    layer.init_from_data(x, y, "lstsq", chunk=7)
    weight, bias = _independent_least_squares(x.reshape(-1, shape_in[-1]), y.reshape(-1, width_out), 1e-4)
    torch.testing.assert_close(layer.linear.weight.double(), weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.linear.bias.double(), bias, atol=1e-5, rtol=1e-5)


def test_identity_data_init_keeps_the_identity_in_both_modes_and_bad_methods_are_refused():
    x = torch.randn(10, 4, 3, 3) * 3 + 2
    layer = StitchLayer((4, 3, 3), (4, 3, 3), init="identity")
    layer.init_from_data(x, None, "identity")
    torch.testing.assert_close(layer.eval()(x), x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.train()(x), x, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown data-dependent init 'default'; choose 'lstsq' or 'identity'"):
        layer.init_from_data(x, None, "default")


def test_precise_batchnorm_makes_eval_mode_compute_the_trained_function():
    x = torch.randn(9, 4, 5, 3) * 2 + 1  # not square: rows are counted over both sides
    layer = StitchLayer((4, 5, 3), (6, 5, 3), init="default")
    with torch.no_grad():
        layer.bn.weight.uniform_(0.5, 2.0)
        layer.bn.bias.uniform_(-1.0, 1.0)
    layer.precise_batchnorm(x, chunk=4)
    z = torch.einsum("oi,bihw->bohw", layer.conv.weight[:, :, 0, 0], x).double()
    torch.testing.assert_close(layer.bn.running_mean, z.mean((0, 2, 3)).float())
    torch.testing.assert_close(layer.bn.running_var, z.var((0, 2, 3), unbiased=False).float())
    torch.testing.assert_close(layer.eval()(x), layer.train()(x), atol=1e-4, rtol=1e-4)
    vector = StitchLayer((4,), (4,), init="identity")
    vector.precise_batchnorm(torch.randn(3, 4))  # nothing to calibrate: no error, no change
    torch.testing.assert_close(vector.linear.weight, torch.eye(4))


# ---- the cache ---------------------------------------------------------------------------------------------------------

def test_cache_computes_once_and_recomputes_damaged_or_foreign_files(tmp_path, caplog):
    calls = []

    def compute(value):
        def run():
            calls.append(value)
            return torch.full((3, 2), value)
        return run

    cache = ActivationCache(tmp_path)
    first = cache.get({"what": "a"}, compute(1.5), torch.float16)
    assert first.dtype == torch.float16 and first.tolist() == [[1.5, 1.5]] * 3
    assert cache.get({"what": "a"}, compute(9.0), torch.float16) is first and calls == [1.5]
    assert ActivationCache(tmp_path).get({"what": "a"}, compute(9.0), torch.float16).tolist() == first.tolist()
    assert calls == [1.5]  # read back from disk
    assert ActivationCache(tmp_path).get({"what": "a", "n": 1}, compute(7.0), torch.float16).tolist() == [[7.0] * 2] * 3
    assert ActivationCache(tmp_path).get({"n": 1, "what": "a"}, compute(8.0), torch.float16).tolist() == [[7.0] * 2] * 3
    assert calls == [1.5, 7.0]  # the same identity written in another key order is the same entry
    path = cache.path({"what": "a"})
    assert path.parent == tmp_path / "layer_stitch" and path.suffix == ".safetensors"
    assert cache.path({"what": "b"}) != path
    assert len(list(path.parent.iterdir())) == 2 and path.exists()  # no temporary file left behind

    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one byte of the tensor changed
    path.write_bytes(bytes(data))
    assert ActivationCache(tmp_path).get({"what": "a"}, compute(2.0), torch.float16).tolist() == [[2.0, 2.0]] * 3
    assert "its contents do not match their checksum" in caplog.text
    cache.get({"what": "b"}, compute(3.0), torch.float32)
    path.write_bytes(cache.path({"what": "b"}).read_bytes())  # another entry's file under this name
    assert ActivationCache(tmp_path).get({"what": "a"}, compute(4.0), torch.float16).tolist() == [[4.0, 4.0]] * 3
    assert "it holds other outputs than its name says" in caplog.text
    path.write_bytes(b"not a safetensors file")
    assert ActivationCache(tmp_path).get({"what": "a"}, compute(5.0), torch.float16).tolist() == [[5.0, 5.0]] * 3
    assert "recomputing unreadable cache file" in caplog.text
    assert calls == [1.5, 7.0, 2.0, 3.0, 4.0, 5.0]
    assert ActivationCache(tmp_path).get({"what": "a"}, compute(6.0), torch.float16).tolist() == [[5.0, 5.0]] * 3


@pytest.fixture(scope="module")
def tiny_scenes(tmp_path_factory):
    return LayerStitchDataModule(n_train=16, n_val=24, image_size=64, cache_dir=str(tmp_path_factory.mktemp("ls")))


def test_cached_outputs_equal_a_fresh_forward_and_are_reused(tiny_scenes, encoders):
    encoder = encoders["tiny_resnet"]
    first = tiny_scenes.cached(encoder, "activations", "layer1", "val")
    assert first.dtype == torch.float16 and tiny_scenes.cached(encoder, "activations", 1, "val") is first
    again = LayerStitchDataModule(n_train=16, n_val=24, image_size=64, cache_dir=str(tiny_scenes.cache_root))
    images = again.images("val")[0]
    assert images.shape == (24, 3, 64, 64) and images.dtype == torch.uint8
    mean = torch.tensor(encoder.data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(encoder.data_config["std"]).view(1, 3, 1, 1)
    normalised = (images.float() / 255 - mean) / std
    torch.testing.assert_close(again.normalised_images(encoder, "val", torch.arange(24)), normalised)
    with torch.no_grad():
        hooked = _hooked_output(encoder, "layer1", normalised)
        logits = encoder.model(normalised)
        features = encoder.model.forward_head(encoder.model.forward_features(normalised), pre_logits=True)
    torch.testing.assert_close(again.cached(encoder, "activations", "layer1", "val").float(), hooked,
                               atol=1e-2, rtol=1e-2)  # stored as float16
    torch.testing.assert_close(again.cached(encoder, "logits", "ignored", "val"), logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again.cached(encoder, "pre_logits", -1, "val"), features, atol=1e-5, rtol=1e-5)
    other_layer = again.cached(encoder, "activations", "layer2", "val")
    assert other_layer.shape[1] != first.shape[1]
    with pytest.raises(ValueError, match="unknown frozen output 'features'; choose one of activations, logits"):
        again.cached(encoder, "features", -1, "val")


def test_data_module_loaders_and_bad_sources():
    dm = LayerStitchDataModule(n_train=10, n_val=6, image_size=32, batch_size=4, seed=3)
    images, labels = dm.images("train")
    assert images.shape == (10, 3, 32, 32) and labels.shape == (10,) and labels.dtype == torch.long
    train = [batch for batch in dm.train_dataloader()]
    assert [len(i) for i, _ in train] == [4, 4, 2]
    index = torch.cat([i for i, _ in train])
    assert sorted(index.tolist()) == list(range(10)) and index.tolist() != list(range(10))
    assert torch.equal(torch.cat([lab for _, lab in train]), labels[index])
    assert torch.cat([i for i, _ in dm.val_dataloader()]).tolist() == list(range(6))
    assert [i.tolist() for i, _ in dm.train_dataloader()] == [i.tolist() for i, _ in train]  # seeded order
    with pytest.raises(ValueError, match="unknown layer-stitch data source 'mnist'; choose 'scenes' or 'fashion_mnist'"):
        LayerStitchDataModule(source="mnist")


# ---- the Lightning module --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, layer", [("tiny_resnet", "layer2"), ("tiny_resnet", "pre_logits"), ("tiny_vit", 1)])
def test_a_network_stitched_into_itself_at_the_same_layer_has_zero_penalty(tmp_path, name, layer):
    size = 64 if name == "tiny_resnet" else 160  # the ViT takes only its own input size
    dm = LayerStitchDataModule(n_train=8, n_val=24, image_size=size, cache_dir=str(tmp_path))
    for target in ("soft", "labels"):
        module = LayerStitchingModule(name, name, layer, layer, target=target, init="identity")
        module.attach(dm)
        result = module.evaluate("val")
        assert result["agreement"] == 1.0 and result["penalty"] == 0.0, (target, result)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layer_a": "blocks.99"}, "encoder 'tiny_resnet' has no layer 'blocks.99'; its layers are: act1, layer1"),
        ({"layer_a": 42}, "layer 42 is out of range for encoder 'tiny_resnet', which has 6 layers"),
        ({"model_b": "tiny_vit", "layer_b": 0}, "cannot stitch a map of shape .* into a tokens"),
        ({"model_b": "minilm_l6"}, r"model B \('minilm_l6'\) is not a timm vision network"),
        ({"target": "hard"}, "unknown stitching target 'hard'; choose one of soft, labels"),
        ({"temperature": 0.0}, "temperature must be > 0, got 0.0"),
        ({"init": "identity", "layer_b": "layer3"}, "identity init needs equal widths"),
    ],
)
def test_bad_cuts_are_clear_errors(kwargs, message):
    options = {"model_a": "tiny_resnet", "model_b": "tiny_resnet", "layer_a": "layer2", "layer_b": "layer2", **kwargs}
    with pytest.raises(ValueError, match=message):
        LayerStitchingModule(**options)


class _EpochLosses(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_epoch_end(self, trainer, module):
        self.losses.append(float(trainer.callback_metrics["train/loss_epoch"]))


def _trainer(epochs, callbacks=()):
    return pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0,
                      limit_val_batches=0, callbacks=list(callbacks))


def test_training_one_cut_learns_to_agree_with_b(tmp_path):
    """From a random stitching layer: the loss falls and agreement with B rises far above the untrained start.

    A low temperature makes the soft targets as decisive as a trained network's (the tiny random networks' logits
    are nearly flat); the cut is the pre-logits features, where a linear map has to learn B's whole input.
    """
    dm = LayerStitchDataModule(n_train=64, n_val=48, image_size=48, batch_size=16, cache_dir=str(tmp_path))
    pl.seed_everything(0, verbose=False)
    module = LayerStitchingModule("tiny_resnet", "tiny_resnet", "pre_logits", "pre_logits", init="default",
                                  lr=3e-3, temperature=1 / 30)
    module.attach(dm)
    untrained = module.evaluate("val")
    losses = _EpochLosses()
    _trainer(12, [losses]).fit(module, datamodule=dm)
    trained = module.evaluate("val")
    assert losses.losses[-1] < 0.5 * losses.losses[0], losses.losses
    assert trained["agreement"] >= untrained["agreement"] + 0.4, (untrained, trained)
    assert trained["penalty"] == pytest.approx(1.0 - trained["agreement"]) and trained["b_score"] == 1.0


def test_labels_target_scores_probe_accuracy_against_b_probe(tmp_path):
    """With ``target: labels`` the score is the probe's accuracy on the labels, B's score its own probe accuracy."""
    dm = LayerStitchDataModule(n_train=48, n_val=32, image_size=64, cache_dir=str(tmp_path))
    module = LayerStitchingModule("tiny_resnet", "tiny_resnet", "layer2", "layer2", target="labels", init="default")
    module.attach(dm)
    labels = dm.labels("val")
    b_accuracy = float((module.b_outputs["val"].argmax(1) == labels).float().mean())
    encoder = module.frozen.b
    images = dm.normalised_images(encoder, "val", torch.arange(32))
    with torch.no_grad():
        mapped = module.stitch.eval()(module.cache["val"].float())
        handle = encoder.model.layer2.register_forward_hook(lambda m, i, o: mapped)
        try:
            features = encoder.model.forward_head(encoder.model.forward_features(images), pre_logits=True)
        finally:
            handle.remove()
        stitched = module.frozen.probe(features)
    result = module.evaluate("val")
    assert result["b_score"] == pytest.approx(b_accuracy) and 0.0 < b_accuracy
    assert result["score"] == pytest.approx(float((stitched.argmax(1) == labels).float().mean()))
    assert result["agreement"] == pytest.approx(float((stitched.argmax(1) == module.b_outputs["val"].argmax(1))
                                                      .float().mean()))
    assert result["penalty"] == pytest.approx(b_accuracy - result["score"])


def test_train_py_trains_one_cut_from_a_layer_stitch_config(tmp_path):
    from prh_stitch.cli import main

    config = tmp_path / "cut.yaml"
    config.write_text((REPO / "prh_stitch" / "configs" / "layer_stitch_lite0_to_lite2.yaml").read_text())
    args = ["--config", str(config), "--model.model_a", "tiny_resnet", "--model.model_b", "tiny_resnet",
            "--model.layer_a", "layer1", "--model.layer_b", "layer2", "--model.target", "labels",
            "--data.n_train", "32", "--data.n_val", "16", "--data.image_size", "64", "--data.cache_dir",
            str(tmp_path / "cache"), "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.enable_progress_bar=false"]
    assert main(args) == 0
    names = {p.name for p in (tmp_path / "run").glob("**/*.ckpt")}
    assert "last.ckpt" in names and any(n.startswith("best-") for n in names)
    ckpt = torch.load(next((tmp_path / "run").glob("**/last.ckpt")), weights_only=True)
    assert ckpt["prh_stitch_layer"] == {"layer_a": "layer1", "layer_b": "layer2", "in_shape": [32, 16, 16],
                                        "out_shape": [48, 8, 8]}
    assert all(k.startswith("stitch.") or k == "initialised" for k in ckpt["state_dict"])  # no frozen network in it
    assert bool(ckpt["state_dict"]["initialised"])


# ---- the sweep ---------------------------------------------------------------------------------------------------------

def _independent_cut_agreement(dm, encoder, layer_a, layer_b):
    """Agreement with B of A[:layer_a] -> least squares -> B[layer_b:], computed without the package's code paths:
    hooks on whole forwards, numpy least squares, float16 storage of A's activations as the cache keeps them."""
    def normalised(split):
        mean = torch.tensor(encoder.data_config["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(encoder.data_config["std"]).view(1, 3, 1, 1)
        return (dm.images(split)[0].float() / 255 - mean) / std

    with torch.no_grad():
        train, val = normalised("train"), normalised("val")
        source = _hooked_output(encoder, layer_a, train).half().float()
        target = _hooked_output(encoder, layer_b, train).half().float()
        size = target.shape[-2:]
        rows = lambda x: F.interpolate(x, size=size, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)  # noqa
        weight, bias = _independent_least_squares(rows(source).reshape(-1, source.shape[1]),
                                                  target.permute(0, 2, 3, 1).reshape(-1, target.shape[1]), 1e-4)
        val_source = _hooked_output(encoder, layer_a, val).half().float()
        mapped = (rows(val_source).double() @ weight.T + bias).float().permute(0, 3, 1, 2)
        stitched = _forward_with_replaced(encoder, layer_b, mapped, val)
        return float((stitched.argmax(1) == encoder.model(val).argmax(1)).float().mean())


def test_layer_sweep_reports_independently_computed_scores(tmp_path, encoders):
    """No training (0 epochs): every cell is the least-squares stitch, which the test computes on its own."""
    options = dict(n_train=24, n_val=32, image_size=48, cache_dir=str(tmp_path / "cache"))
    report = layer_sweep("tiny_resnet", "tiny_resnet", layers_a=["layer1", 2], layers_b=["layer2", "layer3"],
                         epochs=0, out=str(tmp_path / "sweep"), **options)
    assert isinstance(report, SweepReport)
    assert report.layers_a == ["layer1", "layer2"] and report.layers_b == ["layer2", "layer3"]
    dm = LayerStitchDataModule(**options)
    expected = [[_independent_cut_agreement(dm, encoders["tiny_resnet"], la, lb) for lb in report.layers_b]
                for la in report.layers_a]
    assert report.score == expected and report.agreement == expected
    assert report.penalty == [[1.0 - v for v in row] for row in expected] and report.b_score == 1.0
    assert len({v for row in expected for v in row}) > 1  # the cells differ: a swapped row or column would show
    assert (report.model_a, report.model_b, report.target, report.metric, report.epochs) == \
        ("tiny_resnet", "tiny_resnet", "soft", "agreement with B", 0)

    out = tmp_path / "sweep"
    assert json.loads((out / "penalty.json").read_text()) == json.loads(json.dumps(report.to_dict()))
    with open(out / "penalty.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["layer_a"], r["layer_b"]) for r in rows] == [(a, b) for a in report.layers_a for b in report.layers_b]
    assert [float(r["penalty"]) for r in rows] == [1.0 - v for row in expected for v in row]
    assert [float(r["score"]) for r in rows] == [v for row in expected for v in row]
    assert {float(r["b_score"]) for r in rows} == {1.0}
    assert (out / "penalty.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == [".prh_stitch_report", "penalty.csv", "penalty.json",
                                                     "penalty.pdf", "penalty.png", "tensorboard"]
    assert (out / "penalty.pdf").read_bytes()[:5] == b"%PDF-"


def test_layer_sweep_trains_every_cell_and_refuses_empty_layer_lists(tmp_path):
    options = dict(n_train=16, n_val=16, image_size=48, batch_size=8, cache_dir=str(tmp_path), out=None)
    untrained = layer_sweep("tiny_resnet", "tiny_resnet", ["pre_logits"], ["pre_logits"], init="default",
                            epochs=0, **options)
    trained = layer_sweep("tiny_resnet", "tiny_resnet", ["pre_logits"], ["pre_logits"], init="default",
                          epochs=6, lr=1e-2, **options)
    assert trained.score[0][0] > untrained.score[0][0] and trained.epochs == 6
    assert not list(tmp_path.glob("*.json"))  # out=None writes nothing
    with pytest.raises(ValueError, match="give at least one layer of each model to sweep"):
        layer_sweep("tiny_resnet", "tiny_resnet", [], ["layer1"], out=None)


def test_sweep_keeps_lightnings_banner_out_and_restores_the_log_levels(tmp_path, caplog):
    import logging

    lightning_log = logging.getLogger("pytorch_lightning")
    previous, fabric = lightning_log.level, logging.getLogger("lightning_fabric").level
    lightning_log.setLevel(logging.INFO)
    try:
        with caplog.at_level(logging.INFO):
            _trainer(1)  # a plain Trainer announces the hardware: the check below can see it
            assert any("GPU available" in r.getMessage() for r in caplog.records)
            caplog.clear()
            layer_sweep("tiny_resnet", "tiny_resnet", ["pre_logits"], ["pre_logits"], epochs=0, n_train=8, n_val=8,
                        image_size=32, cache_dir=str(tmp_path), out=None)
            assert not any("GPU available" in r.getMessage() for r in caplog.records)
        assert lightning_log.level == logging.INFO
        assert logging.getLogger("lightning_fabric").level == fabric
    finally:
        lightning_log.setLevel(previous)


def test_penalty_figure_shows_the_matrix_its_values_and_labels():
    from prh_stitch.layer_stitch.sweep import penalty_figure

    penalty = [[0.1, 0.5, -0.2], [0.9, 0.0, 0.3]]
    report = SweepReport("net_a", "net_b", "labels", "accuracy", layers_a=["x", "y"], layers_b=["p", "q", "r"],
                         score=penalty, penalty=penalty, agreement=penalty)
    fig = penalty_figure(report)
    ax = fig.axes[0]
    image = ax.images[0]
    np.testing.assert_array_equal(image.get_array(), np.array(penalty))
    assert image.get_clim() == (-0.2, 0.9) and image.get_cmap().name == "magma_r"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["p", "q", "r"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["x", "y"]
    assert [(t.get_text(), t.get_position()) for t in ax.texts] == [
        ("0.10", (0, 0)), ("0.50", (1, 0)), ("-0.20", (2, 0)), ("0.90", (0, 1)), ("0.00", (1, 1)), ("0.30", (2, 1))]
    # Dark cells (above half the maximum, 0.45) get white text.
    assert [t.get_color() for t in ax.texts] == ["black", "white", "black", "white", "black", "black"]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == (
        "B = net_b (resumes after)", "A = net_a (cut at)", "stitching penalty (accuracy)")
    assert len(fig.axes) == 2  # the heatmap and its colour bar
    zeros = SweepReport("a", "b", "soft", "agreement with B", ["x"], ["p"], score=[[1.0]], penalty=[[0.0]],
                        agreement=[[1.0]])
    assert penalty_figure(zeros).axes[0].images[0].get_clim() == (0.0, 1e-6)  # a flat matrix still has a range


def test_evaluate_layer_sweep_maps_layer_sweeps_signature(capsys):
    """``evaluate.py layer-sweep``'s options are layer_sweep's parameters; its errors are one line, exit 2."""
    from prh_stitch.cli.evaluate import main

    assert main(["layer-sweep", "--model_a", "tiny_resnet", "--layers_a", "[]", "--out", "null"]) == 2
    assert capsys.readouterr().err == ("evaluate.py: error: give at least one layer of each model to sweep "
                                       "(layers_a and layers_b)\n")


def test_lstsq_init_of_maps_holds_for_activations_near_batchnorms_eps():
    """Channels whose variance is of the order of BatchNorm's eps (1e-5) still get exactly the affine map."""
    x, true_w, g = _correlated(10, (3, 4, 4), 2, seed=3)
    x = x * 2e-3
    x_rows = x.permute(0, 2, 3, 1).reshape(-1, 3)
    y_rows = x_rows @ true_w.T + 1e-4 * torch.randn(len(x_rows), 2, generator=g)
    layer = StitchLayer((3, 4, 4), (2, 4, 4), init="lstsq")
    layer.init_from_data(x, y_rows.reshape(10, 4, 4, 2).permute(0, 3, 1, 2), "lstsq")
    weight, bias = _independent_least_squares(x_rows, y_rows, 1e-4)
    expected = (x_rows.double() @ weight.T + bias).reshape(10, 4, 4, 2).permute(0, 3, 1, 2)
    torch.testing.assert_close(layer.eval()(x).double(), expected, atol=1e-6, rtol=1e-3)
