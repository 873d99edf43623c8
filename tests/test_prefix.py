"""Prefix stitching (image features -> input embeddings of a frozen causal LM) on tiny models and planted data."""

import math

import pytest
import torch

from prh_stitch.alignment.competence import bits_per_byte
from prh_stitch.data.datamodule import PairDataset, StitchingDataModule, caption_groups
from prh_stitch.prefix import PrefixStitchingModule, load_language_model, load_prefix_map
from prh_stitch.prefix.captions import caption_nats, greedy_captions, tokenize_captions
from prh_stitch.prefix.evaluation import bootstrap_bits_per_byte, derangement

PLANTED_WORDS = ("red", "green", "blue")


class PlantedCaptions(StitchingDataModule):
    """Features whose class (one of three) decides each caption's first word; everything after it is the same.

    No LM can guess the first word without the image (one of three, equally often), while a map that reads the
    class from the features and writes it into the prefix can: the planted token of the issue.
    """

    def __init__(self, cache_dir, sizes=(192, 48, 48), batch_size=32):
        super().__init__(cache_dir=str(cache_dir), batch_size=batch_size)
        self.sizes = dict(zip(("train", "val", "test"), sizes))

    def prepare_features(self, requests, device="cpu"):
        pass

    def setup_features(self, source, target):
        dim = source.encoder.feature_dim(source.layer, source.pooling)
        g = torch.Generator().manual_seed(0)
        directions = torch.randn(len(PLANTED_WORDS), dim, generator=g)
        for split, n in self.sizes.items():
            label = torch.arange(n) % len(PLANTED_WORDS)
            x = 2.0 * directions[label] + 0.3 * torch.randn(n, dim, generator=g) + 5.0  # the norm must centre it
            captions = [f"{PLANTED_WORDS[int(c)]} circle" for c in label]
            self.captions[split] = captions
            self.datasets[split] = PairDataset(x, x, torch.arange(n), caption_groups(captions))
            self.skipped[split] = {}


def tiny_module(**kwargs):
    options = dict(source={"name": "tiny_vit"}, language_model="tiny_gpt2", n_prefix=4, lr=0.03)
    return PrefixStitchingModule(**{**options, **kwargs})


