"""study_zoo.yaml's code path shrunk to seconds with tiny encoders and a small fake Fashion-MNIST: the linear-probe
competence, published scores, the vision × text matrix, the three layer choices and the paper's figure layout."""

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml

from prh_stitch.alignment.competence import spearman
from prh_stitch.cli.evaluate import main

REPO = Path(__file__).resolve().parents[1]


def write_fake_fashion_mnist(folder: Path, n_train: int = 80, n_test: int = 30) -> None:
    """Idx files in Fashion-MNIST's format: each class a bright bar at its own row, plus noise (learnable)."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 + 2 * label: 4 + 2 * label, :] = 255
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 0x801, n) + labels.tobytes())


def shrunk_zoo_config(tmp_path: Path) -> dict:
    """The shipped study_zoo.yaml with tiny models and sizes; every other key (metrics, competence blocks) kept."""
    cfg = yaml.safe_load((REPO / "configs" / "study_zoo.yaml").read_text())
    cfg["vision"] = ["tiny_vit", "tiny_resnet", "random:tiny_vit"]
    cfg["text"] = [{"name": "tiny_bert", "pooling": "mean"}, {"name": "random:tiny_bert", "pooling": "mean"}]
    cfg["data"][0]["scenes"] = {"n": 24, "split": "test", "n_train": 8, "n_val": 8, "image_size": 32}
    cfg["data"][1]["fashion_mnist"] = {"n": 30, "split": "test"}
    cfg["competence"]["vision"]["scores"] = {"tiny_vit": 70.0, "tiny_resnet": 75.0}
    cfg["competence"]["vision"]["extra_scores"] = {"random:tiny_vit": 0.1}
    cfg["competence"]["vision_probe"]["probe"] = {"n_train": 80, "n_test": 30, "val_fraction": 0.25, "seed": 0}
    cfg["competence"]["text"]["scores"] = {"tiny_bert": 60.0}
    cfg.update(metrics=["mutual_knn"], k=3, permutations=3, bootstrap=4, max_null=1, half_samples=6,
               stability_halves=2, knn_k=[3], knn_n=[None], out=str(tmp_path / "study"), device="cpu")
    return cfg


@pytest.fixture(scope="module")
def zoo_study(tmp_path_factory):
    """One shrunk run shared by the tests of this module (the fake Fashion-MNIST stays set while they run)."""
    tmp_path = tmp_path_factory.mktemp("zoo_study")
    fm = tmp_path / "fm"
    fm.mkdir()
    write_fake_fashion_mnist(fm)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PRH_STITCH_FASHION_MNIST", str(fm))
        cfg = shrunk_zoo_config(tmp_path)
        path = tmp_path / "study_zoo_tiny.yaml"
        path.write_text(yaml.safe_dump(cfg))
        assert main(["study", "--config", str(path), "--no-progress"]) == 0
        yield path, tmp_path / "study"


def test_the_zoo_study_shrunk_measures_probes_and_writes_matrix_layer_choices_and_paper_figures(zoo_study):
    from prh_stitch.alignment.features import Extraction, load_features
    from prh_stitch.alignment.settings import Inputs
    from prh_stitch.alignment.study_competence import probe_urls
    from prh_stitch.alignment.study_config import load_config
    from prh_stitch.encoders import encoder_from_spec
    from prh_stitch.evaluation.linear_probe import linear_probe

    path, out = zoo_study
    summary = json.loads((out / "study.json").read_text())
    assert [d["name"] for d in summary["datasets"]] == ["scenes", "fashion_mnist"]
    fm = json.loads((out / "fashion_mnist" / "alignment.json").read_text())
    records = fm["records"]
    assert len(records) == 3 * 2  # every vision × text pair, one metric
    analyses = summary["datasets"][1]["competence"]
    probe = next(a for a in analyses if a["key"] == "vision_probe")

    # The probe's competence is the closed-form probe on the store's final pooled features, in percent.
    cfg = load_config(str(path))
    ex: Extraction = Inputs("cpu", None, "float32", 32, 0, False).extraction()
    train_urls, test_urls = probe_urls(cfg.competence["vision_probe"], ex.store.root.parent)
    for point in probe["points"]:
        encoder = encoder_from_spec(point["model"])
        train = load_features(ex, encoder, train_urls, None, [encoder.num_layers - 1])
        test = load_features(ex, encoder, test_urls, None)
        last = encoder.layer_names[-1]
        expected = linear_probe(train.features[last], train.labels, test.features[last], test.labels,
                                val_fraction=0.25, seed=0)
        assert point["competence"] == pytest.approx(100 * expected["top1"])
        assert probe["probes"][point["model"]]["g"] == expected["g"] and expected["n_test"] == 30
    details = probe["probes"]["tiny_vit"]
    assert (details["n_fit"], details["n_val"], details["n_test"], details["layer"]) == (60, 20, 30, "pre_logits")

    # The three layer choices: each correlation replayed by hand from the records (mean over text partners).
    def mean_over_partners(model, pick):
        mine = [pick(r) for r in records if r["model_a"] == model and pick(r) is not None]
        return sum(mine) / len(mine)

    picks = {"correlation_best": lambda r: r["score"], "correlation_last": lambda r: r["last"]["score"],
             "correlation_contextual": lambda r: (r.get("contextual") or {}).get("score")}
    for key, pick in picks.items():
        xs = [p["competence"] for p in probe["points"]]
        ys = [mean_over_partners(p["model"], pick) for p in probe["points"]]
        assert probe[key]["spearman"] == pytest.approx(spearman(xs, ys))
    published = next(a for a in analyses if a["key"] == "vision")
    assert {p["model"]: p["competence"] for p in published["points"]} == {"tiny_vit": 70.0, "tiny_resnet": 75.0,
                                                                          "random:tiny_vit": 0.1}
    text_bpb = next(a for a in analyses if a["key"] == "text_bpb")
    assert not text_bpb["points"] and all("built-in encoder" in e for e in text_bpb["excluded"])

    # The report: competence side by side, the matrix with the calibrated best scores, the layer-choice table.
    md = (out / "study.md").read_text()
    assert "Competence, measured and published side by side" in md and "Vision × text alignment matrix" in md
    for r in records:
        assert f"{r['score']:.3f} ({r['max_calibrated']:.3f})" in md
    assert "Does the trend survive the layer choice?" in md and "last layers" in md
    assert "## What the data support" in md and summary["conclusion"] in md
    for key in ("vision", "vision_probe"):
        figure = out / "fashion_mnist" / f"paper_mutual_knn_{key}.png"
        assert figure.read_bytes()[:4] == b"\x89PNG" and figure.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
        assert f"fashion_mnist/{figure.name}" in md


def test_a_rerun_reads_features_probes_and_scores_back(zoo_study, tmp_path):
    from prh_stitch.data.features import default_cache_dir

    path, out = zoo_study
    entries = sorted(p.name for p in (default_cache_dir() / "features").iterdir())
    scores = sorted(p.name for p in (default_cache_dir() / "scores").iterdir())
    first = json.loads((out / "study.json").read_text())
    assert main(["study", "--config", str(path), "--out", str(tmp_path / "again"), "--no-progress"]) == 0
    again = json.loads((tmp_path / "again" / "study.json").read_text())
    assert sorted(p.name for p in (default_cache_dir() / "features").iterdir()) == entries
    assert sorted(p.name for p in (default_cache_dir() / "scores").iterdir()) == scores
    def strip(value):  # wall-clock timings, at any depth (the datasets' and the binding test's), differ by design
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "seconds"}
        return [strip(v) for v in value] if isinstance(value, list) else value

    assert strip(again["datasets"]) == strip(first["datasets"])


def test_published_scores_come_from_the_zoo_entries_with_their_sources():
    from prh_stitch.alignment.study_competence import published_table
    from prh_stitch.alignment.study_config import CompetenceBlock
    from prh_stitch.zoo.entries import ZOO

    vision, sources = published_table(CompetenceBlock(scores="published", extra_scores={"random:x": 0.1},
                                                      source="chance"), "vision")
    assert vision["mobilenet_v2"] == ZOO["mobilenet_v2"].score.value and vision["efficientnet_lite2"] == 77.5
    assert vision["random:x"] == 0.1 and sources["random:x"] == "chance"
    assert ZOO["mobilenet_v2"].score.source in sources["mobilenet_v2"]
    text, _ = published_table(CompetenceBlock(scores="published"), "text")
    assert text == {e.name: e.score.value for e in ZOO.values() if e.modality == "text" and e.score}
    assert published_table(CompetenceBlock(measure="linear_probe"), "vision") == ({}, {})


def test_contextual_averages_skip_partners_without_a_contextual_layer(tmp_path):
    from prh_stitch.alignment.align import Model
    from prh_stitch.alignment.layer_sets import best_without_non_contextual
    from prh_stitch.alignment.study import competence_analysis
    from prh_stitch.alignment.study_config import CompetenceBlock

    def record(v, t, layers_b, matrix):
        r = {"model_a": v, "model_b": t, "metric": "mutual_knn", "kind": "vision-text", "layers_a": ["blocks.0",
             "pre_logits"], "layers_b": layers_b, "matrix": matrix, "layer_a": 0, "layer_b": 0,
             "layer_a_name": "blocks.0", "layer_b_name": layers_b[0], "ci_low": 0, "ci_high": 1,
             "score": max(max(row) for row in matrix), "last": {"score": matrix[-1][-1]}}
        r["contextual"] = best_without_non_contextual(r)
        return r

    records = []
    for i, v in enumerate(["a", "b", "c"]):
        records.append(record(v, "glove", ["word_mean"], [[0.9], [0.8]]))  # static: no contextual layer at all
        records.append(record(v, "bert", ["embeddings", "layers.0"], [[0.5, 0.1 * i], [0.2, 0.05]]))
    assert all(r["contextual"] is None for r in records if r["model_b"] == "glove")
    models = [Model(v, None, "vision") for v in "abc"]
    out = competence_analysis("vision", CompetenceBlock(label="c"), models, {"a": 1.0, "b": 2.0, "c": 3.0}, records,
                              "mutual_knn", tmp_path, "toy")
    # bert's layers.0 only (glove has no contextual layer): max(0.1 i, 0.05) over the two vision layers
    assert [p["contextual"] for p in out["points"]] == pytest.approx([0.05, 0.1, 0.2])
    assert [p["score"] for p in out["points"]] == pytest.approx([0.7, 0.7, 0.7])  # the max: both partners
    text = competence_analysis("text", CompetenceBlock(label="c"), [Model("glove", None, "text"),
                                                                    Model("bert", None, "text")],
                               {"glove": 1.0, "bert": 2.0}, records, "mutual_knn", tmp_path, "toy")
    assert [p["contextual"] for p in text["points"]] == [None, pytest.approx(0.35 / 3)]


def test_competence_block_errors_name_the_key(tmp_path):
    from prh_stitch.alignment.study_config import load_config
    from prh_stitch.errors import UserError

    base = {"vision": ["tiny_vit"], "text": ["tiny_bert"], "data": [{"name": "s", "shards": "x.tar"}]}
    with pytest.raises(UserError, match="competence.extra: give side"):
        load_config({**base, "competence": {"extra": {"scores": {"tiny_vit": 1}}}})
    with pytest.raises(UserError, match="competence.text.measure"):
        load_config({**base, "competence": {"text": {"measure": "linear_probe"}}})
    with pytest.raises(UserError, match="competence.v.probe"):
        load_config({**base, "competence": {"v": {"side": "vision", "measure": "linear_probe",
                                                  "probe": {"n_train": 5}}}})
    cfg = load_config({**base, "competence": {"v": {"side": "vision", "measure": "linear_probe"}}})
    assert cfg.competence["v"].probe.n_train == 60000 and cfg.competence["v"].probe.n_test == 10000


def test_the_conclusion_counts_tests_and_names_only_those_that_pass():
    from prh_stitch.alignment.study_matrix import conclusion

    strong = {"n_models": 5, "spearman": 1.0, "spearman_ci": [0.6, 1.0], "pearson": 0.9, "p_models": 2 / 120}
    weak = {"n_models": 5, "spearman": 0.9, "spearman_ci": [-0.2, 1.0], "pearson": 0.8, "p_models": 0.08}
    none = {"n_models": 1, "spearman": None}
    analysis = {"side": "vision", "competence": "top-1", "metric": "mutual_knn", "higher_is_better": True,
                "correlation_best": strong, "correlation_last": weak, "correlation_contextual": none}
    text = conclusion([{"name": "scenes", "competence": [analysis]}])
    assert text.startswith("Of 2 testable correlations") and "1 more had too few models" in text
    assert "scenes, vision top-1, mutual_knn, best: alignment rises with competence" in text and ", last:" not in text
    quiet = conclusion([{"name": "scenes", "competence": [dict(analysis, correlation_best=weak)]}])
    assert "none shows a trend" in quiet and "does not measurably rise" in quiet


def test_the_shipped_zoo_config_names_the_zoo_and_both_competences_per_side():
    from prh_stitch.alignment.study_config import load_config

    cfg = load_config("study_zoo")
    assert [s.name for s in cfg.vision] == ["mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1",
                                            "efficientnet_lite2", "random:efficientnet_lite0"]
    assert [s.name for s in cfg.text] == ["glove_6b_50d", "paraphrase_minilm_l3", "minilm_l6", "mpnet_base",
                                          "smollm2_135m", "random:minilm_l6"]
    assert [(b.name, (b.scenes or b.fashion_mnist).split) for b in cfg.data] == [("scenes", "test"),
                                                                                 ("fashion_mnist", "test")]
    sides = {key: (b.side, b.measure) for key, b in cfg.competence.items()}
    assert sides == {"vision": ("vision", None), "vision_probe": ("vision", "linear_probe"),
                     "vision_probe_full": ("vision", None), "text": ("text", None),
                     "text_bpb": ("text", "bits_per_byte")}
    # The probe's test images are the study's Fashion-MNIST items: one feature-store entry serves both.
    assert cfg.competence["vision_probe"].probe.n_test == cfg.data[1].fashion_mnist.n


def test_bits_per_byte_refuses_an_encoder_that_would_load_with_a_fresh_lm_head(tmp_path):
    """A BERT encoder loads as BertLMHeadModel with a random head; its 'bits per byte' would be noise."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    from prh_stitch.alignment.competence import load_causal_lm
    from prh_stitch.encoders.builtins import minilm_folder

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    torch.manual_seed(0)
    bert, gpt = tmp_path / "bert", tmp_path / "gpt"
    BertModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                         vocab_size=len(tokenizer))).save_pretrained(bert)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizer))).save_pretrained(gpt)
    for folder in (bert, gpt):
        tokenizer.save_pretrained(folder)
    with pytest.raises(ValueError, match="lacks .* weights of a causal LM head"):
        load_causal_lm(f"hf:{bert}")
    model, _ = load_causal_lm(f"hf:{gpt}")
    assert type(model).__name__ == "GPT2LMHeadModel"
    with pytest.raises(ValueError, match="is a built-in encoder"):
        load_causal_lm("minilm_l6")


def test_the_paper_figure_gives_a_text_model_one_colour_in_every_panel_and_names_all_in_its_legend():
    from prh_stitch.alignment.study_matrix import _draw_paper_figure

    text = ["glove", "minilm", "mpnet"]
    full = [[t, [1.0, 2.0], [0.1 * i, 0.2 * i]] for i, t in enumerate(text, 1)]
    panels = [{"title": "best", "lines": full}, {"title": "contextual", "lines": full[1:]}]  # no GloVe here
    fig = _draw_paper_figure(panels, [["a", 1.0], ["b", 2.0]], "top-1", "mutual_knn", "scenes", text)
    colours = [{line.get_label(): line.get_color() for line in ax.get_lines()} for ax in fig.axes[:2]]
    assert colours[1] == {t: colours[0][t] for t in text[1:]} and len(set(colours[0].values())) == 3
    legend = fig.axes[1].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == text
    assert [h.get_color() for h in legend.legend_handles] == [colours[0][t] for t in text]
    # The competence axis is named once for the figure, not under each panel where long names collide.
    assert fig.get_supxlabel() == "top-1" and [ax.get_xlabel() for ax in fig.axes[:2]] == ["", ""]
