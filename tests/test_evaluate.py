"""evaluate.py end to end with tiny random encoders and shards written here: stitch, align, study, bad input."""

import csv
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from prh_stitch.alignment.scoring import selection_aware
from prh_stitch.alignment.settings import ScoreSettings
from prh_stitch.checkpoint import CHECKPOINT_KEY
from prh_stitch.data.datamodule import caption_groups
from prh_stitch.data.features import FeatureStore, align_by_key, default_cache_dir
from prh_stitch.data.shards import write_shards
from prh_stitch.data.sources import scenes
from prh_stitch.encoders import EncoderSpec, build_encoder
from prh_stitch.cli.evaluate import main
from prh_stitch.losses import build_loss
from prh_stitch.metrics import calibrate, layer_alignment, retrieval
from prh_stitch.stitchers import Stitcher

FAST = ["--permutations", "5", "--bootstrap", "10", "--max-null", "2", "--no-progress", "--device", "cpu"]


def write_scene_shards(folder, n, shuffle_captions=False, prefix="val", split="val"):
    samples = list(scenes(n, seed=3, size=48, split=split))
    if shuffle_captions:  # a planted null: captions describe other images
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
        samples = [(k, img, samples[order[i]][2], meta) for i, (k, img, _, meta) in enumerate(samples)]
    write_shards(samples, folder, prefix=prefix, samples_per_shard=64)
    return str(Path(folder) / f"{prefix}-*.tar")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_scene_shards(tmp_path_factory.mktemp("scenes"), 96)


def store_features(name, pattern, layers=None, pooling=None):
    """The feature store read directly, as the reports should have read it."""
    from prh_stitch.data.shards import expand_urls

    encoder = build_encoder(name)
    layers = list(range(encoder.num_layers)) if layers is None else layers
    return FeatureStore(default_cache_dir() / "features").get(encoder, expand_urls(pattern), layers, pooling,
                                                              progress=False)


def ordered(fs):
    return [fs.features[n] for n in fs.info["layers"]]


def ordered_names(fs):
    return list(fs.info["layers"])


def identity_checkpoint(path, name="tiny_bert", objective="contrastive", scale=20.0, fingerprints=None):
    """A StitchingModule-style checkpoint whose stitcher is exactly the identity (``fingerprints``: the encoders'
    recorded ones, {"source_fingerprint": ..., "target_fingerprint": ...}; none recorded by default)."""
    dim = build_encoder(name).feature_dim(-1, None)
    stitcher = Stitcher("linear", dim, dim, "none", "none")
    with torch.no_grad():
        stitcher.core.weight.copy_(torch.eye(dim))
    state = {f"stitcher.{k}": v for k, v in stitcher.state_dict().items()}
    if objective == "contrastive":
        state["objective.log_logit_scale"] = torch.tensor(math.log(scale))
    spec = EncoderSpec(name=name).to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "global_step": 7, CHECKPOINT_KEY: {
        "format": 1, "version": "0.1.0", "stitcher": stitcher.config(), "source": spec, "target": dict(spec),
        "source_layer": "layers.1", "target_layer": "layers.1", **(fingerprints or {}),
        "objective": {"name": objective, "options": {}}}}, path)
    return path


