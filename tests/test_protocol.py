"""--protocol paper: the paper's clamp, layer sets and L2 normalisation against an independent transcription of its
formula on real scene features; the paper's bits per byte against a token-by-token brute force; protocol names."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from prh_stitch.cli.evaluate import main
from prh_stitch.data.features import FeatureStore, align_by_key, default_cache_dir
from prh_stitch.data.shards import expand_urls, write_shards
from prh_stitch.data.sources import scenes
from prh_stitch.encoders import build_encoder
from prh_stitch.errors import UserError

FAST = ["--permutations", "3", "--bootstrap", "0", "--max-null", "0", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("protocol_scenes")
    write_shards(list(scenes(64, seed=5, size=48, split="val")), folder, prefix="val", samples_per_shard=64)
    return str(folder / "val-*.tar")


def stored(name, pattern):
    encoder = build_encoder(name)
    return FeatureStore(default_cache_dir() / "features").get(encoder, expand_urls(pattern),
                                                              list(range(encoder.num_layers)), None, progress=False)


# ---- a transcription of the paper's formula, in NumPy, written from its description ---------------------------

def paper_prepare(layers, q=0.95):
    """Clamp at t = mean over samples of each sample's (linearly interpolated) q quantile of |x| over all its layers,
    then L2-normalise each layer's rows."""
    joint = np.concatenate(layers, axis=1)
    t = np.quantile(np.abs(joint), q, axis=1).mean()
    return [x / np.linalg.norm(x, axis=1, keepdims=True) for x in (np.clip(x, -t, t) for x in layers)], t


def paper_mutual_knn(x, y, k=10):
    """Mean over rows of |kNN_x(i) ∩ kNN_y(i)| / k, neighbours by inner product, the row itself excluded."""
    def neighbours(z):
        sim = z @ z.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]

    nx, ny = neighbours(x), neighbours(y)
    return float(np.mean([len(set(nx[i]) & set(ny[i])) / k for i in range(len(x))]))


def test_paper_protocol_mutual_knn_equals_the_papers_formula(shards, tmp_path):
    out = tmp_path / "paper"
    assert main(["align", "--vision", "tiny_vit", "--text", "tiny_bert", "--data", shards, "--out", str(out),
                 "--metrics", "mutual_knn", "--k", "10", "--protocol", "paper", *FAST]) == 0
    report = json.loads((out / "alignment.json").read_text())
    (r,) = report["records"]
    fa, fb = stored("tiny_vit", shards), stored("tiny_bert", shards)
    ia, ib = align_by_key(fa, fb)
    vision_names = [n for n in fa.info["layers"] if n != "pre_logits"]  # the paper: block outputs only
    text_names = list(fb.info["layers"])  # every hidden state, embedding output included
    assert r["layers_a"] == vision_names and r["layers_b"] == text_names
    a, ta = paper_prepare([fa.features[n][ia].double().numpy() for n in vision_names])
    b, tb = paper_prepare([fb.features[n][ib].double().numpy() for n in text_names])
    raw_a = np.concatenate([fa.features[n].numpy() for n in vision_names], axis=1)
    assert 0 < np.mean(np.abs(raw_a) > ta) < 0.2  # the clamp is live: it changes a few percent of the values
    expected = np.array([[paper_mutual_knn(x, y) for y in b] for x in a])
    assert np.allclose(np.array(r["matrix"]), expected, atol=1e-4)
    assert r["score"] == pytest.approx(expected.max(), abs=1e-4)
    assert r["matrix"][r["layer_a"]][r["layer_b"]] == pytest.approx(expected.max(), abs=1e-4)
    # Named everywhere: JSON header and record, the markdown, the CSV's protocol column.
    assert report["protocol"]["name"] == "paper" and r["protocol"] == "paper"
    assert report["settings"]["outlier_quantile"] == 0.95 and "bits per byte averaged per caption" in \
        report["protocol"]["description"]
    assert "**Protocol: paper**" in (out / "alignment.md").read_text()
    rows = list(__import__("csv").DictReader((out / "alignment.csv").read_text().splitlines()))
    assert len(rows) == 2 and all(row["protocol"] == "paper" for row in rows)
    # The default protocol on the same data: its own layers (pre_logits kept), its own cache entry.
    assert main(["align", "--vision", "tiny_vit", "--text", "tiny_bert", "--data", shards, "--out",
                 str(tmp_path / "own"), "--metrics", "mutual_knn", "--k", "10", *FAST]) == 0
    own = json.loads((tmp_path / "own" / "alignment.json").read_text())
    assert own["protocol"]["name"] == "prh_stitch" and own["records"][0]["layers_a"][-1] == "pre_logits"


