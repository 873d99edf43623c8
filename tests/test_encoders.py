"""Frozen encoders: layers, pooling, freezing, local weights, offline built-ins, clear errors."""

import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from prh_stitch.encoders import BUILTINS, EncoderSpec, build_encoder, encoder_from_spec
from prh_stitch.encoders.pooling import POOLERS

TINY = ["tiny_vit", "tiny_resnet", "tiny_bert"]


def _batch(encoder, n=3):
    if encoder.modality == "image":
        images = [Image.new("RGB", (48, 40), (40 * i, 200 - 30 * i, 90)) for i in range(n)]
        return encoder.collate([encoder.transform(im) for im in images])
    captions = ["a red circle", "two small blue squares on a gray background", "a star"][:n]
    return encoder.collate([encoder.transform(c) for c in captions])


def _batch_of(encoder, i):
    """Sample i of ``_batch`` on its own (for text: padded to its own length, not the batch's)."""
    if encoder.modality == "image":
        return encoder.collate([encoder.transform(Image.new("RGB", (48, 40), (40 * i, 200 - 30 * i, 90)))])
    captions = ["a red circle", "two small blue squares on a gray background", "a star"]
    return encoder.collate([encoder.transform(captions[i])])


@pytest.fixture(scope="module", params=TINY)
def tiny(request):
    return build_encoder(request.param)


def test_tiny_encoders_are_frozen_and_stay_in_eval_mode(tiny):
    assert all(not p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not tiny.training and not any(m.training for m in tiny.modules())


def test_every_layer_gives_pooled_features_of_the_reported_width(tiny):
    batch = _batch(tiny)
    outputs = tiny.encode(batch, list(range(tiny.num_layers)))
    assert len(outputs) == tiny.num_layers
    for layer, out in enumerate(outputs):
        assert out.shape == (3, tiny.feature_dim(layer))
        assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_negative_layers_count_from_the_end_and_names_work(tiny):
    batch = _batch(tiny)
    last, first = tiny.encode(batch, [-1, 0])
    torch.testing.assert_close(last, tiny.encode(batch, [tiny.num_layers - 1])[0])
    torch.testing.assert_close(first, tiny.encode(batch, [tiny.layer_names[0]])[0])


def test_layer_out_of_range_lists_the_valid_range(tiny):
    n = tiny.num_layers
    with pytest.raises(ValueError, match=rf"out of range .* \[{-n}, {n - 1}\]"):
        tiny.resolve_layer(n)
    with pytest.raises(ValueError, match="has no layer 'nope'"):
        tiny.resolve_layer("nope")


def test_encoding_is_deterministic_and_batch_independent(tiny):
    batch = _batch(tiny)
    layers = list(range(tiny.num_layers))
    full = tiny.encode(batch, layers)
    again = build_encoder(tiny.name).encode(batch, layers)  # seeded random init: same weights every build
    torch.testing.assert_close(full, again)
    for i in range(3):  # each sample encoded alone equals its row in the batch, at every layer
        alone = tiny.encode(_batch_of(tiny, i), layers)
        for layer, (one, many) in enumerate(zip(alone, full)):
            assert one.shape == (1, many.shape[1])
            torch.testing.assert_close(one[0], many[i], atol=1e-5, rtol=1e-5, msg=f"sample {i}, layer {layer}")
    assert not torch.allclose(full[-1][0], full[-1][1])  # the samples differ, so the comparison has teeth


def test_timm_early_stop_gives_the_same_block_features_as_a_full_pass():
    encoder = build_encoder("tiny_vit")
    batch = _batch(encoder)
    shallow_only = encoder.encode(batch, [1])[0]
    with_head = encoder.encode(batch, [1, -1])[0]
    torch.testing.assert_close(shallow_only, with_head)


def test_vit_pooling_cls_and_mean_differ_and_head_layer_rejects_other_pooling():
    encoder = build_encoder("tiny_vit")
    batch = _batch(encoder)
    cls_features = encoder.encode(batch, [2], "cls")[0]
    mean_features = encoder.encode(batch, [2], "mean")[0]
    assert not torch.allclose(cls_features, mean_features)
    torch.testing.assert_close(encoder.encode(batch, [2])[0], cls_features)  # ViT default: class token
    with pytest.raises(ValueError, match="pooled by the model's own head"):
        encoder.encode(batch, [-1], "mean")


def test_cnn_maps_reject_token_pooling():
    encoder = build_encoder("tiny_resnet")
    with pytest.raises(ValueError, match="needs a token sequence"):
        encoder.encode(_batch(encoder), [1], "cls")


def test_mean_pooling_ignores_padding_exactly():
    encoder = build_encoder("tiny_bert")
    alone = encoder.collate([encoder.transform("a star")])
    padded = encoder.collate([encoder.transform("a star"), encoder.transform("a very long caption " * 5)])
    for pooling in ("mean", "cls", "last"):
        torch.testing.assert_close(
            encoder.encode(alone, [-1], pooling)[0][0], encoder.encode(padded, [-1], pooling)[0][0], atol=1e-5, rtol=1e-5
        )


def test_poolers_match_brute_force_with_left_and_right_padding():
    torch.manual_seed(0)
    hidden = torch.randn(3, 6, 4)
    right = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]])
    left = right.flip(1)
    lengths = right.sum(1).tolist()
    for i, n in enumerate(lengths):
        torch.testing.assert_close(POOLERS.get("mean")(hidden, right)[i], hidden[i, :n].mean(0))
        torch.testing.assert_close(POOLERS.get("last")(hidden, right)[i], hidden[i, n - 1])
        torch.testing.assert_close(POOLERS.get("last")(hidden, left)[i], hidden[i, -1])
        torch.testing.assert_close(POOLERS.get("mean")(hidden, left)[i], hidden[i, 6 - n:].mean(0))
    maps = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(POOLERS.get("mean")(maps), maps.mean(dim=(2, 3)))
    tokens = torch.randn(2, 5, 4)
    torch.testing.assert_close(POOLERS.get("mean")(tokens, None, 1), tokens[:, 1:].mean(1))


