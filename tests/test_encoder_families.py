"""Every encoder family on tiny random models built here, offline: an hf ViT, both towers of an hf CLIP, both towers
of an open_clip model, and timm through its own forward_intermediates. Layers are checked against each library's
own forward, pooled vectors against a hand computation; then extraction, training and `evaluate.py align` run
through each family."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from prh_stitch.encoders import build_encoder
from prh_stitch.encoders.builtins import minilm_folder

open_clip = pytest.importorskip("open_clip", reason="open_clip_torch is part of the test extra")

CAPTIONS = ["a red square above a blue circle", "two green triangles", "a yellow star !"]


def _images():
    noise = torch.randint(0, 256, (48, 48, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return [Image.new("RGB", (40, 50), (10, 200, 30)), Image.new("L", (64, 64), 90), Image.fromarray(noise.numpy())]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Encoder names of the tiny models, saved to folders the way the libraries save real ones."""
    from safetensors.torch import save_file
    from transformers import (AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, ViTConfig, ViTImageProcessor,
                              ViTModel)

    root = tmp_path_factory.mktemp("families")
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=37))
    vit.save_pretrained(root / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "vit")

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())  # an offline tokenizer; its [SEP] ends each caption
    text = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=37, max_position_embeddings=128, bos_token_id=tokenizer.cls_token_id,
                eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=37)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")

    # open_clip's own folder layout (as its hub repos have it): open_clip_config.json + open_clip_model.safetensors.
    config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                                              "patch_size": 8},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3}}
    (root / "oc").mkdir()
    (root / "oc" / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    model = open_clip.CLIP(**config)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "oc" / "open_clip_model.safetensors"))
    return {"vit": f"hf:{root}/vit", "clip_vision": f"hf:{root}/clip#vision", "clip_text": f"hf:{root}/clip#text",
            "oc_vision": f"openclip:local-dir:{root}/oc#vision", "oc_text": f"openclip:local-dir:{root}/oc#text",
            "root": root}


def _batch(encoder, raw):
    return encoder.collate([encoder.transform(x) for x in raw])


# ---------------------------------------------------------------------------------------------- hf vision models
def test_hf_vit_layers_are_its_hidden_states_and_poolings_are_the_hand_computed_ones(zoo):
    from transformers import AutoImageProcessor, AutoModel

    encoder = build_encoder(zoo["vit"])
    assert type(encoder).__name__ == "HFVisionEncoder" and encoder.modality == "image"
    assert encoder.layer_names == ["embeddings", "layers.0", "layers.1"]
    processor = AutoImageProcessor.from_pretrained(zoo["root"] / "vit")
    pixels = _batch(encoder, _images())
    rgb = [im.convert("RGB") for im in _images()]
    assert torch.equal(pixels, processor(images=rgb, return_tensors="pt")["pixel_values"])
    hidden = AutoModel.from_pretrained(zoo["root"] / "vit")(pixel_values=pixels, output_hidden_states=True).hidden_states
    for i in range(3):
        (cls,) = encoder.encode(pixels, [i], "cls")
        (mean,) = encoder.encode(pixels, [i], "mean")
        (default,) = encoder.encode(pixels, [encoder.layer_names[i]])
        torch.testing.assert_close(cls, hidden[i][:, 0], rtol=0, atol=1e-6)
        torch.testing.assert_close(mean, hidden[i][:, 1:].mean(dim=1), rtol=0, atol=1e-6)  # 16 patches, no CLS
        assert torch.equal(default, cls)  # a class token: cls is the natural pooling
    assert encoder.feature_dim(-1) == 32 and encoder.fingerprint() == build_encoder(zoo["vit"]).fingerprint()


def _dinov2_with_registers(folder):
    from transformers import BitImageProcessor, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    config = Dinov2WithRegistersConfig(image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, mlp_ratio=1, num_register_tokens=2)
    Dinov2WithRegistersModel(config).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(folder)
    return 3  # the class token and two registers precede the 2 x 2 patches


def _convnext(folder):
    from transformers import ConvNextConfig, ConvNextImageProcessor, ConvNextModel

    ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)).save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=1.0).save_pretrained(folder)
    return None  # maps: no tokens at all