def trainer_for(root, max_epochs):
    from pytorch_lightning import Trainer
    from pytorch_lightning.loggers import CSVLogger

    return Trainer(default_root_dir=str(root), max_epochs=max_epochs, accelerator="cpu", devices=1,
                   logger=CSVLogger(str(root)), enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    model, data = tiny_module(), PlantedCaptions(root / "cache")
    lm_before = {k: v.clone() for k, v in model.lm.model.state_dict().items()}
    map_before = {k: v.clone() for k, v in model.stitcher.state_dict().items()}
    trainer = trainer_for(root, max_epochs=25)  # 150 steps
    trainer.fit(model, datamodule=data)
    trainer.save_checkpoint(root / "end.ckpt")
    return model, data, lm_before, map_before, root


def _test_split(model, data):
    features = data.datasets["test"].tensors[0]
    tokens = tokenize_captions(model.lm, data.captions["test"])
    return features, tokens


def _bpb(nats, tokens):
    return float(nats.sum() / math.log(2) / tokens.bytes.sum())


def test_the_lm_alone_is_the_competence_modules_bits_per_byte():
    """With no prefix, the caption score is bits_per_byte(pooled) of the competence module, to rounding."""
    lm = load_language_model("tiny_gpt2")
    captions = ["a small red star on a gray background", "from left to right: a large blue circle, two small "
                "green squares and a small pink hexagon on a beige background", "two large brown stars above a "
                "small orange diamond on a black background"]
    tokens = tokenize_captions(lm, captions)
    reference = bits_per_byte(lm.model, lm.tokenizer, captions, definition="pooled", progress=False)
    assert _bpb(caption_nats(lm, None, tokens), tokens) == pytest.approx(reference["bits_per_byte"], rel=1e-6)
    assert int(tokens.text.sum()) == reference["tokens"]


def test_a_tiny_lm_learns_to_emit_the_planted_token_from_the_prefix(planted):
    model, data, *_ = planted
    features, tokens = _test_split(model, data)
    with torch.no_grad():
        prefix = model.prefix(features)
        generated = greedy_captions(model.lm, prefix, max_new_tokens=4)
        conditional = _bpb(caption_nats(model.lm, prefix, tokens), tokens)
        alone = _bpb(caption_nats(model.lm, None, tokens), tokens)
    first_words = [text.split()[0] if text else "" for text in generated]
    right = sum(w == caption.split()[0] for w, caption in zip(first_words, data.captions["test"]))
    # Chance is 1/3 (three planted words); 150 steps of a tiny LM reach all or nearly all of the 48, and the exact
    # count varies with the float summation order of the platform's kernels, so demand 90 %, far above chance.
    assert right >= 0.9 * len(first_words), (right, first_words)
    # The first word is log2(3) bits the LM alone cannot know: the prefix must remove them, and the template's.
    assert conditional < 0.2 * alone, (conditional, alone)


def test_the_shuffled_image_control_loses_the_planted_information(planted):
    model, data, *_ = planted
    features, tokens = _test_split(model, data)
    perm = derangement(len(features), torch.Generator().manual_seed(0))
    labels = torch.arange(len(features)) % len(PLANTED_WORDS)
    with torch.no_grad():
        own = caption_nats(model.lm, model.prefix(features), tokens)
        shuffled = caption_nats(model.lm, model.prefix(features[perm]), tokens)
    other_class = labels[perm] != labels
    # Where the shuffled image is of another class its prefix names the wrong word: far worse than the own image.
    assert bool((shuffled[other_class] > own[other_class] + 1.0).all())
    report = bootstrap_bits_per_byte({"prefix": own, "shuffled": shuffled}, tokens.bytes, 500, 0.95,
                                     torch.Generator().manual_seed(1))
    assert report["shuffled_minus_prefix"]["interval"][0] > 0


def test_the_frozen_lm_is_unchanged_and_only_the_map_trains(planted):
    model, _, lm_before, map_before, _ = planted
    for name, value in model.lm.model.state_dict().items():
        assert torch.equal(value, lm_before[name]), name
    assert not any(p.requires_grad for p in model.lm.model.parameters())
    assert not model.lm.model.training
    assert any(not torch.equal(v, map_before[k]) for k, v in model.stitcher.state_dict().items())
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in model.stitcher.named_parameters(prefix="stitcher")}


def test_checkpoint_and_folder_round_trip_give_the_same_prefix(planted, tmp_path):
    from prh_stitch.checkpoint import read_checkpoint
    from prh_stitch.model_folder import save_stitcher_folder

    model, data, _, _, root = planted
    checkpoint = read_checkpoint(root / "end.ckpt")  # weights_only: nothing is unpickled
    assert not any(k.startswith("lm") or "wte" in k for k in checkpoint["state_dict"])  # no LM weights inside
    features = data.datasets["test"].tensors[0]
    with torch.no_grad():
        expected = model.prefix(features)
        from_ckpt = load_prefix_map(root / "end.ckpt")
        folder = save_stitcher_folder(root / "end.ckpt", tmp_path / "map")
        from_folder = load_prefix_map(folder)
        assert (folder / "model.safetensors").is_file()
        for loaded in (from_ckpt, from_folder):
            assert (loaded.n_prefix, loaded.language_model) == (4, "tiny_gpt2")
            torch.testing.assert_close(loaded(features), expected)


def test_a_feature_stitcher_checkpoint_is_not_taken_for_a_prefix_map(tmp_path):
    from prh_stitch.module import StitchingModule

    module = StitchingModule(source={"name": "tiny_vit"}, target={"name": "tiny_bert"})
    path = tmp_path / "stitcher.ckpt"
    torch.save({"state_dict": {f"stitcher.{k}": v for k, v in module.stitcher.state_dict().items()},
                "prh_stitch": {"stitcher": module.stitcher.config(), "source": {"name": "tiny_vit"},
                               "target": {"name": "tiny_bert"}, "objective": {"name": "contrastive"}}}, path)
    with pytest.raises(ValueError, match="not a prefix map"):
        load_prefix_map(path)


def test_bad_settings_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="n_prefix must be >= 1"):
        tiny_module(n_prefix=0)
    with pytest.raises(ValueError, match="unknown language model"):
        tiny_module(language_model="tiny_gpt3")
    with pytest.raises(ValueError, match="max_caption_tokens"):
        tokenize_captions(load_language_model("tiny_gpt2"), ["a small red star"], max_tokens=2)