def test_fingerprint_tracks_layers_pooling_and_weights():
    encoder = build_encoder("tiny_resnet")
    base = encoder.fingerprint([-1])
    assert base == build_encoder("tiny_resnet").fingerprint([-1])
    assert base != encoder.fingerprint([1])
    assert encoder.fingerprint([1], "mean") != encoder.fingerprint([2], "mean")
    with torch.no_grad():
        first = next(encoder.parameters())
        first[(0,) * first.ndim] += 1.0
    assert encoder.fingerprint([-1]) != base


def test_timm_weights_from_a_local_file(tmp_path):
    import timm

    torch.manual_seed(123)
    reference = timm.create_model("test_resnet", pretrained=False)
    path = tmp_path / "weights.pth"
    torch.save(reference.state_dict(), path)
    encoder = build_encoder("timm:test_resnet", pretrained=False, checkpoint=str(path))
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(encoder.model.state_dict()[key], value)


def test_weights_file_of_another_architecture_is_rejected(tmp_path):
    import timm

    path = tmp_path / "vit.pth"
    torch.save(timm.create_model("test_vit").state_dict(), path)
    with pytest.raises(ValueError, match="weights do not fit the model"):
        build_encoder("timm:test_resnet", pretrained=False, checkpoint=str(path))


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_weights_file_that_needs_unpickling_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"weight": _Payload()}, f)
    with pytest.raises(ValueError, match="could not read weights .* safely"):
        build_encoder("timm:test_resnet", pretrained=False, checkpoint=str(path))


def test_hub_model_without_network_fails_with_a_clear_message():
    with pytest.raises(ValueError, match="could not fetch pretrained weights .* checkpoint=PATH"):
        build_encoder("timm:test_vit", pretrained=True)


def test_hf_backend_loads_a_local_folder(tmp_path):
    tiny = build_encoder("tiny_bert")
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = build_encoder(f"hf:{tmp_path}")
    assert loaded.layer_names == tiny.layer_names
    batch = _batch(tiny)
    torch.testing.assert_close(loaded.encode(batch, [-1])[0], tiny.encode(batch, [-1])[0])


def test_hf_missing_folder_gives_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="could not load Hugging Face model"):
        build_encoder(f"hf:{tmp_path / 'missing'}")


@pytest.mark.parametrize(
    "name, message",
    [("resnet50", "unknown encoder 'resnet50'.*timm:"), ("timm:no_such_net", "unknown timm model"), ("foo:bar", "unknown encoder")],
)
def test_unknown_encoder_names(name, message):
    with pytest.raises(ValueError, match=message):
        build_encoder(name)


def test_spec_validation():
    with pytest.raises(ValueError, match=r"unknown EncoderSpec setting\(s\) \[.layers.\]"):
        EncoderSpec.coerce({"name": "tiny_vit", "layers": 3})
    with pytest.raises(ValueError, match="out of range"):
        encoder_from_spec({"name": "tiny_resnet", "layer": 50})
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        encoder_from_spec({"name": "tiny_resnet", "pooling": "max"})


# -- offline pretrained built-ins: predictions on fixed inputs against stored references -------------------------
# tests/data/encoder_references.json is written by tests/data/make_encoder_references.py, which loads the weights
# by key name (not by position) through plain timm / transformers. Logits agree to 1e-3 only if every tensor sits
# in its right place: swapping two same-shaped tensors (a BatchNorm's weight and bias, its mean and variance, two
# blocks' convs) moves them by far more.