def test_align_reports_equal_the_metric_functions_and_rerun_from_the_caches(data, tmp_path):
    out = tmp_path / "align"
    args = ["align", "--vision", "tiny_vit", "--text", "tiny_bert", "--data", data, "--out", str(out),
            "--metrics", "mutual_knn,cka", "--k", "5", *FAST]
    assert main(args) == 0
    report = json.loads((out / "alignment.json").read_text())
    for key in ("version", "config", "encoders", "device", "seed", "settings"):
        assert key in report, key
    assert {r["metric"] for r in report["records"]} == {"mutual_knn", "cka"}
    fa, fb = store_features("tiny_vit", data), store_features("tiny_bert", data)
    ia, ib = align_by_key(fa, fb)
    a, b = [x[ia] for x in ordered(fa)], [x[ib] for x in ordered(fb)]
    for r in report["records"]:
        for field in ("model_a", "model_b", "metric", "score", "layer_a", "layer_b", "chance", "null_mean",
                      "null_std", "calibrated", "ci_low", "ci_high"):
            assert field in r, field
        opts = {"k": 5} if r["metric"] == "mutual_knn" else {}
        table = layer_alignment(a, b, r["metric"], **opts)
        assert r["matrix"] == table["scores"].tolist()
        assert (r["layer_a"], r["layer_b"]) == tuple(table["best_index"])
        cal = calibrate(r["metric"], a[r["layer_a"]], b[r["layer_b"]], permutations=5, bootstrap=10, seed=0, **opts)
        for key in ("score", "chance", "null_mean", "null_std", "calibrated", "p_value", "p_resolution"):
            assert r[key] == pytest.approx(cal[key], abs=1e-12), key
        sel = selection_aware(a, b, table["scores"], r["metric"], opts, ScoreSettings(k=5, bootstrap=10), "cpu")
        for key in ("ci_low", "ci_high", "interval_method", "selection_stability"):  # the pair re-selected in halves
            assert r[key] == pytest.approx(sel[key], abs=1e-12), key
        last = calibrate(r["metric"], a[-1], b[-1], permutations=5, bootstrap=10, seed=0, **opts)
        assert r["last"]["score"] == pytest.approx(last["score"]) and r["last"]["layer_a"] == len(a) - 1
        vit = build_encoder("tiny_vit")
        assert r["fingerprint_a"]["encoder_fingerprint"] == vit.fingerprint(list(range(vit.num_layers)), None)
    rows = (out / "alignment.csv").read_text().splitlines()
    # best and last per record; the protocol named in every row; the contextual best on the best row.
    header = rows[0].split(",")
    assert rows[0].startswith("model_a,model_b,metric,pair,score") and len(rows) == 1 + 2 * 2
    assert header[-4:] == ["protocol", "contextual_score", "contextual_layer_a_name", "contextual_layer_b_name"]
    assert all(row.split(",")[header.index("protocol")] == "prh_stitch" for row in rows[1:])
    table = {(row["metric"], row["pair"]): row for row in
             __import__("csv").DictReader((out / "alignment.csv").read_text().splitlines())}
    assert report["protocol"]["name"] == "prh_stitch" and report["settings"]["protocol"] == "prh_stitch"
    assert "**Protocol: prh_stitch**" in (out / "alignment.md").read_text()
    names_b = ordered_names(fb)
    for r in report["records"]:
        keep_b = [j for j, n in enumerate(names_b) if n != "embeddings"]
        expected = max(r["matrix"][i][j] for i in range(len(a)) for j in keep_b)
        assert "embeddings" in names_b and r["contextual"]["score"] == expected
        assert r["contextual"]["layer_b_name"] != "embeddings" and r["contextual"]["excluded"] == ["embeddings"]
        assert r["protocol"] == "prh_stitch"
        best_row = table[(r["metric"], "best (max over layer pairs)")]
        assert float(best_row["contextual_score"]) == pytest.approx(expected)
        assert best_row["contextual_layer_b_name"] == r["contextual"]["layer_b_name"]
        assert table[(r["metric"], "last layers")]["contextual_score"] == ""
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["layers_cka_tiny_vit__tiny_bert.png", "layers_mutual_knn_tiny_vit__tiny_bert.png",
                    "models_cka.png", "models_mutual_knn.png"]
    assert "maximum over all layer pairs" in (out / "alignment.md").read_text()
    # A second run reads features and pair scores back: identical records.
    assert main(args + ["--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "alignment.json").read_text())
    assert again["records"] == report["records"]


def test_identity_stitcher_between_identical_encoders_is_perfect(data, tmp_path):
    ckpt = identity_checkpoint(tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt")
    out = tmp_path / "stitch"
    assert main(["stitch", "--ckpt", str(ckpt), "--data", data, "--out", str(out), "--metrics", "mutual_knn,cka",
                 "--k", "5", "--loss-batch-size", "32", *FAST]) == 0
    report = json.loads((out / "stitch.json").read_text())
    assert report["retrieval"]["a2b/recall@1"] == 1.0 and report["retrieval"]["b2a/recall@1"] == 1.0
    assert report["retrieval"]["mean_cosine"] == pytest.approx(1.0)
    assert report["alignment"]["mutual_knn"]["stitched"]["score"] == 1.0
    assert report["alignment"]["mutual_knn"]["raw"]["score"] == 1.0
    assert report["alignment"]["cka"]["stitched"]["score"] == pytest.approx(1.0)
    # The loss is the checkpoint's objective with its trained temperature, over consecutive batches of 32.
    feats = store_features("tiny_bert", data)
    x = feats.features["layers.1"]
    loss = build_loss("contrastive")
    loss.log_logit_scale.data.fill_(math.log(20.0))
    with torch.no_grad():
        expected = sum(float(loss(x[i:i + 32], x[i:i + 32])) * len(x[i:i + 32]) for i in range(0, len(x), 32)) / len(x)
    assert report["loss"]["value"] == pytest.approx(expected, rel=1e-5)
    for key in ("version", "config", "encoders", "device", "seed", "settings", "n"):
        assert key in report, key
    bert = build_encoder("tiny_bert")
    assert report["n"] == 96
    assert report["encoders"]["source"]["encoder_fingerprint"] == bert.fingerprint(list(range(bert.num_layers)), None)
    # Source is text here: zero-shot applies to image features only when the target embeds the prompts; it does.
    assert "zero_shot" in report
    assert list((tmp_path / "run" / "version_0" / "evaluate").glob("events.out.tfevents.*"))
    assert "| a2b | 1.0000" in (out / "stitch.md").read_text()


def test_zero_shot_and_retrieval_equal_brute_force(data, tmp_path):
    ckpt = tmp_path / "vit2bert.ckpt"
    stitcher = random_affine_checkpoint(ckpt)
    out = tmp_path / "zs"
    assert main(["stitch", "--ckpt", str(ckpt), "--data", data, "--out", str(out), "--metrics", "mutual_knn",
                 "--k", "5", "--source", "tiny_vit", "--tensorboard", "none", *FAST]) == 0
    report = json.loads((out / "stitch.json").read_text())
    fa, fb = store_features("tiny_vit", data), store_features("tiny_bert", data)
    ia, ib = align_by_key(fa, fb)
    with torch.no_grad():
        mapped = stitcher(fa.features["pre_logits"][ia])
    target = fb.features["layers.1"][ib]
    captions = [fa.captions[i] for i in ia.tolist()]
    expected = retrieval(mapped, target, groups=caption_groups(captions))
    for key, value in expected.items():
        assert report["retrieval"][key] == pytest.approx(value), key
    assert report["loss"]["value"] == pytest.approx(float(F.mse_loss(mapped, target)), rel=1e-5)
    # Zero-shot by hand: scene labels are shape classes; prompts embedded by the target text encoder.
    from prh_stitch.data.scenes import SHAPES

    labels = torch.tensor([fa.labels[i] for i in ia.tolist()])
    classes = sorted(set(labels.tolist()))
    bert = build_encoder("tiny_bert")
    prompts = bert.encode(bert.collate([bert.transform(f"a photo of a {SHAPES[c]}") for c in classes]), [-1])[0]
    brute = 0
    for row, label in zip(mapped, labels.tolist()):
        sims = [float(F.cosine_similarity(row, p, dim=0)) for p in prompts]
        brute += classes[max(range(len(sims)), key=sims.__getitem__)] == label
    zs = report["zero_shot"]
    assert zs["classes"] == [SHAPES[c] for c in classes]
    assert zs["accuracy"] == pytest.approx(brute / len(labels))
    assert zs["chance_uniform"] == pytest.approx(1 / len(classes))
    assert zs["chance_majority"] == pytest.approx(max(labels.tolist().count(c) for c in classes) / len(labels))


def test_independent_encoders_land_near_chance(tmp_path):
    # Captions shuffled against their images: any image–text alignment would be an artefact.
    data = write_scene_shards(tmp_path / "null", 96, shuffle_captions=True)
    out = tmp_path / "null_report"
    assert main(["align", "--vision", "tiny_vit", "--text", "tiny_bert", "--data", data, "--out", str(out),
                 "--metrics", "mutual_knn", "--k", "5", "--permutations", "20", "--bootstrap", "10",
                 "--max-null", "3", "--no-progress", "--device", "cpu"]) == 0
    (r,) = json.loads((out / "alignment.json").read_text())["records"]
    last = r["last"]
    assert last["chance"] == pytest.approx(5 / 95)
    assert abs(last["calibrated"]) < 0.05 and abs(last["z"]) < 3.5
    assert abs(last["score"] - last["chance"]) < 0.03
    # The max over layer pairs is inflated above a single pair's chance; its own null explains it.
    assert r["score"] >= last["score"] and r["max_null_mean"] > last["chance"]
    assert abs(r["max_calibrated"]) < 0.05


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A tiny random GPT-2 saved as a local Hugging Face folder, with MiniLM's tokenizer as an offline stand-in."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from prh_stitch.encoders.builtins import minilm_folder

    folder = tmp_path_factory.mktemp("tiny_gpt2")
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, GPT2LMHeadModel.from_pretrained(folder).eval(), tokenizer


def test_bits_per_byte_equals_a_token_by_token_computation(tiny_lm):
    from prh_stitch.alignment.competence import bits_per_byte

    _, model, tokenizer = tiny_lm
    texts = ["a red circle", "two small blue squares on a gray background", "é – ünïcode bytes count"]
    nats = 0.0
    with torch.no_grad():
        for text in texts:
            ids = [tokenizer.cls_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
            for t in range(1, len(ids)):  # each token given everything before it, one forward pass each
                logits = model(input_ids=torch.tensor([ids[:t]])).logits[0, -1]
                nats -= float(torch.log_softmax(logits.double(), -1)[ids[t]])
    expected = nats / math.log(2) / sum(len(t.encode("utf-8")) for t in texts)
    result = bits_per_byte(model, tokenizer, texts, batch_size=2)
    assert result["bits_per_byte"] == pytest.approx(expected, rel=1e-5)
    assert result["bytes"] == sum(len(t.encode("utf-8")) for t in texts)


def test_correlations_equal_scipy():
    from scipy import stats

    from prh_stitch.alignment.competence import correlation_report, pearson, spearman, trend_sentence

    x, y = [75.1, 76.7, 77.5, 80.0, 81.0], [0.20, 0.22, 0.22, 0.30, 0.31]
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])
    rising = correlation_report(x, y, [[v + 0.001 * r for v in y] for r in range(5)])
    # Exact over the 5! orderings: |rho| >= 0.975 for the identity and the one swap of the tied pair, and mirrors.
    brute = sum(abs(stats.spearmanr(x, perm)[0]) >= abs(rising["spearman"]) - 1e-12
                for perm in __import__("itertools").permutations(y)) / 120
    assert rising["p_models"] == pytest.approx(brute) and rising["p_models"] <= 0.05
    assert rising["spearman_ci"][0] > 0 and trend_sentence(rising, True, "top-1").startswith("alignment rises")
    assert trend_sentence(rising, False, "bits per byte").startswith("alignment falls")
    three = correlation_report(x[:3], [0.2, 0.25, 0.3], [[0.2, 0.25, 0.3]] * 3)  # a perfect ranking of 3 models
    assert three["spearman"] == pytest.approx(1.0) and three["p_models"] == pytest.approx(2 / 6)  # itself, reversed
    assert trend_sentence(three, True, "x").startswith("no clear trend on this data (n = 3 models)")
    assert trend_sentence(correlation_report(x[:2], y[:2]), True, "x").startswith("no clear trend")


def test_study_end_to_end_with_measured_bits_per_byte(data, tiny_lm, tmp_path):
    from prh_stitch.alignment.competence import bits_per_byte

    lm_dir, model, tokenizer = tiny_lm
    config = tmp_path / "study.yaml"
    config.write_text(f"""
vision: [tiny_vit, tiny_resnet]
text: ["hf:{lm_dir}", tiny_bert]
data:
  - {{name: mine, shards: "{data}"}}
  - {{name: absent, fashion_mnist: {{n: 10}}, optional: true}}
metrics: [mutual_knn]
k: 5
permutations: 5
bootstrap: 10
max_null: 1
half_samples: 8
competence:
  vision: {{label: made-up score, scores: {{tiny_vit: 1.0, tiny_resnet: 2.0}}}}
  text: {{label: bits per byte, higher_is_better: false, measure: bits_per_byte}}
out: {tmp_path / "study"}
device: cpu
""")
    os.environ["PRH_STITCH_FASHION_MNIST"] = str(tmp_path / "no_such_dir")
    try:
        assert main(["study", "--config", str(config), "--no-progress"]) == 0
    finally:
        del os.environ["PRH_STITCH_FASHION_MNIST"]
    out = tmp_path / "study"
    summary = json.loads((out / "study.json").read_text())
    assert [d["name"] for d in summary["datasets"]] == ["mine"] and "absent" in summary["notes"][0]
    (mine,) = summary["datasets"]
    text_side = next(a for a in mine["competence"] if a["side"] == "text")
    gpt = next(p for p in text_side["points"] if p["model"].startswith("hf:"))
    captions = store_features("tiny_bert", data).captions
    assert gpt["competence"] == pytest.approx(bits_per_byte(model, tokenizer, captions)["bits_per_byte"], rel=1e-6)
    assert len(text_side["points"]) == 1 and "tiny_bert" in text_side["excluded"][0]  # not a causal LM
    vision_side = next(a for a in mine["competence"] if a["side"] == "vision")
    assert {p["model"] for p in vision_side["points"]} == {"tiny_vit", "tiny_resnet"}
    assert "no clear trend" in vision_side["sentence"] and "n = 2" in vision_side["sentence"]
    assert (out / "mine" / "competence_mutual_knn_vision.png").is_file()
    assert (out / "mine" / "alignment.json").is_file() and (out / "study.md").is_file()
    # The same figures in the dataset's TensorBoard folder, as PDF too, and every layer pair in the long table.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images = set()
    for events in (out / "mine" / "tensorboard").glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        images |= set(accumulator.Tags()["images"])
    assert {"competence/mutual_knn/vision", "competence/mutual_knn/text", "models/mutual_knn"} <= images
    assert (out / "mine" / "competence_mutual_knn_vision.pdf").read_bytes()[:5] == b"%PDF-"
    records = json.loads((out / "mine" / "alignment.json").read_text())["records"]
    with open(out / "mine" / "alignment_layers.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == sum(len(r["layers_a"]) * len(r["layers_b"]) for r in records)


class _Crash(RuntimeError):
    pass


def test_interrupted_study_resumes_from_the_store_and_the_score_cache(data, tmp_path, monkeypatch):
    import shutil

    import prh_stitch.alignment.scoring as scoring

    cache = tmp_path / "cache"
    config = tmp_path / "study.yaml"
    config.write_text(f"vision: [tiny_vit, tiny_resnet]\ntext: [tiny_bert]\ndata: [{{name: mine, shards: \"{data}\"}}]\n"
                      "metrics: [mutual_knn]\nk: 5\npermutations: 5\nbootstrap: 10\nmax_null: 1\nhalf_samples: 4\n"
                      f"competence: {{vision: {{scores: {{tiny_vit: 1.0, tiny_resnet: 2.0}}}}}}\n"
                      f"cache_dir: {cache}\ndevice: cpu\n")
    original, scored = scoring.paired, []

    def counting(fa, fb, device, crash_at=None):
        scored.append(1)
        if len(scored) == crash_at:
            raise _Crash("interrupted while scoring the second model pair")
        return original(fa, fb, device)

    def study(out):
        assert main(["study", "--config", str(config), "--out", str(tmp_path / out), "--no-progress"]) == 0
        return (json.loads((tmp_path / out / "mine" / "alignment.json").read_text())["records"],
                [dict(a, figure=None) for a in json.loads((tmp_path / out / "study.json").read_text())["datasets"][0]
                 ["competence"]])

    monkeypatch.setattr(scoring, "paired", lambda fa, fb, device: counting(fa, fb, device, crash_at=2))
    with pytest.raises(_Crash):
        main(["study", "--config", str(config), "--out", str(tmp_path / "first"), "--no-progress"])
    assert not (tmp_path / "first" / "study.json").exists() and len(list((cache / "scores").glob("*.json"))) == 1
    # The rerun: every feature from the store (no encoder runs) and the first pair's scores from the cache.
    monkeypatch.setattr(scoring, "paired", counting)
    monkeypatch.setattr(FeatureStore, "_extract", lambda *a, **k: pytest.fail("an encoder ran again on a warm store"))
    scored.clear()
    resumed = study("resumed")
    assert len(scored) == 1
    # Identical to the same study scored from scratch (same features, an empty score cache).
    shutil.rmtree(cache / "scores")
    scored.clear()
    fresh = study("fresh")
    assert len(scored) == 2 and resumed == fresh


def test_shipped_study_configs_are_valid():
    from prh_stitch.alignment.study_config import load_config

    offline = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "study_offline.yaml"))
    assert [s.name for s in offline.vision] == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    prh = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "study_prh.yaml"))
    assert all(s.name.startswith("timm:") for s in prh.vision) and all(s.pooling == "mean" for s in prh.text)
    assert prh.outlier_quantile == 0.95 and offline.outlier_quantile is None  # the paper's clamp; the default: off


