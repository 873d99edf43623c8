"""Layer-to-layer stitching: resuming networks from a layer, the stitching layer, zero penalty, errors, train.py."""

import json
from pathlib import Path

import pytest
import timm
import torch

from prh_stitch.encoders import build_encoder
from prh_stitch.encoders.timm_backend import TimmEncoder
from prh_stitch.layer_stitch import (
    LayerStitchDataModule, LayerStitchingModule, StitchLayer, run_from, run_until,
)

REPO = Path(__file__).resolve().parents[1]


def _timm(name):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False)
    return TimmEncoder(name, model=model)


@pytest.fixture(scope="module")
def encoders():
    return {"tiny_resnet": build_encoder("tiny_resnet", True, None, {}),
            "tiny_vit": build_encoder("tiny_vit", True, None, {}),
            "test_efficientnet": _timm("test_efficientnet")}


@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_vit", "test_efficientnet"])
def test_running_up_to_a_layer_then_from_it_is_the_whole_network(encoders, name):
    encoder = encoders[name]
    images = torch.randn(2, *encoder.data_config["input_size"])
    with torch.no_grad():
        expected = encoder.model(images)
        for layer in encoder.layer_names:
            hidden = run_until(encoder, layer, images)
            torch.testing.assert_close(run_from(encoder, layer, hidden), expected, atol=1e-5, rtol=1e-5)
        features = encoder.model.forward_head(encoder.model.forward_features(images), pre_logits=True)
        hidden = run_until(encoder, 1, images)
        torch.testing.assert_close(run_from(encoder, 1, hidden, pre_logits=True), features, atol=1e-5, rtol=1e-5)


def test_stitch_layer_resizes_maps_and_identity_init_is_exact():
    layer = StitchLayer((8, 10, 10), (12, 5, 5))
    assert layer(torch.randn(3, 8, 10, 10)).shape == (3, 12, 5, 5)
    identity = StitchLayer((8, 6, 6), (8, 6, 6), init="identity").eval()
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(identity(x), x)
    tokens = StitchLayer((5, 16), (5, 16), init="identity")
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(tokens(x), x)


@pytest.fixture(scope="module")
def tiny_scenes(tmp_path_factory):
    return LayerStitchDataModule(n_train=16, n_val=24, image_size=64, cache_dir=str(tmp_path_factory.mktemp("ls")))


@pytest.mark.parametrize("name, layer", [("tiny_resnet", "layer2"), ("tiny_resnet", "pre_logits"), ("tiny_vit", 1)])
def test_a_network_stitched_into_itself_at_the_same_layer_has_zero_penalty(tmp_path, name, layer):
    size = 64 if name == "tiny_resnet" else 160  # the ViT takes only its own input size
    dm = LayerStitchDataModule(n_train=8, n_val=24, image_size=size, cache_dir=str(tmp_path))
    for target in ("soft", "labels"):
        module = LayerStitchingModule(name, name, layer, layer, target=target, init="identity")
        module.attach(dm)
        result = module.evaluate("val")
        assert result["agreement"] == 1.0 and result["penalty"] == 0.0, (target, result)


def test_cached_activations_are_reused_and_equal_a_fresh_forward(tiny_scenes):
    encoder = build_encoder("tiny_resnet", True, None, {})
    first = tiny_scenes.cached(encoder, "activations", "layer1", "val")
    assert tiny_scenes.cached(encoder, "activations", "layer1", "val") is first
    again = LayerStitchDataModule(n_train=16, n_val=24, image_size=64, cache_dir=str(tiny_scenes.cache_root))
    from_disk = again.cached(encoder, "activations", "layer1", "val")
    torch.testing.assert_close(from_disk, first)
    with torch.no_grad():
        fresh = run_until(encoder, "layer1", again.normalised_images(encoder, "val", torch.arange(24)))
    torch.testing.assert_close(from_disk.float(), fresh, atol=1e-2, rtol=1e-2)  # stored as float16


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layer_a": "blocks.99"}, "layer 'blocks.99' does not exist in 'tiny_resnet'"),
        ({"layer_a": 42}, "layer 42 is out of range for 'tiny_resnet'"),
        ({"model_b": "tiny_vit", "layer_b": 0}, "cannot stitch a map of shape .* into a tokens"),
        ({"model_b": "minilm_l6"}, "is not a timm vision network"),
        ({"target": "hard"}, "unknown stitching target 'hard'"),
        ({"init": "identity", "layer_b": "layer3"}, "identity init needs equal widths"),
    ],
)
def test_bad_cuts_are_clear_errors(kwargs, message):
    options = {"model_a": "tiny_resnet", "model_b": "tiny_resnet", "layer_a": "layer2", "layer_b": "layer2", **kwargs}
    with pytest.raises(ValueError, match=message):
        LayerStitchingModule(**options)


def test_unsupported_architectures_are_refused():
    with pytest.raises(ValueError, match="supports timm EfficientNet, ResNet and VisionTransformer"):
        run_from(_timm("test_convnext"), 0, torch.zeros(1))


def test_train_py_trains_one_cut_from_a_layer_stitch_config(tmp_path):
    from prh_stitch.cli import main

    config = tmp_path / "cut.yaml"
    config.write_text((REPO / "configs" / "layer_stitch_lite0_to_lite2.yaml").read_text())
    args = ["--config", str(config), "--model.model_a", "tiny_resnet", "--model.model_b", "tiny_resnet",
            "--model.layer_a", "layer1", "--model.layer_b", "layer2", "--model.target", "labels",
            "--data.n_train", "32", "--data.n_val", "16", "--data.image_size", "64", "--data.cache_dir",
            str(tmp_path / "cache"), "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(tmp_path / "run"),
            "--trainer.enable_progress_bar=false"]
    assert main(args) == 0
    names = {p.name for p in (tmp_path / "run").glob("**/*.ckpt")}
    assert "last.ckpt" in names and any(n.startswith("best-") for n in names)
    ckpt = torch.load(next((tmp_path / "run").glob("**/last.ckpt")), weights_only=True)
    assert ckpt["prh_stitch_layer"]["layer_a"] == "layer1" and ckpt["prh_stitch_layer"]["layer_b"] == "layer2"
    assert all(k.startswith("stitch.") or k == "initialised" for k in ckpt["state_dict"])  # no frozen network in it


def test_sweep_writes_the_penalty_matrix_and_heatmap(tmp_path, capsys):
    """Through `evaluate.py layer-sweep`, the command users run."""
    from prh_stitch.evaluation import main as evaluate_main

    out = tmp_path / "sweep"
    args = ["--model-a", "tiny_resnet", "--model-b", "tiny_resnet", "--layers-a", "layer1", "layer2",
            "--layers-b", "layer2", "--n-train", "16", "--n-val", "16", "--image-size", "64", "--epochs", "1",
            "--out", str(out)]
    assert evaluate_main(["layer-sweep", *args]) == 0
    report = json.loads((out / "penalty.json").read_text())
    assert report["layers_a"] == ["layer1", "layer2"] and report["layers_b"] == ["layer2"]
    assert len(report["penalty"]) == 2 and all(-1.0 <= v[0] <= 1.0 for v in report["penalty"])
    assert all(p == pytest.approx(report["b_score"] - s) for p, s in zip(
        [row[0] for row in report["penalty"]], [row[0] for row in report["score"]]))
    assert (out / "penalty.png").stat().st_size > 1000 and (out / "penalty.csv").read_text().count("\n") == 3
    assert evaluate_main(["layer-sweep", *args[:-2], "--layers-a", "nope", "--out", str(out)]) == 2
    assert "layer 'nope' does not exist" in capsys.readouterr().err
