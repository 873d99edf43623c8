"""The shipped prefix config, shrunk to tiny models and a few scenes, runs end to end: train.py then evaluate.py."""

import json

import torch

from prh_stitch.cli.evaluate import main as evaluate_main
from prh_stitch.cli.train import main as train_main

SHRINK = ["--model.init_args.language_model", "tiny_gpt2", "--model.init_args.source.name", "tiny_vit",
          "--model.init_args.lr", "0.03", "--data.init_args.scenes.n_train", "32", "--data.init_args.scenes.n_val",
          "16", "--data.init_args.scenes.n_test", "16", "--data.init_args.scenes.image_size", "32",
          "--data.init_args.extract_batch_size", "16", "--trainer.max_epochs", "1", "--trainer.limit_train_batches",
          "2", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def test_prefix_config_trains_saves_a_stitcher_folder_and_evaluates(tmp_path, capsys):
    root = tmp_path / "run"
    assert train_main(["--config", "prefix_smollm2", *SHRINK, "--trainer.default_root_dir", str(root)]) == 0
    checkpoints = root / "lightning_logs" / "version_0" / "checkpoints"
    best = next(checkpoints.glob("best-*.ckpt"))
    assert (checkpoints / "stitcher" / "model.safetensors").is_file()
    folder_config = json.loads((checkpoints / "stitcher" / "config.json").read_text())
    assert folder_config["objective"]["name"] == "caption_nll"
    out = tmp_path / "report"
    assert evaluate_main(["prefix", "--ckpt", str(best), "--out", str(out), "--generate", "4", "--bootstrap", "50",
                          "--no-progress"]) == 0
    report = json.loads((out / "prefix.json").read_text())
    assert report["split"]["name"] == "test" and report["split"]["captions"] == 16
    for condition in ("prefix", "lm_alone", "shuffled"):
        low, high = report["bits_per_byte"][condition]["interval"]
        assert low <= report["bits_per_byte"][condition]["bits_per_byte"] <= high
    assert report["attributes"]["scenes"] == 4  # the scenes' meta travelled with the samples
    assert "interval" in report and "control" in report and "protocol" in report
    assert (out / "prefix.md").is_file() and (out / "prefix_captions.csv").read_text().count("\n") == 17
    assert "evaluate.py prefix: bits per byte on 16 captions" in capsys.readouterr().out

    # The checkpoint records the LM it was trained against; a map is not evaluated with another one.
    from prh_stitch.checkpoint import read_checkpoint
    from prh_stitch.prefix import load_language_model

    checkpoint = read_checkpoint(best)
    recorded = checkpoint["prh_stitch"]["target_fingerprint"]
    assert recorded == load_language_model("tiny_gpt2").fingerprint() != load_language_model("tiny_gpt2", seed=1).fingerprint()
    checkpoint["prh_stitch"]["target_fingerprint"] = load_language_model("tiny_gpt2", seed=1).fingerprint()
    other = tmp_path / "other_lm.ckpt"
    torch.save(checkpoint, other)
    assert evaluate_main(["prefix", "--ckpt", str(other), "--out", str(tmp_path / "other"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "trained on target 'tiny_gpt2'" in err and "Traceback" not in err
    assert not (tmp_path / "other").exists()


def test_a_checkpoint_from_another_machine_is_evaluated_on_its_scenes_regenerated_here(tmp_path, capsys):
    """A checkpoint records absolute shard paths; the built-in scenes it names are remade in this machine's cache
    (the same seeded images and captions), so its report is the one the training machine would write."""
    from prh_stitch.checkpoint import read_checkpoint

    root = tmp_path / "run"
    assert train_main(["--config", "prefix_smollm2", *SHRINK, "--trainer.default_root_dir", str(root)]) == 0
    best = next((root / "lightning_logs" / "version_0" / "checkpoints").glob("best-*.ckpt"))
    here = tmp_path / "here"
    assert evaluate_main(["prefix", "--ckpt", str(best), "--out", str(here), "--generate", "2", "--bootstrap", "20",
                          "--no-progress"]) == 0
    checkpoint = read_checkpoint(best)
    recorded = checkpoint["prh_stitch"]["data"]
    cache = recorded["test"].split("/scenes/")[0]
    checkpoint["prh_stitch"]["data"] = {k: v.replace(cache, "/elsewhere/cache") if isinstance(v, str) else v
                                        for k, v in recorded.items()}
    moved = tmp_path / "moved.ckpt"
    torch.save(checkpoint, moved)
    other_cache = tmp_path / "other_cache"
    there = tmp_path / "there"
    assert evaluate_main(["prefix", "--ckpt", str(moved), "--out", str(there), "--generate", "2", "--bootstrap", "20",
                          "--cache_dir", str(other_cache), "--no-progress"]) == 0
    a, b = (json.loads((folder / "prefix.json").read_text()) for folder in (here, there))
    assert b["split"]["pattern"].startswith(str(other_cache / "scenes"))
    assert b["bits_per_byte"] == a["bits_per_byte"] and b["generated"] == a["generated"]
    capsys.readouterr()