# ---- bad input: one line on stderr, exit status 2, no report written ------------------------------------

def assert_user_error(capsys, argv, *fragments, out=None):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evaluate.py: error:") and "Traceback" not in err and len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    if out is not None:
        assert not Path(out).exists() or not any(Path(out).iterdir())


def test_checkpoint_encoders_that_differ_from_the_requested_ones(data, tmp_path, capsys):
    ckpt = identity_checkpoint(tmp_path / "id.ckpt")
    out = tmp_path / "out"
    assert_user_error(capsys, ["stitch", "--ckpt", str(ckpt), "--data", data, "--out", str(out), "--source",
                               "tiny_vit", *FAST], "tiny_bert", "tiny_vit", "--source", out=out)
    assert_user_error(capsys, ["stitch", "--ckpt", str(ckpt), "--data", data, "--out", str(out), "--target",
                               "minilm_l6", *FAST], "tiny_bert", "minilm_l6", "--target", out=out)


def test_a_stitcher_is_applied_only_to_the_encoders_it_was_trained_on(data, tmp_path, capsys):
    """The checkpoint records each encoder's fingerprint (weights, preprocessing, layer, pooling); evaluation builds
    the encoders again and refuses, with one line naming the side, when one gives another fingerprint."""
    true = build_encoder("tiny_bert").fingerprint([-1], None)
    good = identity_checkpoint(tmp_path / "good.ckpt", fingerprints={"source_fingerprint": true,
                                                                      "target_fingerprint": true})
    assert main(["stitch", "--ckpt", str(good), "--data", data, "--out", str(tmp_path / "good"), "--metrics",
                 "cka", *FAST]) == 0
    capsys.readouterr()
    for side in ("source", "target"):
        ckpt = identity_checkpoint(tmp_path / f"{side}.ckpt", fingerprints={
            "source_fingerprint": true, "target_fingerprint": true, f"{side}_fingerprint": "0" * 20})
        out = tmp_path / side
        assert_user_error(capsys, ["stitch", "--ckpt", str(ckpt), "--data", data, "--out", str(out), *FAST],
                          f"trained on {side} 'tiny_bert' with fingerprint {'0' * 20}", f"now gives {true}", out=out)


