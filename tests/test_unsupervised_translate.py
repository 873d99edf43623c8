"""``evaluate.py translate`` end to end: the shipped config, shrunk, with tiny random encoders; the report carries
chance and the supervised ridge bound; the saved unsupervised map loads like every stitcher; the reworded captions."""

import json

import pytest
import torch
import yaml

from prh_stitch.checkpoint import load_stitcher
from prh_stitch.cli.evaluate import main
from prh_stitch.translation.data import reword
from prh_stitch.translation.protocol import chance_scores, evaluation_rows

SHRINK = ["--source", "tiny_bert", "--target", '{"name": "tiny_bert", "options": {"seed": 1}}', "--n_train", "64",
          "--n_eval", "48", "--n", "40", "--image_size", "32", "--batch_size", "32", "--no-progress",
          "--unsupervised", '{"dim": 8, "sample": 24, "restarts": 1, "iterations": 3}']


def test_shipped_config_runs_end_to_end_shrunk(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["translate", "--config", "translate", *SHRINK, "--device", "cpu", "--out", str(out)]) == 0
    assert "unsupervised top-1" in capsys.readouterr().out
    report = json.loads((out / "translate.json").read_text())
    assert report["n"] == 40 and report["data"]["kind"] == "scenes"
    assert set(report["scores"]) == {"unsupervised", "ridge (supervised)", "procrustes (paired, same frames)", "chance"}
    assert report["scores"]["chance"]["a2b/recall@1"] == pytest.approx(1 / 40)
    assert report["scores"]["chance"]["a2b/mean_rank"] == pytest.approx(41 / 2)
    assert report["info"]["half_a"] == report["info"]["half_b"] == 32
    ridge = report["scores"]["ridge (supervised)"]["a2b/recall@1"]
    assert report["scores"]["unsupervised"]["fraction_of_ridge@1"] == pytest.approx(
        report["scores"]["unsupervised"]["a2b/recall@1"] / ridge)
    csv_lines = (out / "translate.csv").read_text().splitlines()
    assert csv_lines[0].startswith("method,n,top1") and len(csv_lines) == 5
    markdown = (out / "translate.md").read_text()
    assert "N = 40 held-out pairs" in markdown and "Protocol:" in markdown
    # The saved map is an ordinary stitcher folder: it loads and reproduces the scored translation.
    stitcher = load_stitcher(out / "stitcher")
    config = json.loads((out / "stitcher" / "config.json").read_text())
    assert config["fit"]["method"] == "unsupervised" and stitcher.name == "affine"
    assert (out / "stitcher" / "model.safetensors").is_file()
    x = torch.randn(5, stitcher.in_dim)
    with torch.no_grad():
        expected = x.double() @ stitcher.core.weight.T.double() + stitcher.core.bias.double()
        assert torch.allclose(stitcher(x).double(), expected, atol=1e-4)


def test_shipped_config_holds_the_documented_run():
    from prh_stitch.cli.common import shipped_config

    config = yaml.safe_load(open(shipped_config("translate")))
    assert (config["source"], config["target"], config["data"], config["n"]) == ("minilm_l6", "mpnet_base", "scenes",
                                                                                  1024)


def test_evaluation_subset_and_chance():
    rows = evaluation_rows(100, 30, seed=0)
    assert len(rows) == 30 and len(set(rows.tolist())) == 30 and torch.equal(rows, rows.sort().values)
    assert torch.equal(evaluation_rows(100, None, 0), torch.arange(100))
    with pytest.raises(ValueError, match="raise n_eval"):
        evaluation_rows(100, 101, 0)
    assert chance_scores(4)["a2b/recall@5"] == 1.0 and chance_scores(1000)["b2a/mean_rank"] == 500.5


def test_reworded_captions_state_the_same_scene_in_other_words():
    from prh_stitch.data.sources import scenes

    samples = list(scenes(40, size=32, split="train"))
    reworded = [reword(meta) for _, _, _, meta in samples]
    assert reworded == [reword(meta) for _, _, _, meta in samples]  # deterministic
    assert all(new != old for new, (_, _, old, _) in zip(reworded, samples))
    for new, (_, _, _, meta) in zip(reworded, samples):
        assert all(colour in new for colour in meta["colours"])  # every colour is still named
        assert ("backdrop" in new or "background" in new or "shown on" in new)


def test_train_py_fit_unsupervised_writes_an_ordinary_checkpoint(tmp_path):
    """``--model.stitcher.fit unsupervised``: one solve from the tiny config's training features, recorded in the
    checkpoint, and the checkpoint loads like every stitcher."""
    from prh_stitch.cli import main as train_main

    root = tmp_path / "run"
    assert train_main(["--config", "tiny", "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar=false",
                       "--model.stitcher.name", "affine", "--model.stitcher.fit", "unsupervised",
                       "--model.stitcher.closed_form", '{"unsupervised": {"dim": 6, "restarts": 2}}']) == 0
    ckpt = sorted(root.glob("**/last.ckpt"))[0]
    meta = torch.load(ckpt, map_location="cpu", weights_only=True)["prh_stitch"]
    assert meta["fit"]["method"] == "unsupervised"
    assert meta["fit"]["closed_form"]["unsupervised"]["n_source"] == meta["fit"]["closed_form"]["n_train"] // 2
    # the config's options reach the fit (training configs can set them like every closed-form option)
    assert meta["fit"]["closed_form"]["unsupervised"]["options"]["restarts"] == 2
    assert meta["fit"]["closed_form"]["unsupervised"]["dim"] <= 6
    stitcher = load_stitcher(ckpt)
    assert stitcher.name == "affine" and torch.isfinite(stitcher.core.weight).all()