def test_paper_threshold_equals_numpy_in_row_blocks_and_per_layer_for_mixed_widths(monkeypatch):
    import prh_stitch.metrics.outliers as outliers

    gen = torch.Generator().manual_seed(0)
    layers = [torch.randn(37, 11, generator=gen) * (i + 1) for i in range(3)]
    expected = np.quantile(np.abs(np.concatenate([x.double().numpy() for x in layers], axis=1)), 0.95, axis=1).mean()
    assert float(outliers.paper_outlier_threshold(layers, 0.95)) == pytest.approx(expected, rel=1e-6)
    monkeypatch.setattr(outliers, "_QUANTILE_LIMIT", 50)  # forces blocks of 1 row: the same threshold
    assert float(outliers.paper_outlier_threshold(layers, 0.95)) == pytest.approx(expected, rel=1e-6)
    clamped = outliers.clamp_outliers_paper(layers, 0.95)
    # One threshold for all layers: the widest-spread layer reaches it, the narrow first one mostly stays below.
    assert all(float(c.abs().max()) <= expected * (1 + 1e-6) for c in clamped)
    assert float(clamped[-1].abs().max()) == pytest.approx(expected, rel=1e-6)
    assert torch.equal(clamped[0], layers[0].clamp(-float(expected), float(expected)).float()) or \
        torch.allclose(clamped[0], layers[0].clamp(-float(expected), float(expected)), atol=1e-6)
    mixed = [layers[0], torch.randn(37, 5, generator=gen) * 100]  # CNN-like stages: each its own threshold
    for x, c in zip(mixed, outliers.clamp_outliers_paper(mixed, 0.9)):
        t = np.quantile(np.abs(x.double().numpy()), 0.9, axis=1).mean()
        assert float(c.abs().max()) == pytest.approx(t, rel=1e-6)
    assert outliers.clamp_outliers_paper(layers, None)[0] is layers[0]
    sparse = torch.zeros(10, 40)
    sparse[0, 0] = 1.0  # every sample's 0.95 quantile is 0: clamping would zero the one signal
    with pytest.raises(ValueError, match=re.escape("threshold of |x| is 0")):
        outliers.clamp_outliers_paper([sparse], 0.95)