def test_stitch_refuses_the_papers_protocol_instead_of_clamping_per_layer_under_its_name(data, tmp_path):
    from prh_stitch.errors import UserError
    from prh_stitch.evaluation.stitch import evaluate_stitcher

    ckpt = identity_checkpoint(tmp_path / "id.ckpt")
    with pytest.raises(UserError, match="protocol='paper' applies to align and study only"):
        evaluate_stitcher(data, ckpt=str(ckpt), protocol="paper", metrics=("cka",))


def test_data_without_captions(tmp_path, capsys):
    import io
    import tarfile

    from PIL import Image

    shard = tmp_path / "nocap-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(12):
            buffer = io.BytesIO()
            Image.new("RGB", (16, 16), (i * 20, 0, 0)).save(buffer, format="PNG")
            for name, payload in ((f"{i:04d}.png", buffer.getvalue()), (f"{i:04d}.json", b'{"label": 1}')):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    out = tmp_path / "out"
    assert_user_error(capsys, ["align", "--vision", "tiny_vit", "--text", "tiny_bert", "--data", str(shard),
                               "--out", str(out), *FAST], "no captions", out=out)


def test_unknown_metric_and_bad_options(data, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["align", "--vision", "tiny_vit", "--text", "tiny_bert", "--data", data, "--out", str(out)]
    assert_user_error(capsys, base + ["--metrics", "mutual_knn,mutal_cka"], "unknown metric 'mutal_cka'", out=out)
    assert_user_error(capsys, base + ["--pairs", "xy"], "--pairs", out=out)
    assert_user_error(capsys, ["stitch", "--data", data, "--out", str(out)], "--ckpt", out=out)
    assert_user_error(capsys, ["stitch", "--ckpt", str(tmp_path / "missing.ckpt"), "--data", data, "--out", str(out)],
                      "does not exist", out=out)


def test_n_too_small_for_k(tmp_path, capsys):
    data = write_scene_shards(tmp_path / "small", 8)
    out = tmp_path / "out"
    assert_user_error(capsys, ["align", "--vision", "tiny_vit", "--text", "tiny_bert", "--data", data, "--out",
                               str(out), "--metrics", "mutual_knn", "--k", "10", *FAST],
                      "N = 8", "k = 10", out=out)


def test_study_config_errors(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("vision: [tiny_vit]\ntext: [tiny_bert]\ndata: [{name: x, scenes: {n: 10}}]\nmetric: [cka]\n")
    assert_user_error(capsys, ["study", "--config", str(config)], "does not accept option 'metric'")
    config.write_text("vision: [tiny_vit, tiny_vit]\ntext: [tiny_bert]\ndata: [{name: x, scenes: {n: 10}}]\n")
    assert_user_error(capsys, ["study", "--config", str(config)], "listed twice")
    config.write_text("vision: [tiny_vit]\ntext: [tiny_bert]\ndata: [{name: x, scenes: {n: 10, size: 3}}]\n")
    assert_user_error(capsys, ["study", "--config", str(config)], "data", "scenes", "'size' is not accepted")
    # The library reads a file, a mapping or a shipped name through the same parser: same errors, same key names.
    from prh_stitch.alignment.study_config import load_config
    from prh_stitch.errors import UserError

    with pytest.raises(UserError, match="'metric' is not accepted"):
        load_config({"vision": ["tiny_vit"], "text": ["tiny_bert"], "data": [{"name": "x"}], "metric": ["cka"]})
    with pytest.raises(UserError, match="'size' is not accepted"):
        load_config(str(config))
    with pytest.raises(UserError, match="no such file"):
        load_config("no_such_study")


def test_baseline_between_identical_encoders_is_perfect(data, tmp_path):
    # Relative representations of one encoder against itself: both sides land on the same anchor coordinates.
    anchors = write_scene_shards(tmp_path / "anchors", 24, prefix="train")
    out = tmp_path / "relative"
    assert main(["stitch", "--baseline", "relative", "--source", "tiny_bert", "--target", "tiny_bert", "--anchors",
                 anchors, "--data", data, "--out", str(out), "--metrics", "mutual_knn", "--k", "5",
                 "--baseline-options", '{"num_anchors": 16}', *FAST]) == 0
    report = json.loads((out / "stitch.json").read_text())
    assert report["config"]["method"] == {"kind": "baseline", "name": "relative", "anchors": anchors,
                                          "options": {"num_anchors": 16, "seed": 0, "center": False}}
    assert report["retrieval"]["a2b/recall@1"] == 1.0
    assert report["alignment"]["mutual_knn"]["stitched"]["score"] == 1.0
    assert "loss" not in report and (out / "tensorboard").is_dir()


# ---- the outlier clamp (--outlier-quantile, study key outlier_quantile) ---------------------------------

def score_files(cache):
    return set((Path(cache) / "scores").glob("*.json"))


def paired_layers(data, quantile=None):
    """Every layer of tiny_vit and tiny_bert on ``data``, rows paired, each layer clamped on its own."""
    from prh_stitch.metrics import clamp_outliers

    fa, fb = store_features("tiny_vit", data), store_features("tiny_bert", data)
    ia, ib = align_by_key(fa, fb)
    return ([clamp_outliers(x[ia], quantile) for x in ordered(fa)],
            [clamp_outliers(x[ib], quantile) for x in ordered(fb)])


def test_outlier_quantile_reaches_the_scores_and_the_cache_keeps_them_apart(data, tmp_path):
    cache = tmp_path / "cache"  # its own score cache: the files counted here are this test's alone
    base = ["align", "--vision", "tiny_vit", "--text", "tiny_bert", "--data", data, "--metrics", "mutual_knn",
            "--k", "5", "--cache-dir", str(cache), *FAST]

    def run(name, *extra):
        assert main(base + ["--out", str(tmp_path / name), *extra]) == 0
        return json.loads((tmp_path / name / "alignment.json").read_text())

    off = run("off")
    a, b = paired_layers(data)
    assert off["records"][0]["matrix"] == layer_alignment(a, b, "mutual_knn", k=5)["scores"].tolist()
    before = score_files(cache)
    assert len(before) == 1
    on = run("on", "--outlier-quantile", "0.9")
    assert len(score_files(cache) - before) == 1  # scored and cached anew, not read from the unclamped entry
    (r,) = on["records"]
    ca, cb = paired_layers(data, 0.9)
    assert r["matrix"] == layer_alignment(ca, cb, "mutual_knn", k=5)["scores"].tolist()
    assert r["matrix"] != off["records"][0]["matrix"]
    cal = calibrate("mutual_knn", ca[r["layer_a"]], cb[r["layer_b"]], permutations=5, bootstrap=10, seed=0, k=5)
    for key in ("score", "null_mean"):
        assert r[key] == pytest.approx(cal[key], abs=1e-12), key
    full = torch.tensor(r["matrix"], dtype=torch.float64)
    sel = selection_aware(ca, cb, full, "mutual_knn", {"k": 5}, ScoreSettings(k=5, bootstrap=10), "cpu")
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((sel["ci_low"], sel["ci_high"]), abs=1e-12)
    assert on["settings"]["outlier_quantile"] == 0.9 and off["settings"]["outlier_quantile"] is None
    assert "features clamped at the 0.9 quantile of |x| per layer" in (tmp_path / "on" / "alignment.md").read_text()
    assert "no outlier clamp" in (tmp_path / "off" / "alignment.md").read_text()
    # Reruns read their own entries back; q = 1 clamps nothing and shares the unclamped entry.
    files = score_files(cache)
    assert run("off_again")["records"] == off["records"]
    assert run("on_again", "--outlier-quantile", "0.9")["records"] == on["records"]
    assert run("one", "--outlier-quantile", "1")["records"] == off["records"]
    assert score_files(cache) == files


def random_affine_checkpoint(path):
    """A tiny_vit → tiny_bert checkpoint with a random affine stitcher (and the stitcher itself)."""
    vit_dim, bert_dim = build_encoder("tiny_vit").feature_dim(-1), build_encoder("tiny_bert").feature_dim(-1)
    stitcher = Stitcher("affine", vit_dim, bert_dim, "none", "none")
    torch.manual_seed(0)
    with torch.no_grad():
        stitcher.core.weight.normal_()
    torch.save({"state_dict": {f"stitcher.{k}": v for k, v in stitcher.state_dict().items()}, CHECKPOINT_KEY: {
        "stitcher": stitcher.config(), "source": EncoderSpec("tiny_vit").to_dict(),
        "target": EncoderSpec("tiny_bert").to_dict(), "objective": {"name": "mse", "options": {}}}}, path)
    return stitcher


def test_outlier_quantile_in_stitch_clamps_alignment_only(data, tmp_path):
    from prh_stitch.metrics import clamp_outliers

    stitcher = random_affine_checkpoint(tmp_path / "vit2bert.ckpt")
    reports_ = {}
    for name, extra in (("off", []), ("on", ["--outlier-quantile", "0.9"])):
        assert main(["stitch", "--ckpt", str(tmp_path / "vit2bert.ckpt"), "--data", data, "--out", str(tmp_path / name),
                     "--metrics", "mutual_knn,cka", "--k", "5", "--tensorboard", "none", *extra, *FAST]) == 0
        reports_[name] = json.loads((tmp_path / name / "stitch.json").read_text())
    off, on = reports_["off"], reports_["on"]
    assert on["retrieval"] == off["retrieval"] and on["zero_shot"] == off["zero_shot"] and on["loss"] == off["loss"]
    fa, fb = store_features("tiny_vit", data), store_features("tiny_bert", data)
    ia, ib = align_by_key(fa, fb)
    source, target = fa.features["pre_logits"][ia], fb.features["layers.1"][ib]
    with torch.no_grad():
        mapped = stitcher(source)
    for metric, opts in (("mutual_knn", {"k": 5}), ("cka", {})):
        for which, (x, y) in (("stitched", (mapped, target)), ("raw", (source, target))):
            expected = calibrate(metric, clamp_outliers(x, 0.9), clamp_outliers(y, 0.9), permutations=5,
                                 bootstrap=10, seed=0, **opts)
            got = on["alignment"][metric][which]["score"]
            assert got == pytest.approx(expected["score"], abs=1e-6), (metric, which)
    # Here the clamp happens to leave the raw kNN lists alone; CKA, which weighs every value, moves.
    assert on["alignment"]["cka"]["raw"]["score"] != pytest.approx(off["alignment"]["cka"]["raw"]["score"])
    assert on["settings"]["outlier_quantile"] == 0.9 and off["settings"]["outlier_quantile"] is None
    assert "features clamped at the 0.9 quantile" in (tmp_path / "on" / "stitch.md").read_text()
    assert "no outlier clamp" in (tmp_path / "off" / "stitch.md").read_text()


def test_study_outlier_quantile_key(data, tmp_path, capsys):
    config = tmp_path / "study.yaml"
    body = (f"vision: [tiny_vit]\ntext: [tiny_bert]\ndata: [{{name: mine, shards: \"{data}\"}}]\n"
            "metrics: [mutual_knn]\nk: 5\npermutations: 5\nbootstrap: 10\nmax_null: 1\nhalf_samples: 4\n"
            f"out: {tmp_path / 'study'}\ndevice: cpu\n")
    config.write_text(body + "outlier_quantile: 0.9\n")
    assert main(["study", "--config", str(config), "--no-progress"]) == 0
    (r,) = json.loads((tmp_path / "study" / "mine" / "alignment.json").read_text())["records"]
    ca, cb = paired_layers(data, 0.9)
    assert r["matrix"] == layer_alignment(ca, cb, "mutual_knn", k=5)["scores"].tolist()
    assert json.loads((tmp_path / "study" / "study.json").read_text())["settings"]["outlier_quantile"] == 0.9
    assert "features clamped at the 0.9 quantile" in (tmp_path / "study" / "study.md").read_text()
    capsys.readouterr()
    for bad, message in (("1.5", "in the study config must lie in (0, 1]"), ("0", "must lie in (0, 1]"),
                         ("high", "Expected a <class 'float'>; Given value: high")):
        config.write_text(body + f"outlier_quantile: {bad}\n")
        assert_user_error(capsys, ["study", "--config", str(config)], "outlier_quantile", message)


def test_bad_outlier_quantile_and_nan_features(data, tmp_path, capsys, monkeypatch):
    import prh_stitch.alignment.scoring as scoring

    out = tmp_path / "out"
    base = ["align", "--vision", "tiny_vit", "--text", "tiny_bert", "--data", data, "--out", str(out),
            "--metrics", "mutual_knn", "--k", "5", *FAST]
    for bad in ("0", "1.5", "-0.2"):
        assert_user_error(capsys, base + ["--outlier-quantile", bad], "--outlier-quantile must lie in (0, 1]", out=out)
    # NaN: not a number to the parser (YAML reads "nan" as text), an error naming the option all the same.
    assert_user_error(capsys, base + ["--outlier-quantile", "nan"], "outlier_quantile", "Given value: nan", out=out)
    assert_user_error(capsys, ["stitch", "--ckpt", str(tmp_path / "missing.ckpt"), "--data", data, "--out", str(out),
                               "--outlier-quantile", "1.5"], "--outlier-quantile must lie in (0, 1]", out=out)
    original = scoring.paired

    def poisoned(fa, fb, device):  # one NaN in tiny_vit's second layer, as a broken extraction would leave
        a, b, ia, ib = original(fa, fb, device)
        a[1] = a[1].clone()
        a[1][3, 2] = float("nan")
        return a, b, ia, ib

    monkeypatch.setattr(scoring, "paired", poisoned)
    name = store_features("tiny_vit", data).info["layers"][1]
    assert_user_error(capsys, base + ["--outlier-quantile", "0.77"], f"tiny_vit layer {name} contains NaN or Inf",
                      "drop or repair those samples", out=out)


def test_stitch_reads_the_checkpoints_test_split_and_says_where_every_choice_was_made(tmp_path, capsys):
    from prh_stitch.data.datamodule import shard_captions
    from prh_stitch.data.shards import expand_urls
    from prh_stitch.evaluation.captions import caption_retrieval

    patterns = {split: write_scene_shards(tmp_path / split, n, prefix=split, split=split)
                for split, n in (("train", 160), ("val", 24), ("test", 40))}
    ckpt = identity_checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt")
    saved = torch.load(ckpt, weights_only=True)
    saved[CHECKPOINT_KEY]["data"] = {**patterns, "choices_made_on": "val"}
    torch.save(saved, ckpt)
    out = tmp_path / "stitch"
    base = ["stitch", "--ckpt", str(ckpt), "--metrics", "cka", "--tensorboard", "none", *FAST]
    assert main([*base, "--out", str(out)]) == 0
    report = json.loads((out / "stitch.json").read_text())
    assert report["n"] == 40 and report["split"]["name"] == "test" and report["split"]["from"] == "checkpoint"
    assert {c["split"] for c in report["split"]["choices"]} == {"val", "train"} and "warning" not in report["split"]
    # Seen/unseen as caption_retrieval computes it on the store's features and the training shards' captions.
    feats = store_features("tiny_bert", patterns["test"], layers=["layers.1"])
    train_captions = frozenset(shard_captions(expand_urls(patterns["train"])))
    x = feats.features["layers.1"]
    expected = caption_retrieval(x, x, feats.captions, train_captions)
    for name, subset in expected["subsets"].items():
        assert report["retrieval"]["subsets"][name] == pytest.approx(subset), name
    assert report["retrieval"]["subsets"]["seen"]["n"] == sum(c in train_captions for c in feats.captions) > 0
    assert report["retrieval"]["subsets"]["unseen"]["n"] > 0
    markdown = (out / "stitch.md").read_text()
    assert "Evaluated split: **test**" in markdown and "checkpoint selection (checkpoint.monitor): made on val" in markdown
    assert "test recall@1 all" in capsys.readouterr().out
    # val can be read, labelled as the split the choices were made on; the training split is refused.
    assert main([*base, "--out", str(tmp_path / "val_report"), "--split", "val"]) == 0
    report = json.loads((tmp_path / "val_report" / "stitch.json").read_text())
    assert report["n"] == 24 and report["split"]["name"] == "val" and "not held-out" in report["split"]["warning"]
    assert_user_error(capsys, [*base, "--out", str(tmp_path / "refused"), "--data", patterns["train"]],
                      "--data is the checkpoint's training split", out=tmp_path / "refused")