@pytest.mark.parametrize("build", [_dinov2_with_registers, _convnext])
def test_hf_vision_mean_pooling_leaves_out_class_and_register_tokens_and_averages_maps(build, tmp_path):
    from transformers import AutoModel

    torch.manual_seed(0)
    prefix = build(tmp_path)
    encoder = build_encoder(f"hf:{tmp_path}")
    pixels = _batch(encoder, _images())
    hidden = AutoModel.from_pretrained(tmp_path)(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert encoder.layer_names == ["embeddings"] + [f"layers.{i}" for i in range(len(hidden) - 1)]
    for i, h in enumerate(hidden):
        (default,) = encoder.encode(pixels, [i])
        (mean,) = encoder.encode(pixels, [i], "mean")
        if prefix is None:
            assert h.ndim == 4
            torch.testing.assert_close(mean, h.mean(dim=(2, 3)), rtol=0, atol=1e-6)
            assert torch.equal(default, mean)
            with pytest.raises(ValueError, match="pooling 'cls' needs a token sequence"):
                encoder.encode(pixels, [i], "cls")
        else:
            assert h.shape[1] == prefix + 4
            torch.testing.assert_close(mean, h[:, prefix:].mean(dim=1), rtol=0, atol=1e-6)
            torch.testing.assert_close(default, h[:, 0], rtol=0, atol=1e-6)


def test_clip_vision_tower_layers_and_projection_are_the_models_own(zoo):
    from transformers import AutoModel

    encoder = build_encoder(zoo["clip_vision"])
    assert encoder.modality == "image" and encoder.layer_names == ["embeddings", "layers.0", "layers.1", "layers.2",
                                                                   "projection"]
    clip = AutoModel.from_pretrained(zoo["root"] / "clip")
    pixels = _batch(encoder, _images())
    hidden = clip.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
    features = encoder.encode(pixels, list(range(5)))
    for i in range(4):
        torch.testing.assert_close(features[i], hidden[i][:, 0], rtol=0, atol=1e-6)
    own = clip.get_image_features(pixel_values=pixels)
    own = own if isinstance(own, torch.Tensor) else own.pooler_output
    assert own.shape == (3, 16)
    torch.testing.assert_close(features[4], own, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="pooled by the model itself; use pooling None or 'head'"):
        encoder.encode(pixels, [-1], "mean")
    with pytest.raises(ValueError, match="'head' applies only to the layer 'projection'"):
        encoder.encode(pixels, [0], "head")


def test_clip_text_tower_layers_poolings_and_projection(zoo):
    from transformers import AutoModel

    encoder = build_encoder(zoo["clip_text"])
    assert type(encoder).__name__ == "HFTextEncoder" and encoder.layer_names[-1] == "projection"
    clip = AutoModel.from_pretrained(zoo["root"] / "clip")
    batch = _batch(encoder, CAPTIONS)
    mask = batch["attention_mask"]
    assert mask.sum(1).tolist() != [mask.shape[1]] * 3, "the captions must differ in length so padding is exercised"
    hidden = clip.text_model(input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=True).hidden_states
    lengths = mask.sum(1)
    for i in range(3):
        (last,) = encoder.encode(batch, [i], "last")
        (mean,) = encoder.encode(batch, [i], "mean")
        for row in range(3):
            n = int(lengths[row])
            torch.testing.assert_close(last[row], hidden[i][row, n - 1], rtol=0, atol=1e-6)
            torch.testing.assert_close(mean[row], hidden[i][row, :n].mean(0), rtol=0, atol=1e-6)
    own = clip.get_text_features(input_ids=batch["input_ids"], attention_mask=mask)
    own = own if isinstance(own, torch.Tensor) else own.pooler_output
    torch.testing.assert_close(encoder.encode(batch, [-1])[0], own, rtol=0, atol=1e-6)


def test_two_tower_names_and_options_fail_with_one_clear_line(zoo):
    root = zoo["root"]
    with pytest.raises(ValueError, match=r"has a vision and a text tower; name one: 'hf:.*#vision' or"):
        build_encoder(f"hf:{root}/clip")
    with pytest.raises(ValueError, match="unknown tower 'audio'"):
        build_encoder(f"hf:{root}/clip#audio")
    with pytest.raises(ValueError, match="has no separate towers; drop the '#' suffix"):
        build_encoder(f"{zoo['vit']}#vision")
    with pytest.raises(ValueError, match=r"\(image\) takes no option\(s\) \['max_length'\]"):
        build_encoder(zoo["vit"], options={"max_length": 8})
    with pytest.raises(ValueError, match="unknown torch_dtype 'bf17'"):
        build_encoder(zoo["vit"], options={"torch_dtype": "bf17"})
    with pytest.raises(ValueError, match="names no tower: end it with '#vision' or '#text'"):
        build_encoder(f"openclip:local-dir:{root}/oc")
    with pytest.raises(ValueError, match="name pretrained weights after '@'"):
        build_encoder("openclip:ViT-B-32#vision")
    # The classes themselves read one modality: the other tower is refused before anything is loaded (the path
    # does not exist, and the error is about the tower).
    from prh_stitch.encoders.hf_backend import HFTextEncoder
    from prh_stitch.encoders.hf_vision import HFVisionEncoder

    with pytest.raises(ValueError, match=r"encoder 'hf:/missing/clip#vision' is a vision tower; build it with the hf:"):
        HFTextEncoder("/missing/clip#vision")
    with pytest.raises(ValueError, match=r"encoder 'hf:/missing/clip#text' is a text tower; build it with the hf:"):
        HFVisionEncoder("/missing/clip#text")
    # The tower that the class reads loads as through the backend.
    text = HFTextEncoder(f"{root}/clip#text")
    same = build_encoder(zoo["clip_text"])
    assert text.layer_names == same.layer_names and text.modality == "text"
    batch = text.collate([text.transform("a red circle")])
    torch.testing.assert_close(text.encode(batch, [-1])[0], same.encode(batch, [-1])[0], rtol=0, atol=0)
    vision = HFVisionEncoder(f"{root}/clip#vision")
    assert vision.layer_names == build_encoder(zoo["clip_vision"]).layer_names and vision.modality == "image"


# ---------------------------------------------------------------------------------------------- loading options
def test_bf16_features_enter_the_fingerprint_and_options_reach_the_library(zoo, tmp_path):
    from prh_stitch.data.features import FeatureStore
    from prh_stitch.data.store_entry import entry_name

    full = build_encoder(zoo["clip_text"])
    half = build_encoder(zoo["clip_text"], options={"torch_dtype": "bfloat16", "attn_implementation": "eager"})
    assert half.compute_dtype() == torch.bfloat16 and full.compute_dtype() == torch.float32
    assert half.model.config._attn_implementation == "eager"
    batch = _batch(full, CAPTIONS)
    a, b = full.encode(batch, [-2])[0], half.encode(batch, [-2])[0]
    assert b.dtype == torch.float32 and not torch.equal(a, b)  # computed in bf16, handed on as float32
    torch.testing.assert_close(b, a, rtol=0.05, atol=0.05)
    assert half.fingerprint() != full.fingerprint()
    shard = tmp_path / "x.tar"
    shard.write_bytes(b"")
    store = FeatureStore(tmp_path / "store")
    assert entry_name(store.identity(half, [-1], None, [str(shard)])) != \
        entry_name(store.identity(full, [-1], None, [str(shard)]))
    for name in ("vit", "oc_vision"):
        assert build_encoder(zoo[name], options={"torch_dtype": "float16"}).compute_dtype() == torch.float16


def test_a_device_map_placement_is_kept_when_the_encoder_is_moved(zoo):
    pytest.importorskip("accelerate")
    encoder = build_encoder(zoo["vit"], options={"device_map": {"": "cpu"}})
    assert encoder._placed_by_device_map
    encoder.to(torch.float64)  # what the feature store's encoder.to(device) would do: ignored, accelerate placed it
    assert encoder.compute_dtype() == torch.float32
    plain = build_encoder(zoo["vit"])
    assert plain.to(torch.float64).compute_dtype() == torch.float64


# ---------------------------------------------------------------------------------------------- open_clip
def _block_outputs(blocks, run):
    """Each residual block's output, caught by hooks: a reference independent of forward_intermediates."""
    caught = []
    handles = [b.register_forward_hook(lambda _m, _i, out: caught.append(out)) for b in blocks]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return caught


def test_openclip_vision_layers_are_its_blocks_and_projection_is_encode_image(zoo):
    encoder = build_encoder(zoo["oc_vision"])
    assert encoder.modality == "image" and encoder.layer_names == ["layers.0", "layers.1", "projection"]
    pixels = _batch(encoder, _images())
    model = encoder.model
    blocks = _block_outputs(model.visual.transformer.resblocks, lambda: model.encode_image(pixels))
    assert blocks[0].shape == (3, 17, 32)  # batch first: a class token and 16 patches
    for i in range(2):
        (cls,) = encoder.encode(pixels, [i])
        (mean,) = encoder.encode(pixels, [i], "mean")
        torch.testing.assert_close(cls, blocks[i][:, 0], rtol=0, atol=1e-6)
        torch.testing.assert_close(mean, blocks[i][:, 1:].mean(1), rtol=0, atol=1e-6)
    torch.testing.assert_close(encoder.encode(pixels, [-1])[0], model.encode_image(pixels), rtol=0, atol=1e-6)
    # The preprocessing enters the fingerprint as text: it must not hold a memory address, which changes every run.
    assert " at 0x" not in json.dumps(encoder.preprocessing_description()) and "Resize" in json.dumps(
        encoder.preprocessing_description())


def test_openclip_text_layers_pool_at_the_end_of_text_token_and_ignore_padding(zoo):
    from prh_stitch.encoders.openclip_backend import padding_mask

    encoder = build_encoder(zoo["oc_text"])
    assert encoder.modality == "text" and encoder.layer_names == ["layers.0", "layers.1", "layers.2", "projection"]
    tokens = _batch(encoder, CAPTIONS)
    model = encoder.model
    assert torch.equal(tokens, open_clip.get_tokenizer("ViT-B-32", context_length=16)(CAPTIONS))
    blocks = _block_outputs(model.transformer.resblocks, lambda: model.encode_text(tokens))
    eot = tokens.argmax(dim=1)  # CLIP's own pooling reads the end-of-text token, the highest id
    rows = torch.arange(3)
    for i in range(3):
        (last,) = encoder.encode(tokens, [i])
        (mean,) = encoder.encode(tokens, [i], "mean")
        torch.testing.assert_close(last, blocks[i][rows, eot], rtol=0, atol=1e-6)
        for row in range(3):
            torch.testing.assert_close(mean[row], blocks[i][row, : int(eot[row]) + 1].mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(encoder.encode(tokens, [-1])[0], model.encode_text(tokens), rtol=0, atol=1e-6)
    # '!' is token 0, the pad id: inside a caption it is a real token, only the tail is padding.
    assert padding_mask(torch.tensor([[5, 0, 7, 0, 0], [5, 6, 0, 0, 0]]), 0).tolist() == [[1, 1, 1, 0, 0],
                                                                                           [1, 1, 0, 0, 0]]


# ---------------------------------------------------------------------------------------------- timm
@pytest.mark.parametrize("architecture", ["test_vit", "test_resnet", "test_efficientnet", "test_convnext"])
def test_timm_layers_come_from_forward_intermediates_and_equal_hooked_blocks(architecture):
    from prh_stitch.encoders.timm_backend import TimmEncoder

    torch.manual_seed(0)
    encoder = TimmEncoder(architecture, pretrained=False)
    assert encoder._intermediates is not None, "this family has timm's forward_intermediates: it must be used"
    pixels = torch.randint(0, 256, (2, *encoder.data_config["input_size"]), dtype=torch.uint8)
    layers = list(range(encoder.num_layers))
    official = encoder.encode(pixels, layers)
    index = encoder._intermediates
    encoder._intermediates = None  # the hook fallback, as models without forward_intermediates run
    try:
        hooked = encoder.encode(pixels, layers)
    finally:
        encoder._intermediates = index
    for a, b in zip(official, hooked):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert torch.equal(encoder.encode(pixels, [1])[0], official[1])  # stopping early changes nothing


def test_timm_models_without_matching_intermediates_fall_back_to_hooks():
    from prh_stitch.encoders.timm_backend import TimmEncoder

    encoder = TimmEncoder("test_byobnet", pretrained=False)
    assert encoder._intermediates is None
    features = encoder.encode(torch.zeros(1, *encoder.data_config["input_size"]), list(range(encoder.num_layers)))
    assert len(features) == encoder.num_layers


# ---------------------------------------------------------------------------------------------- end to end
def test_evaluate_align_extracts_and_scores_every_family(zoo, tmp_path):
    from prh_stitch.cli.evaluate import main
    from prh_stitch.data.shards import write_shards
    from prh_stitch.data.sources import scenes

    write_shards(list(scenes(48, seed=3, size=48, split="val")), tmp_path / "data", prefix="val", samples_per_shard=48)
    out = tmp_path / "align"
    vision, text = [zoo["vit"], zoo["clip_vision"], zoo["oc_vision"]], [zoo["clip_text"], zoo["oc_text"]]
    args = ["align", "--vision", ",".join(vision), "--text", ",".join(text), "--data", str(tmp_path / "data" / "val-*.tar"),
            "--out", str(out), "--metrics", "mutual_knn", "--k", "5", "--permutations", "3", "--bootstrap", "3",
            "--max-null", "2", "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    records = json.loads((out / "alignment.json").read_text())["records"]
    assert {(r["model_a"], r["model_b"]) for r in records} == {(v, t) for v in vision for t in text}
    encoders = {name: build_encoder(name) for name in vision + text}
    for r in records:
        a, b = encoders[r["model_a"]], encoders[r["model_b"]]
        assert (len(r["matrix"]), len(r["matrix"][0])) == (a.num_layers, b.num_layers)
        assert r["fingerprint_a"]["encoder_fingerprint"] == a.fingerprint(list(range(a.num_layers)), None)
        assert 0.0 <= r["score"] <= 1.0


# tiny.yaml mean-pools the target; a tower's `projection` is pooled by the model, so those runs say pooling head.
@pytest.mark.parametrize("pair, target_layer", [(("vit", "clip_text"), ["--model.target.layer=-2"]),
                                                (("clip_vision", "oc_text"), ["--model.target.pooling=head"]),
                                                (("oc_vision", "clip_text"), ["--model.target.pooling=head"])])
def test_training_runs_with_every_family(zoo, tmp_path, pair, target_layer):
    import prh_stitch
    from prh_stitch.cli import build_cli, fit

    tiny = str(Path(prh_stitch.__file__).resolve().parent / "configs" / "tiny.yaml")
    source, target = (zoo[p] for p in pair)
    cli = build_cli(["--config", tiny, "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar=false",
                     "--model.source.name", source, "--model.target.name", target, "--trainer.max_epochs=1",
                     "--data.scenes.n_train=64", "--data.scenes.n_val=32", "--data.batch_size=32", *target_layer])
    assert cli.model.source_encoder.name == source and cli.model.target_encoder.name == target
    fit(cli)
    assert "last.ckpt" in {p.name for p in tmp_path.glob("**/*.ckpt")}
    assert cli.trainer.global_step == 2  # 64 training scenes in batches of 32: both batches ran
    assert all(torch.isfinite(p).all() for p in cli.model.stitcher.parameters())


# ------------------------------------------------------------------------------- which layers a pooling applies to
@pytest.mark.parametrize("family", ["vit", "clip_vision", "clip_text", "oc_vision", "oc_text"])
def test_pooled_layers_are_exactly_the_layers_that_take_the_pooling(zoo, family):
    """``pooled_layers(p)`` lists every layer ``encode`` accepts with pooling ``p``, and only those: the model's
    own head layer takes None or "head", every other layer None or an explicit pooler."""
    encoder = build_encoder(zoo[family])
    batch = _batch(encoder, _images() if encoder.modality == "image" else CAPTIONS)
    everything = list(range(encoder.num_layers))
    explicit = "mean"
    assert encoder.pooled_layers(None) == everything
    head = [i for i, name in enumerate(encoder.layer_names) if name == encoder.head_layer]
    assert (family == "vit") == (head == [])  # a plain ViT has no head layer; the CLIP towers end in their projection
    assert encoder.pooled_layers("head") == head and encoder.pooled_layers(explicit) == [i for i in everything if i not in head]
    for pooling in (None, "head", explicit):
        taken = encoder.pooled_layers(pooling)
        if taken:
            assert len(encoder.encode(batch, taken, pooling)) == len(taken)
        for layer in set(everything) - set(taken):
            with pytest.raises(ValueError, match="pool"):
                encoder.encode(batch, [layer], pooling)


def test_align_with_an_explicit_text_pooling_scores_every_layer_it_applies_to(zoo, tmp_path):
    """A CLIP text tower mean-pooled (as the paper's protocol pools text) is scored on its hidden states; its
    projection, which the model pools itself, is left out instead of failing the run."""
    from prh_stitch.alignment.align import align
    from prh_stitch.alignment.settings import Inputs
    from prh_stitch.data.shards import write_shards
    from prh_stitch.data.sources import scenes

    write_shards(list(scenes(32, seed=3, size=48, split="val")), tmp_path / "data", prefix="val", samples_per_shard=32)
    text = build_encoder(zoo["clip_text"])
    result = align({"vision": [zoo["vit"]], "text": [{"name": zoo["clip_text"], "pooling": "mean"}]},
                   str(tmp_path / "data" / "val-*.tar"), ("mutual_knn",), k=5, permutations=2, bootstrap=2,
                   max_null=1, inputs=Inputs(cache_dir=str(tmp_path / "cache"), device="cpu", progress=False))
    (record,) = result.records
    assert record["layers_b"] == [n for n in text.layer_names if n != "projection"]
    assert len(record["matrix"][0]) == text.num_layers - 1