REFERENCES = Path(__file__).parent / "data" / "encoder_references.json"
LITE_CLASSES = [0, 1, 281, 500, 652, 999]  # tench, goldfish, tabby cat, cliff dwelling, military uniform, toilet paper
SENTENCES = ["a photo of a dog", "a picture of a puppy", "the stock market fell sharply today"]


def reference_images():
    """A real photo shipped with matplotlib, and a deterministic procedural scene."""
    from matplotlib import cbook
    from PIL import ImageDraw

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = Image.open(f).convert("RGB")
    scene = Image.new("RGB", (300, 220), (90, 160, 230))
    draw = ImageDraw.Draw(scene)
    draw.rectangle([0, 150, 300, 220], fill=(60, 140, 50))
    draw.ellipse([200, 20, 260, 80], fill=(250, 220, 60))
    draw.polygon([(40, 150), (110, 60), (180, 150)], fill=(120, 110, 100))
    for x in range(0, 300, 20):
        draw.line([(x, 220), (x + 10, 160)], fill=(30, 90, 30), width=3)
    return {"grace_hopper": photo, "scene": scene}


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_offline_efficientnet_lite_predicts_its_stored_references(variant):
    name = f"efficientnet_lite{variant}"
    vision = build_encoder(name)
    size = (224, 240, 260)[variant]
    assert vision.feature_dim(-1) == 1280 and vision.data_config["input_size"] == (3, size, size)
    assert vision.data_config["mean"] == (0.5, 0.5, 0.5) and vision.data_config["std"] == (0.5, 0.5, 0.5)
    references = json.loads(REFERENCES.read_text())[name]
    images = reference_images()
    batch = vision.collate([vision.transform(im) for im in images.values()])
    with torch.no_grad():
        logits = vision.model.get_classifier()(vision.encode(batch, [-1])[0])  # the head on the pooled features
    for row, image_name in zip(logits, images):
        expected = references[image_name]
        assert row.topk(5).indices.tolist() == expected["top5"], image_name
        for cls, value in expected["logits"].items():
            assert float(row[int(cls)]) == pytest.approx(value, abs=1e-3), (image_name, cls)
    assert 652 in references["grace_hopper"]["top5"]  # the photo of Grace Hopper in uniform: military uniform


def test_offline_minilm_matches_its_stored_reference_and_behaves():
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "minilm_l6"} <= set(BUILTINS.names())
    text = build_encoder("minilm_l6")
    raw = text.encode(text.collate([text.transform(s) for s in SENTENCES]), [-1], "mean")[0]
    assert raw.shape == (3, 384)
    expected = json.loads(REFERENCES.read_text())["minilm_l6"]
    torch.testing.assert_close(raw[:, :8], torch.tensor(expected["first_dims"]), atol=1e-4, rtol=0)
    torch.testing.assert_close(raw.norm(dim=1), torch.tensor(expected["norms"]), atol=1e-4, rtol=0)
    emb = F.normalize(raw, dim=1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


# -- image preprocessing split between workers (uint8) and the model's device (float) ---------------------


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_resnet"])
def test_uint8_transform_then_model_input_is_timms_own_transform_bit_for_bit(name):
    encoder = build_encoder(name)
    gray = Image.fromarray(torch.arange(50 * 70, dtype=torch.uint8).reshape(50, 70).numpy())
    images = [Image.new("RGB", (97, 61), (250, 3, 128)), Image.effect_noise((64, 80), 60).convert("RGB"), gray]
    shipped = encoder.collate([encoder.transform(im) for im in images])
    assert shipped.dtype == torch.uint8  # what crosses process boundaries is a quarter of the float bytes
    reference = torch.stack([encoder._transform(im.convert("RGB")) for im in images])
    assert reference.dtype == torch.float32
    assert torch.equal(encoder.model_input(shipped), reference)
    # float batches (e.g. the width probe, or a user's own normalised tensors) are taken as they are
    assert torch.equal(encoder.model_input(reference), reference)


def test_a_transform_that_is_not_timms_usual_shape_is_kept_whole():
    from torchvision import transforms as T

    from prh_stitch.encoders.timm_backend import split_pixel_transform

    custom = T.Compose([T.Resize(8), T.ToTensor(), T.Lambda(lambda x: x * 2)])
    kept, normalisation = split_pixel_transform(custom)
    assert kept is custom and normalisation is None
    usual = T.Compose([T.Resize(8), T.CenterCrop(8), T.ToTensor(), T.Normalize([0.1, 0.2, 0.3], [0.5, 0.6, 0.7])])
    pixels, (mean, std) = split_pixel_transform(usual)
    out = pixels(Image.new("RGB", (20, 10), (9, 99, 199)))
    assert out.dtype == torch.uint8 and out.shape == (3, 8, 8)
    assert mean == pytest.approx([0.1, 0.2, 0.3]) and std == pytest.approx([0.5, 0.6, 0.7])
