"""Studies that state their power: smallest p over models, best-pair stability, mutual kNN across k and N, the
best pair without non-contextual layers; and a whole study under the paper's protocol."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from prh_stitch.alignment import study_power
from prh_stitch.alignment.competence import rank_permutation_p, spearman
from prh_stitch.cli.evaluate import main
from prh_stitch.data.shards import write_shards
from prh_stitch.data.sources import scenes


def test_smallest_p_is_the_minimum_over_every_ordering():
    assert study_power.smallest_p([1.0, 2.0, 3.0]) == pytest.approx(1 / 3)
    assert study_power.smallest_p([1.0, 2.0, 3.0, 4.0]) == pytest.approx(2 / 24)
    assert study_power.smallest_p([5.0, 1.0, 3.0, 2.0, 4.0]) == pytest.approx(2 / 120)
    assert study_power.smallest_p([1.0, 2.0]) is None and study_power.smallest_p([1.0, 1.0, 1.0]) is None
    for x in ([1.0, 2.0, 2.0, 3.0], [75.1, 76.7, 77.5, 77.5, 80.0]):  # ties: fewer distinct rankings, larger p
        brute = min(rank_permutation_p(x, list(map(float, perm))) for perm in itertools.permutations(range(len(x))))
        assert study_power.smallest_p(x) == pytest.approx(brute)
        assert brute > 2 / math.factorial(len(x))
    assert study_power.models_needed(0.05) == 5 and 2 / math.factorial(4) > 0.05 >= 2 / math.factorial(5)


def test_power_statement_says_when_a_trend_cannot_be_detected():
    three = study_power.power_statement("vision", "ImageNet top-1 (%)", [75.1, 76.7, 77.5])
    assert three["smallest_p"] == pytest.approx(1 / 3) and not three["detectable"]
    assert "cannot be detected at p ≤ 0.05" in three["sentence"] and "0.333" in three["sentence"]
    assert "at least 5 models" in three["sentence"]
    five = study_power.power_statement("vision", "x", [1.0, 2.0, 3.0, 4.0, 5.0])
    assert five["detectable"] and five["smallest_p"] == pytest.approx(1 / 60)
    measured = study_power.power_statement("text", "bits per byte", [0.0] * 4, measured=True)
    assert measured["n_is_upper_bound"] and "at most 4 text models" in measured["sentence"]
    assert "no over-models test is possible" in study_power.power_statement("text", "x", [1.0, 2.0])["sentence"]


def test_over_models_p_beyond_eight_models_is_a_permutation_estimate_of_the_exact_p():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=9), rng.normal(size=9)
    y = y + 0.4 * x  # a moderate trend: an exact p well inside (0, 1)
    # Exact by enumeration of all 9! orderings, vectorised: Spearman's rho from ranks (no ties here).
    rx = np.argsort(np.argsort(x)).astype(float)
    ry = np.argsort(np.argsort(y)).astype(float)
    perms = np.array(list(itertools.permutations(range(9))))
    rho = lambda a, b: np.corrcoef(a, b)[0, 1]  # noqa: E731
    observed = rho(rx, ry)
    cx = rx - rx.mean()
    all_rho = (ry[perms] - ry.mean()) @ cx / (np.linalg.norm(cx) * np.linalg.norm(ry - ry.mean()))
    exact = float(np.mean(np.abs(all_rho) >= abs(observed) - 1e-12))
    assert spearman(x.tolist(), y.tolist()) == pytest.approx(observed)
    draws = 4000
    estimate = rank_permutation_p(x.tolist(), y.tolist(), draws=draws, seed=1)
    se = math.sqrt(exact * (1 - exact) / draws)
    assert 0.01 < exact < 0.5 and abs(estimate - exact) < 4 * se + 1 / draws


def _features(n=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, 6, generator=gen)
    a = [torch.randn(n, 8, generator=gen),
         shared @ torch.randn(6, 8, generator=gen) + 0.3 * torch.randn(n, 8, generator=gen)]
    b = [shared @ torch.randn(6, 5, generator=gen) + 0.8 * torch.randn(n, 5, generator=gen),
         shared @ torch.randn(6, 7, generator=gen) + 0.8 * torch.randn(n, 7, generator=gen),
         torch.randn(n, 4, generator=gen)]
    return a, b


def test_best_pair_stability_counts_the_winner_of_every_half():
    from prh_stitch.alignment.scoring import half_sample_subsets
    from prh_stitch.metrics import mutual_knn

    a, b = _features()
    names_a, names_b = ["blocks.0", "blocks.1"], ["embeddings", "layers.0", "layers.1"]
    out = study_power.best_pair_stability(a, b, names_a, names_b, "mutual_knn", {"k": 5}, draws=12, seed=3)
    # Brute force: every pair scored on every half by the metric itself, the winner taken by hand.
    counts_all, counts_ctx = {}, {}
    for s in half_sample_subsets(48, 12, 3):
        scores = {(i, j): mutual_knn(a[i][s], b[j][s], k=5) for i in range(2) for j in range(3)}
        top = max(scores.values())
        win = min(p for p, v in scores.items() if v == top)
        counts_all[win] = counts_all.get(win, 0) + 1
        top_ctx = max(v for (i, j), v in scores.items() if j > 0)
        win_ctx = min(p for p, v in scores.items() if v == top_ctx and p[1] > 0)
        counts_ctx[win_ctx] = counts_ctx.get(win_ctx, 0) + 1
    full = {(i, j): mutual_knn(a[i], b[j], k=5) for i in range(2) for j in range(3)}
    best_all = min(p for p, v in full.items() if v == max(full.values()))
    best_ctx = min(p for p, v in full.items() if p[1] > 0 and v == max(w for q, w in full.items() if q[1] > 0))
    assert out["draws"] == 12 and out["half_size"] == 24
    for key, counts, best in (("all", counts_all, best_all), ("contextual", counts_ctx, best_ctx)):
        assert out[key]["best"] == [names_a[best[0]], names_b[best[1]]]
        assert out[key]["stability"] == pytest.approx(counts.get(best, 0) / 12)
        got = {(w["layer_a_name"], w["layer_b_name"]): w["count"] for w in out[key]["winners"]}
        assert got == {(names_a[i], names_b[j]): c for (i, j), c in counts.items()}
    assert all(w["layer_b_name"] != "embeddings" for w in out["contextual"]["winners"])
    # A planted identical pair wins every half.
    planted = study_power.best_pair_stability([a[0], a[1]], [b[0], a[1].clone()], names_a, ["x", "y"],
                                              "mutual_knn", {"k": 5}, draws=6, seed=0)
    assert planted["all"]["stability"] == 1.0 and planted["all"]["best"] == ["blocks.1", "y"]


def test_knn_grid_cells_equal_calibrate_on_their_subsets():
    from prh_stitch.metrics import calibrate

    a, b = _features(n=60)
    rows = study_power.knn_grid(a[1], b[1], ks=[5, 10], ns=[20, 40, None, 500], permutations=7, seed=2)
    assert [(r["k"], r["n"]) for r in rows] == [(5, 20), (10, 20), (5, 40), (10, 40), (5, 60), (10, 60)]
    for r in rows:
        if r["n"] < 60:
            subset = torch.randperm(60, generator=torch.Generator().manual_seed(2 + r["n"]))[:r["n"]].sort().values
            xa, xb = a[1][subset], b[1][subset]
        else:
            xa, xb = a[1], b[1]
        cal = calibrate("mutual_knn", xa, xb, permutations=7, seed=2, k=r["k"])
        for key in ("score", "null_mean", "null_std", "z", "calibrated"):
            assert r[key] == pytest.approx(cal[key], abs=1e-12), key
        assert r["chance"] == pytest.approx(r["k"] / (r["n"] - 1))
        assert r["calibrated"] == pytest.approx((r["score"] - r["null_mean"]) / (1 - r["null_mean"]))
        assert r["full"] == (r["n"] == 60)
    same = study_power.knn_grid(a[1], a[1].clone(), ks=[5], ns=[30, None], permutations=5, seed=0)
    assert all(r["score"] == 1.0 and r["calibrated"] == pytest.approx(1.0) for r in same)
    assert study_power.knn_grid(a[1], b[1], ks=[10], ns=[8], permutations=2, seed=0) == []  # N ≤ k + 1: left out


@pytest.fixture(scope="module")
def study_inputs(tmp_path_factory):
    """Scene shards and a tiny random GPT-2 (GPT2Config, MiniLM's tokenizer as an offline stand-in) on disk."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from prh_stitch.encoders.builtins import minilm_folder

    folder = tmp_path_factory.mktemp("power_scenes")
    write_shards(list(scenes(64, seed=7, size=48, split="val")), folder, prefix="val", samples_per_shard=64)
    lm = tmp_path_factory.mktemp("power_gpt2")
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer))).save_pretrained(lm)
    tokenizer.save_pretrained(lm)
    return str(folder / "val-*.tar"), lm


