"""End to end: the shipped configs through train.py's own code path, shrunk to seconds with tiny encoders."""

import os
import subprocess
import sys
import tarfile
import io
from pathlib import Path

import pytest
import torch
import yaml

import prh_stitch
from prh_stitch.cli import build_cli, fit, main
from prh_stitch.data.datamodule import SceneData, StitchingDataModule
from prh_stitch.data.features import FeatureStore
from prh_stitch.metrics import retrieval
from prh_stitch.module import StitchingModule

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")


def tiny_args(root, *extra):
    return ["--config", TINY, "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar=false", *extra]


def checkpoints(root):
    return sorted(Path(root).glob("**/*.ckpt"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run, shared by the tests that inspect its results."""
    root = tmp_path_factory.mktemp("run")
    cli = build_cli(tiny_args(root))
    before = {side: {k: v.clone() for k, v in enc.state_dict().items()}
              for side, enc in (("source", cli.model.source_encoder), ("target", cli.model.target_encoder))}
    fit(cli)
    return cli, before, root


def test_training_writes_best_and_last_checkpoints_and_tensorboard_logs(trained):
    cli, _, root = trained
    names = {p.name for p in checkpoints(root)}
    assert "last.ckpt" in names and any(n.startswith("best-") for n in names)
    events = list(Path(root).glob("**/events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0]))
    accumulator.Reload()
    scalars = accumulator.Tags()["scalars"]
    assert {"data/train_skipped", "data/val_skipped", "val/recall@1", "train/loss_epoch"} <= set(scalars)
    assert accumulator.Scalars("data/train_skipped")[0].value == 0.0
    logged = cli.trainer.logged_metrics
    for key in ("train/loss_epoch", "val/loss", "val/recall@1", "val/recall@5", "val/mean_cosine"):
        assert key in logged, key
    assert 0.0 <= float(logged["val/recall@1"]) <= 1.0


def test_frozen_encoders_are_unchanged_and_not_trained(trained):
    cli, before, _ = trained
    for side, encoder in (("source", cli.model.source_encoder), ("target", cli.model.target_encoder)):
        for key, value in encoder.state_dict().items():
            assert torch.equal(value, before[side][key]), f"{side} encoder tensor {key} changed"
    trainable = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    encoder_params = [p for e in (cli.model.source_encoder, cli.model.target_encoder) for p in e.parameters()]
    assert not any(id(p) in trainable for p in encoder_params)


def test_checkpoint_holds_the_stitcher_but_no_encoder_weights(trained):
    _, _, root = trained
    ckpt = torch.load(checkpoints(root)[-1], map_location="cpu", weights_only=True)
    assert all(not k.startswith(("encoders", "source_encoder", "target_encoder")) for k in ckpt["state_dict"])
    assert ckpt["prh_stitch"]["source"]["name"] == "tiny_vit"
    assert ckpt["prh_stitch"]["target_layer"] == "layers.1"


def test_load_stitcher_round_trip_equals_the_in_memory_stitcher(trained):
    cli, _, root = trained
    last = next(p for p in checkpoints(root) if p.name == "last.ckpt")
    loaded = prh_stitch.load_stitcher(last)
    source, _ = cli.datamodule.training_tensors()
    cli.model.stitcher.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(source), cli.model.stitcher(source))
    assert loaded.source_spec.name == "tiny_vit" and loaded.target_spec.name == "tiny_bert"
    assert loaded.source_layer == "pre_logits"
    module = StitchingModule.load_from_checkpoint(last)
    with torch.no_grad():
        torch.testing.assert_close(module(source), loaded(source))


def test_foreign_and_tampered_checkpoints_are_refused(tmp_path):
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(ValueError, match="not a prh_stitch checkpoint"):
        prh_stitch.load_stitcher(foreign)

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    tampered = tmp_path / "tampered.ckpt"
    torch.save({"state_dict": {}, "prh_stitch": Payload()}, tampered)
    with pytest.raises(ValueError, match="refusing to load"):
        prh_stitch.load_stitcher(tampered)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="refusing to load"):
        prh_stitch.load_stitcher(garbage)


def test_second_run_reads_features_from_the_store(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = build_cli(tiny_args(tmp_path / "a", "--data.cache_dir", str(cache), "--trainer.max_epochs=1"))
    fit(first)
    assert first.datamodule.store.extractions == 4  # 2 encoders x (train, val)

    def no_extraction(*args, **kwargs):
        raise AssertionError("the encoders ran again on a warm store")

    monkeypatch.setattr(FeatureStore, "extract", no_extraction)
    second = build_cli(tiny_args(tmp_path / "b", "--data.cache_dir", str(cache), "--trainer.max_epochs=1"))
    fit(second)
    assert second.datamodule.store.extractions == 0 and second.datamodule.store.hits >= 4


class _Crash(RuntimeError):
    pass


def test_interrupted_run_resumes_with_ckpt_path_last_and_ends_where_an_uninterrupted_run_would(tmp_path):
    from pytorch_lightning import Callback

    straight = build_cli(tiny_args(tmp_path / "straight", "--trainer.max_epochs=4"))
    fit(straight)

    class CrashAtEpoch2(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 2:
                raise _Crash("simulated interruption")

    interrupted = build_cli(tiny_args(tmp_path / "resumed", "--trainer.max_epochs=4"))
    interrupted.trainer.callbacks.append(CrashAtEpoch2())
    with pytest.raises(_Crash):
        fit(interrupted)
    assert main(tiny_args(tmp_path / "resumed", "--trainer.max_epochs=4", "--ckpt_path", "last")) == 0
    resumed_last = max(Path(tmp_path / "resumed").glob("**/last.ckpt"), key=lambda p: p.stat().st_mtime)
    final = torch.load(resumed_last, map_location="cpu", weights_only=True)
    assert final["epoch"] == 3
    expected = straight.model.stitcher.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(final["state_dict"][f"stitcher.{key}"], value)


def _write_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model.source.name", "no_such_encoder"], "unknown encoder 'no_such_encoder'"),
        (["--model.stitcher.name", "lineer"], "unknown stitcher 'lineer'. Did you mean 'linear'"),
        (["--model.source.layer", "42"], "layer 42 is out of range for encoder 'tiny_vit'"),
        (["--model.objective.name", "hinge"], "unknown loss 'hinge'"),
        (["--data.train", "/nonexistent/train-{0..3}.tar", "--data.val", "/nonexistent/val.tar"], "no shards match"),
    ],
)
def test_bad_input_gives_one_clear_error_and_no_checkpoint(tmp_path, capsys, extra, message):
    assert main(tiny_args(tmp_path, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert checkpoints(tmp_path) == []


def test_shards_without_usable_samples_fail_before_training(tmp_path, capsys):
    shard = tmp_path / "broken.tar"
    _write_tar(shard, [("a.jpg", b"garbage bytes"), ("a.txt", b"a caption"), ("b.txt", b"no image here")])
    assert main(tiny_args(tmp_path / "run", "--data.train", str(shard), "--data.val", str(shard))) == 2
    assert "no usable samples" in capsys.readouterr().err
    assert checkpoints(tmp_path) == []


def test_unknown_config_keys_are_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # a key no constructor has: the parser's own error
        main(tiny_args(tmp_path, "--model.lerning_rate", "0.1"))
    assert exit_info.value.code == 2
    assert "lerning_rate" in capsys.readouterr().err
    assert main(tiny_args(tmp_path, "--model.stitcher.nmae", "linear")) == 2  # a typo inside a spec
    assert "unknown StitcherSpec setting(s) ['nmae']" in capsys.readouterr().err
    assert checkpoints(tmp_path) == []


def test_default_config_file_matches_the_code_defaults(tmp_path, monkeypatch):
    """`python train.py` with no arguments and `--config configs/default.yaml` are the same run."""
    monkeypatch.chdir(tmp_path)
    from_code = build_cli([]).config.as_dict()
    from_file = build_cli(["--config", str(REPO / "configs" / "default.yaml")]).config.as_dict()
    for config in (from_code, from_file):
        config.pop("config", None)
    assert from_file == from_code
    assert from_code["model"]["class_path"] == "prh_stitch.module.StitchingModule"  # the default subclass
    assert from_code["model"]["init_args"]["source"]["name"] == "efficientnet_lite0"
    assert from_code["model"]["init_args"]["target"]["name"] == "minilm_l6"
    assert from_code["model"]["init_args"]["stitcher"]["name"] == "linear"


def test_two_process_ddp_on_cpu_validates_over_the_whole_set(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "PRH_STITCH_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    args = tiny_args(tmp_path / "ddp", "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
                     "--trainer.max_epochs=2")
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    best = next(p for p in checkpoints(tmp_path / "ddp") if p.name.startswith("best-"))
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    logged_r1 = next(v["best_model_score"] for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint"))
    # Recompute recall@1 of that checkpoint over the entire validation set in one process.
    module = StitchingModule.load_from_checkpoint(best)
    scenes = yaml.safe_load(open(TINY))["data"]["scenes"]
    dm = StitchingDataModule(scenes=SceneData(**scenes), cache_dir=str(cache))
    dm.setup_features(*module.feature_requests())
    source, target, _, groups = dm.datasets["val"].tensors
    with torch.no_grad():
        expected = retrieval(module.stitcher.eval()(source), target, groups=groups)["a2b/recall@1"]
    assert float(logged_r1) == pytest.approx(expected, abs=1e-6)
    assert len(source) == 128  # an odd split across ranks would pad; the metric must not count repeats