def test_protocol_settings_and_errors(shards, tmp_path, capsys):
    from prh_stitch.alignment import ScoreSettings
    from prh_stitch.alignment.align import Model
    from prh_stitch.alignment.protocol import check_poolings
    from prh_stitch.encoders import EncoderSpec

    assert ScoreSettings(protocol="paper").checked().outlier_quantile == 0.95
    assert ScoreSettings(protocol="paper", outlier_quantile=0.99).checked().outlier_quantile == 0.99
    assert ScoreSettings().checked().outlier_quantile is None
    with pytest.raises(UserError, match="--protocol 'Paper': use prh_stitch"):
        ScoreSettings(protocol="Paper").checked()
    with pytest.raises(UserError, match="mean-pools text"):
        check_poolings([Model("t", EncoderSpec("tiny_bert", pooling="cls"), "text")], "paper")
    with pytest.raises(UserError, match="pools image blocks the natural way"):
        check_poolings([Model("v", EncoderSpec("tiny_vit", pooling="mean"), "vision")], "paper")
    check_poolings([Model("t", EncoderSpec("tiny_bert", pooling="cls"), "text")], "prh_stitch")
    out = tmp_path / "bad"
    assert main(["align", "--vision", "tiny_vit", "--text", "tiny_bert", "--data", shards, "--out", str(out),
                 "--protocol", "theirs", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evaluate.py: error:") and "protocol" in err and len(err.splitlines()) == 1
    assert not out.exists()
    # stitch has no layer sets to choose: the option is align's and study's only.
    assert main(["stitch", "--baseline", "ridge", "--data", shards, "--out", str(out), "--protocol", "paper"]) == 2
    assert "protocol" in capsys.readouterr().err


# ---- bits per byte: the paper's per-caption definition against a brute force on a tiny GPT-2 -----------------

TEXTS = ["a red circle", "two small blue squares on a gray background", "é – ünïcode bytes count"]


def word_tokenizer():
    """A GPT-2-like tokenizer without a BOS: word level over the test texts, an EOS but nothing added to texts."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in TEXTS for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(t)})
    vocab = {w: i for i, w in enumerate(["[UNK]", "[EOS]"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


@pytest.fixture(scope="module")
def tokenizers_and_models():
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from prh_stitch.encoders.builtins import minilm_folder

    out = []
    for tokenizer in (word_tokenizer(), AutoTokenizer.from_pretrained(minilm_folder())):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer))).eval()
        out.append((tokenizer, model))
    return out


def brute_force_per_caption(model, tokenizer):
    """Per caption: the tokenizer's own encoding, every token after the first predicted from all before it (one
    forward pass each), nats → bits, / the caption's UTF-8 bytes; then the mean over captions."""
    values = []
    with torch.no_grad():
        for text in TEXTS:
            ids = tokenizer(text)["input_ids"]
            nats = 0.0
            for t in range(1, len(ids)):
                logits = model(input_ids=torch.tensor([ids[:t]])).logits[0, -1]
                nats -= float(torch.log_softmax(logits.double(), -1)[ids[t]])
            values.append(nats / math.log(2) / len(text.encode("utf-8")))
    return sum(values) / len(values)


def test_paper_bits_per_byte_equals_a_brute_force(tokenizers_and_models):
    from prh_stitch.alignment.competence import bits_per_byte

    no_bos, bert_like = tokenizers_and_models
    for tokenizer, model in (no_bos, bert_like):
        result = bits_per_byte(model, tokenizer, TEXTS, batch_size=2, definition="per_caption")
        assert result["bits_per_byte"] == pytest.approx(brute_force_per_caption(model, tokenizer), rel=1e-5)
        assert result["definition"] == "per_caption"
        assert result["tokens"] == sum(len(tokenizer(t)["input_ids"]) - 1 for t in TEXTS)  # first one unscored
        pooled = bits_per_byte(model, tokenizer, TEXTS, batch_size=2)
        assert pooled["definition"] == "pooled" and pooled["bits_per_byte"] != pytest.approx(result["bits_per_byte"])
    tokenizer, model = no_bos
    assert tokenizer.bos_token_id is None and tokenizer("a red circle")["input_ids"][0] != tokenizer.eos_token_id
    # The pooled definition scores every text token after the start token (EOS here): one more per text.
    pooled = bits_per_byte(model, tokenizer, TEXTS)
    assert pooled["tokens"] == sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)
    with pytest.raises(ValueError, match="definition 'paper'"):
        bits_per_byte(model, tokenizer, TEXTS, definition="paper")
    with pytest.raises(ValueError, match="has no tokens to score"):
        bits_per_byte(model, tokenizer, ["circle"], definition="per_caption")  # one token: nothing to score


def test_shipped_prh_config_uses_the_papers_protocol():
    from prh_stitch.alignment.study_config import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    prh = load_config(str(root / "study_prh.yaml"))
    assert prh.protocol == "paper" and prh.outlier_quantile in (None, 0.95)
    text = (root / "study_prh.yaml").read_text()
    assert "protocol: paper" in text
    assert load_config(str(root / "study_offline.yaml")).protocol == "prh_stitch"