def test_study_under_the_papers_protocol_states_power_stability_and_the_knn_table(study_inputs, tmp_path, capsys):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from prh_stitch.alignment.competence import bits_per_byte
    from prh_stitch.data.features import FeatureStore, default_cache_dir
    from prh_stitch.data.shards import expand_urls
    from prh_stitch.encoders import build_encoder

    shards, lm = study_inputs
    config = tmp_path / "study.yaml"
    config.write_text(f"""
vision: [tiny_vit, tiny_resnet]
text: ["hf:{lm}"]
data: [{{name: mine, shards: "{shards}"}}]
metrics: [mutual_knn, cka]
k: 5
permutations: 4
bootstrap: 0
max_null: 0
half_samples: 4
stability_halves: 5
knn_k: [5, 10]
knn_n: [16, 32, null]
protocol: paper
competence:
  vision: {{label: made-up score, scores: {{tiny_vit: 1.0, tiny_resnet: 2.0}}}}
  text: {{label: bits per byte, higher_is_better: false, measure: bits_per_byte}}
out: {tmp_path / "study"}
device: cpu
""")
    assert main(["study", "--config", str(config), "--no-progress"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("power: 2 vision models with made-up score: no over-models test is possible")
    assert printed[1].startswith("power: at most 1 text model")
    out = tmp_path / "study"
    summary = json.loads((out / "study.json").read_text())
    assert summary["protocol"]["name"] == "paper" and summary["settings"]["outlier_quantile"] == 0.95
    assert [p["side"] for p in summary["power"]] == ["vision", "text"]
    markdown = (out / "study.md").read_text()
    assert "**Protocol: paper**" in markdown and "What this study can detect (stated before computing)" in markdown
    assert markdown.index("What this study can detect") < markdown.index("## mine")
    assert "Mutual kNN at several k and N" in markdown and "contextual best" in markdown
    # Competence: the paper's bits per byte (per caption, first token unscored) on the captions.
    (mine,) = summary["datasets"]
    text_side = next(a for a in mine["competence"] if a["side"] == "text" and a["metric"] == "mutual_knn")
    (gpt,) = text_side["points"]
    encoder = build_encoder("tiny_vit")
    captions = FeatureStore(default_cache_dir() / "features").get(
        encoder, expand_urls(shards), list(range(encoder.num_layers)), None, progress=False).captions
    model, tokenizer = GPT2LMHeadModel.from_pretrained(lm).eval(), AutoTokenizer.from_pretrained(lm)
    expected = bits_per_byte(model, tokenizer, captions, definition="per_caption")["bits_per_byte"]
    assert gpt["competence"] == pytest.approx(expected, rel=1e-6)
    assert expected != pytest.approx(bits_per_byte(model, tokenizer, captions)["bits_per_byte"])
    # Records: paper layers, stability from 5 halves, the contextual best without the LM's embeddings.
    records = json.loads((out / "mine" / "alignment.json").read_text())["records"]
    assert len(records) == 4 and all(r["protocol"] == "paper" for r in records)
    for r in records:
        assert "pre_logits" not in r["layers_a"] and r["layers_b"][0] == "embeddings"
        assert r["best_pair_stability"]["draws"] == 5 and 0 <= r["best_pair_stability"]["all"]["stability"] <= 1
        assert sum(w["count"] for w in r["best_pair_stability"]["all"]["winners"]) == 5
        assert r["contextual"]["layer_b_name"] != "embeddings"
        assert r["contextual"]["score"] == max(row[j] for row in r["matrix"] for j in range(1, len(r["layers_b"])))
    grid = mine["knn_grid"]
    assert [g["model_a"] for g in grid] == ["tiny_vit", "tiny_resnet"]
    assert all([(c["k"], c["n"]) for c in g["rows"]] == [(5, 16), (10, 16), (5, 32), (10, 32), (5, 64), (10, 64)]
               for g in grid)
    vision_side = next(a for a in mine["competence"] if a["side"] == "vision" and a["metric"] == "cka")
    assert "correlation_contextual" in vision_side and vision_side["sentence_contextual"].startswith("no clear trend")
