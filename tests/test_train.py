"""End to end: the shipped configs through train.py's own code path, shrunk to seconds with tiny encoders."""

import math
import os
import tarfile
import io
from pathlib import Path

import pytest
import torch
from pytorch_lightning import Callback

import prh_stitch
from prh_stitch.cli import build_cli, fit, main
from prh_stitch.data.datamodule import PairDataset, StitchingDataModule, caption_groups
from prh_stitch.data.features import FeatureStore
from prh_stitch.metrics import retrieval
from prh_stitch.module import StitchingModule
from prh_stitch.stitchers import Stitcher

# The shipped configs are package data (the repository's configs/ is a link to them).
CONFIGS = Path(prh_stitch.__file__).resolve().parent / "configs"
TINY = str(CONFIGS / "tiny.yaml")


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
    recorder = Recorder()
    cli.trainer.callbacks.append(recorder)
    fit(cli)
    return cli, before, root, recorder.initial_stitcher, recorder.fit_metrics


class Recorder(Callback):
    """What a run actually did: the stitcher it started from, the epochs it ran and the global step of each batch."""

    def __init__(self):
        self.initial_stitcher, self.epochs, self.steps, self.fit_metrics = None, [], [], {}

    def on_train_start(self, trainer, pl_module):
        # After setup (normalisation fitted) and after a resumed run restored its checkpoint.
        self.initial_stitcher = {k: v.clone() for k, v in pl_module.stitcher.state_dict().items()}

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs.append(trainer.current_epoch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(trainer.global_step)

    def on_fit_end(self, trainer, pl_module):
        # What fitting logged last: the test that follows replaces the trainer's logged metrics with test/*.
        self.fit_metrics = dict(trainer.logged_metrics)


def _scalars(root, tag):
    """Every value TensorBoard holds for ``tag`` in the run under ``root``, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for events in sorted(Path(root).glob("**/events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values += [(s.step, s.value) for s in accumulator.Scalars(tag)]
    return [value for _, value in sorted(values)]


def test_training_writes_best_and_last_checkpoints_and_tensorboard_logs(trained):
    cli, _, root, _, fit_metrics = trained
    names = {p.name for p in checkpoints(root)}
    assert "last.ckpt" in names and any(n.startswith("best-") for n in names)
    assert list(Path(root).glob("**/events.out.tfevents.*")), "no TensorBoard event file"
    # The run's event files (the test after fitting may open one of its own), read together.
    for tag in ("data/train_skipped", "data/val_skipped", "val/recall@1", "train/loss_epoch"):
        assert _scalars(root, tag), tag
    assert _scalars(root, "data/train_skipped")[0] == 0.0
    for key in ("train/loss_epoch", "val/loss", "val/recall@1", "val/recall@5", "val/mean_cosine"):
        assert key in fit_metrics, key
    # Then the selected checkpoint was tested once: test/* in TensorBoard and as the trainer's last logged metrics.
    for tag in ("test/recall@1", "test/seen/recall@1", "test/unseen/recall@1", "test/chance@1"):
        assert len(_scalars(root, tag)) == 1, tag
    assert {"test/loss", "test/recall@1", "test/distinct_captions"} <= set(cli.trainer.logged_metrics)
    assert any(p.name == "test.json" for p in Path(root).glob("**/checkpoints/*"))


def test_logged_validation_recall_is_the_whole_set_recall_and_the_training_loss_falls(trained):
    cli, _, root, _, fit_metrics = trained
    train_loss = _scalars(root, "train/loss_epoch")
    assert len(train_loss) == 3 and train_loss[-1] < train_loss[0], train_loss
    source, target, _, groups = cli.datamodule.datasets["val"].tensors
    with torch.no_grad():
        expected = retrieval(cli.model.stitcher.eval()(source), target, groups=groups)
    logged = fit_metrics
    assert float(logged["val/recall@1"]) == pytest.approx(expected["a2b/recall@1"], abs=1e-6)
    assert float(logged["val/recall@5"]) == pytest.approx(expected["a2b/recall@5"], abs=1e-6)
    assert float(logged["val/mean_cosine"]) == pytest.approx(expected["mean_cosine"], abs=1e-5)


# ---------------------------------------------------------------- the module on planted features (no encoders run)

class PlantedPairs(StitchingDataModule):
    """Features with a planted linear relation (target = source @ W + noise) instead of encoder outputs.

    The tiny random encoders' features carry too little signal for a few epochs to show learning; here a linear
    stitcher can reach near-perfect retrieval in seconds, so a module that trains the wrong way cannot hide.
    """

    def __init__(self, cache_dir, n_train=256, n_val=127, batch_size=64, noise=0.3, seed=0, n_test=96):
        super().__init__(cache_dir=str(cache_dir), batch_size=batch_size, seed=seed)
        self.sizes, self.noise, self.planted_seed = {"train": n_train, "val": n_val, "test": n_test}, noise, seed

    def prepare_features(self, requests, device="cpu"):
        pass

    def setup_features(self, source, target):
        d_in = source.encoder.feature_dim(source.layer, source.pooling)
        d_out = target.encoder.feature_dim(target.layer, target.pooling)
        g = torch.Generator().manual_seed(self.planted_seed)
        weight = torch.randn(d_in, d_out, generator=g) / d_in ** 0.5
        for split, n in self.sizes.items():
            x = 3.0 * torch.randn(n, d_in, generator=g) + 1.0  # not standardised: the stitcher's norm must do it
            y = x @ weight + self.noise * torch.randn(n, d_out, generator=g)
            # Train: distinct captions; val and test: pairs of rows share a caption, and every third pair's caption
            # also occurs in training (seen), the others do not (unseen).
            if split == "train":
                captions = [f"caption {i}" for i in range(n)]
            else:
                captions = [f"caption {i // 2}" if i // 2 % 3 == 0 else f"{split} caption {i // 2}" for i in range(n)]
            self.captions[split] = captions
            self.datasets[split] = PairDataset(x, y, torch.arange(n), caption_groups(captions))
            self.skipped[split] = dict(getattr(self, "skipped_override", {}).get(split, {}))


def planted_trainer(root, max_epochs, **kwargs):
    from pytorch_lightning import Trainer
    from pytorch_lightning.loggers import CSVLogger

    return Trainer(default_root_dir=str(root), max_epochs=max_epochs, accelerator="cpu", devices=1,
                   logger=CSVLogger(str(root)), enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1, **kwargs)


def tiny_module(**kwargs):
    return StitchingModule(source={"name": "tiny_vit"}, target={"name": "tiny_bert"}, lr=0.01, **kwargs)


class EpochMetrics(Callback):
    """The epoch-level metrics each rank holds after every validation pass (sanity check excluded)."""

    def __init__(self):
        self.val, self.train_loss, self.stitchers = [], [], []

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.stitchers.append({k: v.clone() for k, v in pl_module.stitcher.state_dict().items()})

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.val.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})

    def on_train_epoch_end(self, trainer, pl_module):
        if "train/loss_epoch" in trainer.callback_metrics:  # closed-form runs have no loss
            self.train_loss.append(float(trainer.callback_metrics["train/loss_epoch"]))


def test_training_learns_a_planted_relation_far_beyond_chance_and_lowers_its_loss(tmp_path):
    """A module that trains the wrong way (say, a negated loss) ends near chance and raises its loss."""
    torch.manual_seed(0)
    model, data, seen = tiny_module(), PlantedPairs(tmp_path / "cache"), EpochMetrics()
    start = Recorder()
    trainer = planted_trainer(tmp_path, max_epochs=6, callbacks=[seen, start])
    trainer.fit(model, datamodule=data)
    assert start.epochs == list(range(6)) and start.steps == list(range(6 * 4))
    source, target, _, groups = data.datasets["val"].tensors
    untrained = Stitcher(**model.stitcher.config())
    untrained.load_state_dict(start.initial_stitcher)
    with torch.no_grad():
        before = retrieval(untrained.eval()(source), target, groups=groups)
        after = retrieval(model.stitcher.eval()(source), target, groups=groups)
    chance = 2.0 / len(source)  # two correct items per query
    assert before["a2b/recall@1"] < 10 * chance <= 0.2
    assert after["a2b/recall@1"] >= 0.8 and after["b2a/recall@1"] >= 0.8, after
    assert seen.train_loss[-1] < 0.5 * seen.train_loss[0], seen.train_loss
    assert seen.val[-1]["val/loss"] < 0.5 * seen.val[0]["val/loss"], seen.val
    # The progress bar shows the training loss (per step and per epoch) and the validation recall@1.
    assert {"train/loss_step", "train/loss_epoch", "val/r@1"} <= set(trainer.progress_bar_metrics)
    # The temperature is logged as its mean over the last epoch's steps: close to, not equal to, the final one.
    assert float(trainer.callback_metrics["train/temperature"]) == pytest.approx(model.objective.temperature.item(),
                                                                                rel=1e-3)
    # What the module logged is the whole-set score of the stitcher it ended with.
    for logged, key in (("val/recall@1", "a2b/recall@1"), ("val/recall@5", "a2b/recall@5"),
                        ("val/recall@10", "a2b/recall@10"), ("val/recall@1_target_to_source", "b2a/recall@1"),
                        ("val/mean_rank", "a2b/mean_rank"), ("val/mean_cosine", "mean_cosine")):
        assert seen.val[-1][logged] == pytest.approx(after[key], abs=1e-5), logged
    # Its checkpoint rebuilds exactly this stitcher, and says what it was trained on and how.
    trainer.save_checkpoint(tmp_path / "end.ckpt")
    meta = torch.load(tmp_path / "end.ckpt", map_location="cpu", weights_only=True)["prh_stitch"]
    assert meta == {
        "format": 1, "version": prh_stitch.__version__, "stitcher": model.stitcher.config(),
        "source": model.source_spec.to_dict(), "target": model.target_spec.to_dict(),
        "source_layer": "pre_logits", "target_layer": "layers.1",
        "source_fingerprint": model.source_encoder.fingerprint([model.source_spec.layer], model.source_spec.pooling),
        "target_fingerprint": model.target_encoder.fingerprint([model.target_spec.layer], model.target_spec.pooling),
        "objective": {"name": "contrastive", "options": {}},
        "fit": {"method": "gradient", "init": None, "closed_form": None},
        "data": {"choices_made_on": "val"},  # planted features: no shard patterns to record
    }
    with torch.no_grad():
        torch.testing.assert_close(prh_stitch.load_stitcher(tmp_path / "end.ckpt")(source), model(source))


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_learning_rate_warms_up_linearly_then_follows_the_schedule_and_decay_spares_the_temperature(schedule):
    from types import SimpleNamespace

    model = tiny_module(warmup_steps=4, schedule=schedule, weight_decay=0.1)
    model._trainer = SimpleNamespace(estimated_stepping_batches=20)  # all configure_optimizers reads of a trainer
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    stitcher_group, temperature_group = optimizer.param_groups
    assert {id(p) for p in stitcher_group["params"]} == {id(p) for p in model.stitcher.parameters()}
    assert [id(p) for p in temperature_group["params"]] == [id(model.objective.log_logit_scale)]
    assert stitcher_group["weight_decay"] == 0.1 and temperature_group["weight_decay"] == 0.0
    seen = []
    for _ in range(22):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    for step, lrs in enumerate(seen):
        if step < 4:
            expected = 0.01 * (step + 1) / 4
        elif schedule == "constant":
            expected = 0.01
        else:  # cosine from the peak at the end of warm-up to 0 at the last step, then held at 0
            expected = 0.01 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - 4) / 16)))
        assert lrs == [pytest.approx(expected, abs=1e-12)] * 2, step


def test_frozen_encoders_are_unchanged_and_not_trained(trained):
    cli, before, _, _, _ = trained
    for side, encoder in (("source", cli.model.source_encoder), ("target", cli.model.target_encoder)):
        for key, value in encoder.state_dict().items():
            assert torch.equal(value, before[side][key]), f"{side} encoder tensor {key} changed"
    trainable = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    encoder_params = [p for e in (cli.model.source_encoder, cli.model.target_encoder) for p in e.parameters()]
    assert not any(id(p) in trainable for p in encoder_params)


def test_checkpoint_holds_the_stitcher_but_no_encoder_weights(trained):
    cli, _, root, _, _ = trained
    ckpt = torch.load(checkpoints(root)[-1], map_location="cpu", weights_only=True)
    assert all(not k.startswith(("encoders", "source_encoder", "target_encoder")) for k in ckpt["state_dict"])
    assert ckpt["prh_stitch"] == {  # everything load_stitcher and a reader of the run need, nothing else
        "format": 1, "version": prh_stitch.__version__,
        "stitcher": {"name": "linear", "in_dim": 64, "out_dim": 32, "input_norm": "standard", "output_norm": "none"},
        "source": cli.model.source_spec.to_dict(), "target": cli.model.target_spec.to_dict(),
        "source_layer": "pre_logits", "target_layer": "layers.1",
        # Which features it was trained on (weights, preprocessing, layer, pooling).
        "source_fingerprint": cli.model.source_encoder.fingerprint([cli.model.source_spec.layer],
                                                                   cli.model.source_spec.pooling),
        "target_fingerprint": cli.model.target_encoder.fingerprint([cli.model.target_spec.layer],
                                                                   cli.model.target_spec.pooling),
        "objective": {"name": "contrastive", "options": {}},
        "fit": {"method": "gradient", "init": None, "closed_form": None},
        "data": {**cli.datamodule.split_patterns(), "choices_made_on": "val"},  # what evaluate.py stitch reads
    }
    assert set(cli.datamodule.split_patterns()) == {"train", "val", "test"}
    assert ckpt["prh_stitch"]["source"]["name"] == "tiny_vit" and ckpt["prh_stitch"]["target"]["name"] == "tiny_bert"


def test_load_stitcher_round_trip_equals_the_in_memory_stitcher(trained):
    cli, _, root, _, _ = trained
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
    assert first.datamodule.store.extractions == 6  # 2 encoders x (train, val, test); the test after fitting reads them back

    def no_extraction(*args, **kwargs):
        raise AssertionError("the encoders ran again on a warm store")

    monkeypatch.setattr(FeatureStore, "_extract", no_extraction)
    second = build_cli(tiny_args(tmp_path / "b", "--data.cache_dir", str(cache), "--trainer.max_epochs=1"))
    fit(second)
    assert second.datamodule.store.extractions == 0 and second.datamodule.store.hits >= 6


class _Crash(RuntimeError):
    pass


def test_interrupted_run_resumes_with_ckpt_path_last_and_ends_where_an_uninterrupted_run_would(tmp_path):
    """The resumed run must run only the missing epochs, from the saved state, and end bit-for-bit where a straight
    run ends. The weights alone cannot tell (a seeded restart from scratch ends with the same ones), so the
    Recorder checks what the second run actually did: which epochs and global steps it ran, from which weights."""
    straight = build_cli(tiny_args(tmp_path / "straight", "--trainer.max_epochs=4"))
    fit(straight)

    class CrashInEpoch2(Callback):  # after three of its steps: logged, but after the last checkpoint
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 2 and batch_idx == 3:
                raise _Crash("simulated interruption")

    interrupted = build_cli(tiny_args(tmp_path / "resumed", "--trainer.max_epochs=4"))
    first = Recorder()
    interrupted.trainer.callbacks += [first, CrashInEpoch2()]
    with pytest.raises(_Crash):
        fit(interrupted)
    steps_per_epoch = 256 // 64
    assert first.epochs == [0, 1, 2] and first.steps == list(range(2 * steps_per_epoch + 4))
    first_log = Path(interrupted.trainer.log_dir)
    assert max(_logged_steps(first_log, "train/loss_step")) >= 2 * steps_per_epoch  # logged past the checkpoint
    saved = torch.load(next(Path(tmp_path / "resumed").glob("**/last.ckpt")), map_location="cpu", weights_only=True)
    assert saved["epoch"] == 1 and saved["global_step"] == 2 * steps_per_epoch

    # The same code path as `train.py ... --ckpt_path last` (main = fit(build_cli(argv))), with a Recorder attached.
    resumed = build_cli(tiny_args(tmp_path / "resumed", "--trainer.max_epochs=4", "--ckpt_path", "last"))
    second = Recorder()
    resumed.trainer.callbacks.append(second)
    fit(resumed)
    assert second.epochs == [2, 3], "the resumed run did not continue after the last saved epoch"
    assert second.steps == list(range(2 * steps_per_epoch, 4 * steps_per_epoch))
    for key, value in second.initial_stitcher.items():  # it started from the checkpoint's weights
        torch.testing.assert_close(value, saved["state_dict"][f"stitcher.{key}"], rtol=0, atol=0)
    resumed_last = max(Path(tmp_path / "resumed").glob("**/last.ckpt"), key=lambda p: p.stat().st_mtime)
    final = torch.load(resumed_last, map_location="cpu", weights_only=True)
    assert final["epoch"] == 3 and final["global_step"] == 4 * steps_per_epoch
    # Same end point as the straight run: the optimizer moments and the LR schedule were restored too.
    expected = straight.model.stitcher.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(final["state_dict"][f"stitcher.{key}"], value)
    # And the TensorBoard log of the resumed run continues the step count instead of starting again at 0, in the
    # interrupted run's own version folder: TensorBoard shows one run whose steps are each drawn once (what the
    # interrupted run logged after its checkpoint is purged).
    resumed_log = Path(resumed.trainer.log_dir)
    assert resumed_log == first_log
    per_file = sorted(_file_steps(resumed_log, "train/loss_step"))  # [the interrupted run's, the resumed run's]
    assert len(per_file) == 2 and per_file[0][0] == 1 and per_file[1][0] >= 2 * steps_per_epoch, per_file
    steps = _logged_steps(first_log, "train/loss_step")
    assert len(steps) == len(set(steps)) and max(steps) == 4 * steps_per_epoch - 1, steps
    assert len(steps) == len(_logged_steps(tmp_path / "straight", "train/loss_step"))


def _logged_steps(log_dir, tag):
    """Steps of ``tag`` as TensorBoard shows the run: one accumulator over the folder's events files, which is where
    TensorBoard applies a restarted writer's purge."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = next(Path(log_dir).glob("**/events.out.tfevents.*")).parent
    accumulator = EventAccumulator(str(run))
    accumulator.Reload()
    steps = [s.step for s in accumulator.Scalars(tag)] if tag in accumulator.Tags()["scalars"] else []
    assert steps, f"no {tag} in {log_dir}"
    return steps


def _file_steps(log_dir, tag):
    """Steps of ``tag`` in each events file of ``log_dir`` that has it, each file read on its own (no purge)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for events in Path(log_dir).glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            steps.append([s.step for s in accumulator.Scalars(tag)])
    assert steps, f"no {tag} in {log_dir}"
    return steps


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
        (["--data.train", "/nonexistent/train-{0..3}.tar", "--data.val", "/nonexistent/val.tar", "--data.test",
          "/nonexistent/test.tar"], "no shards match"),
        (["--data.train", "/nonexistent/train.tar", "--data.val", "/nonexistent/val.tar"],
         "give all of the 'train', 'val' and 'test' shard patterns, or none"),
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
    val, test_shard = tmp_path / "broken-val.tar", tmp_path / "broken-test.tar"
    val.write_bytes(shard.read_bytes())  # the same shard twice is refused before anything is read
    test_shard.write_bytes(shard.read_bytes())
    assert main(tiny_args(tmp_path / "run", "--data.train", str(shard), "--data.val", str(val),
                          "--data.test", str(test_shard))) == 2
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
    from_file = build_cli(["--config", str(CONFIGS / "default.yaml")]).config.as_dict()
    for config in (from_code, from_file):
        config.pop("config", None)
    assert from_file == from_code
    assert from_code["model"]["class_path"] == "prh_stitch.module.StitchingModule"  # the default subclass
    assert from_code["model"]["init_args"]["source"]["name"] == "efficientnet_lite0"
    assert from_code["model"]["init_args"]["target"]["name"] == "minilm_l6"
    assert from_code["model"]["init_args"]["stitcher"]["name"] == "linear"


def _ddp_validation_worker(rank, world, root):
    """One rank of a 2-process CPU run of the tiny config, rendezvous through a file (no port to race for)."""
    import torch.distributed as dist

    # LOCAL_RANK marks the process as launched from outside, so Lightning joins this process group, not its own.
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world)
    try:
        cli = build_cli(tiny_args(root / "ddp", "--trainer.accelerator=cpu", f"--trainer.devices={world}",
                                  "--trainer.strategy=ddp", "--trainer.max_epochs=2", "--data.scenes.n_val=127",
                                  "--data.scenes.n_test=127", "--data.cache_dir", str(root / "cache")))
        seen = EpochMetrics()
        cli.trainer.callbacks.append(seen)
        fit(cli)  # then tests the selected checkpoint on every rank
        torch.save({"val": seen.val, "stitchers": seen.stitchers, "test": cli.model.test_scores["subsets"],
                    "best": cli.trainer.checkpoint_callback.best_model_path}, root / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_validation_scores_the_whole_set_once_on_every_rank(tmp_path):
    """127 validation rows on 2 ranks: the DistributedSampler pads rank 1 with a repeat of row 0. Every rank must
    log, after every epoch, exactly the one-process scores of the whole set (each row once)."""
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_ddp_validation_worker, args=(world, tmp_path), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    # The one-process reference: the same validation features, read back from the run's store.
    cli = build_cli(tiny_args(tmp_path / "reference", "--data.scenes.n_val=127", "--data.scenes.n_test=127",
                              "--data.cache_dir", str(tmp_path / "cache")))
    cli.datamodule.setup_features(*cli.model.feature_requests())
    source, target, _, groups = cli.datamodule.datasets["val"].tensors
    assert len(source) == 127  # odd: the sampler must pad, and the metric must not count the repeat
    for rank, seen in enumerate(ranks):
        assert len(seen["val"]) == 2 and len(seen["stitchers"]) == 2, rank
        for epoch, (logged, state) in enumerate(zip(seen["val"], seen["stitchers"])):
            for key, value in state.items():  # DDP kept the replicas identical
                torch.testing.assert_close(value, ranks[0]["stitchers"][epoch][key], rtol=0, atol=0)
            stitcher = Stitcher(**cli.model.stitcher.config())
            stitcher.load_state_dict(state)
            with torch.no_grad():
                expected = retrieval(stitcher.eval()(source), target, groups=groups)
            for name, key in (("val/recall@1", "a2b/recall@1"), ("val/recall@5", "a2b/recall@5"),
                              ("val/recall@10", "a2b/recall@10"), ("val/recall@1_target_to_source", "b2a/recall@1"),
                              ("val/mean_rank", "a2b/mean_rank"), ("val/mean_cosine", "mean_cosine")):
                assert logged[name] == pytest.approx(expected[key], rel=1e-6, abs=1e-6), (rank, epoch, name)
    # The test split (127 rows: padded too) is scored once per row on every rank, with the selected checkpoint.
    from prh_stitch.evaluation.captions import caption_retrieval

    dm = cli.datamodule
    test_source, test_target, _, _ = dm.datasets["test"].tensors
    assert len(test_source) == 127
    with torch.no_grad():
        expected = caption_retrieval(prh_stitch.load_stitcher(ranks[0]["best"])(test_source), test_target,
                                     dm.captions["test"], dm.train_captions())["subsets"]
    for rank, seen in enumerate(ranks):
        assert seen["best"] == ranks[0]["best"]
        for name, subset in expected.items():
            assert seen["test"][name] == pytest.approx(subset, rel=1e-6, abs=1e-6), (rank, name)


# ---------------------------------------------------------------- the module's own rules, without the CLI

def test_stitcher_spec_says_which_closed_form_runs_and_refuses_bad_combinations():
    from prh_stitch.module import StitcherSpec

    assert StitcherSpec().closed_form_method is None
    assert StitcherSpec(fit="ridge").closed_form_method == "ridge"
    assert StitcherSpec(init="lstsq").closed_form_method == "lstsq"
    StitcherSpec(name="affine", fit="procrustes", closed_form={"scaling": "isotropic"}).check()
    StitcherSpec(init="ridge", closed_form={"ridge_grid": [0.1, 1.0]}).check()
    bad = [
        (dict(fit="cholesky"), r"^unknown stitcher fit 'cholesky'; choose one of gradient, lstsq, ridge, procrustes, unsupervised$"),
        (dict(fit="ridge", init="ridge"), r"^stitcher init 'ridge' applies to fit 'gradient' only; fit 'ridge' is"),
        (dict(init="svd"), r"^unknown stitcher init 'svd'; choose one of lstsq, ridge, procrustes, unsupervised or null"),
        (dict(fit="ridge", closed_form={"rigde": 1}), r"^unknown closed_form option\(s\) \['rigde'\]; valid: \["),
        (dict(closed_form={"ridge": 1.0}), r"^closed_form options are set but neither fit nor init is a closed form"),
        (dict(name="mlp", fit="ridge"), r"^closed-form fits \(ridge\) need stitcher 'linear' or 'affine', not 'mlp'$"),
        (dict(fit="ridge", closed_form={"ridge_grid": []}), "ridge_grid is empty"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            StitcherSpec(**kwargs).check()
    with pytest.raises(ValueError, match=r"^unknown schedule 'linear'; choose 'cosine' or 'constant'$"):
        tiny_module(schedule="linear")


def test_closed_form_run_is_one_solve_equal_to_the_direct_fit_then_one_validation(tmp_path):
    from prh_stitch.closed_form import fit_closed_form

    grid = [1e-3, 1.0, 100.0]
    model = tiny_module(stitcher={"name": "affine", "fit": "ridge",
                                  "closed_form": {"ridge_grid": grid, "gain": None, "whiten": None}})
    data, seen, steps = PlantedPairs(tmp_path / "cache"), EpochMetrics(), Recorder()
    data.skipped_override = {"train": {"decode_error": 2, "no_caption": 1}, "val": {}}
    trainer = planted_trainer(tmp_path, max_epochs=5, callbacks=[seen, steps])
    trainer.fit(model, datamodule=data)
    assert steps.epochs == [0] and trainer.global_step == 1  # five epochs asked, one solve taken
    result = model.closed_form_result
    assert result.method == "ridge" and result.ridge in grid and set(result.scores) == {repr(v) for v in grid}
    # The solve equals fit_closed_form on the training split with the same held-out choice, done here directly.
    reference = Stitcher(**model.stitcher.config())
    reference.fit_normalization(*data.training_tensors())
    val_source, val_target, _, val_groups = data.datasets["val"].tensors
    expected = fit_closed_form(reference, data.training_tensors(), "ridge", val=(val_source, val_target),
                               val_groups=val_groups, ridge_grid=grid, gain=None, whiten=None)
    assert expected.ridge == result.ridge
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.stitcher.state_dict()[key], value)
    assert len(seen.val) == 1 and seen.val[0]["val/recall@1"] >= 0.8
    metrics = _csv_metrics(trainer)
    assert result.gain == 1.0 and result.whiten is None  # gain and whitening off: the plain ridge
    assert metrics["closed_form/ridge"] == [pytest.approx(result.ridge)] and metrics["closed_form/gain"] == [1.0]
    assert "closed_form/whiten" not in metrics
    # Skipped samples are logged once at the start, zeros included.
    assert metrics["data/train_skipped"] == [3.0] and metrics["data/val_skipped"] == [0.0]
    assert metrics["data/train_skipped/decode_error"] == [2.0] and metrics["data/train_skipped/no_caption"] == [1.0]
    trainer.save_checkpoint(tmp_path / "solved.ckpt")
    fit_meta = torch.load(tmp_path / "solved.ckpt", map_location="cpu", weights_only=True)["prh_stitch"]["fit"]
    assert fit_meta == {"method": "ridge", "init": None, "closed_form": result.as_dict()}


def test_a_closed_form_run_on_one_training_batch_solves_once_and_tests_the_solved_stitcher(tmp_path):
    """The solve is taken at the epoch's first batch: a training split that fits in one batch must still be solved
    (a solve keyed to any later batch would never run). The test pass then scores that solved stitcher, whole set."""
    from prh_stitch.evaluation.captions import caption_retrieval

    model = tiny_module(stitcher={"name": "affine", "fit": "ridge",
                                  "closed_form": {"ridge_grid": [1e-2], "gain": None, "whiten": None}})
    data, steps = PlantedPairs(tmp_path / "cache", batch_size=256), Recorder()  # 256 training rows: one batch
    trainer = planted_trainer(tmp_path, max_epochs=1, callbacks=[steps])
    trainer.fit(model, datamodule=data)
    assert steps.steps == [0] and trainer.global_step == 1
    assert model.closed_form_result is not None and model.closed_form_result.ridge == 1e-2
    untrained = Stitcher(**model.stitcher.config())
    untrained.load_state_dict(steps.initial_stitcher)
    assert not torch.equal(untrained.core.weight, model.stitcher.core.weight)  # the solve wrote its map
    assert model.test_scores is None
    trainer.test(model, datamodule=data)
    source, target, _, _ = data.datasets["test"].tensors
    with torch.no_grad():
        expected = caption_retrieval(model.stitcher.eval()(source), target, data.captions["test"],
                                     data.train_captions())
    assert model.test_scores["subsets"]["all"]["n"] == 96 and expected["a2b/recall@1"] >= 0.8
    for name, subset in expected["subsets"].items():
        assert model.test_scores["subsets"][name] == pytest.approx(subset, abs=1e-6), name
    assert model.test_scores["a2b/recall@1"] == pytest.approx(expected["a2b/recall@1"], abs=1e-6)


def _csv_metrics(trainer):
    """Every non-empty value per column of the CSVLogger's metrics.csv, in row order."""
    import csv

    trainer.logger.save()
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return {key: [float(r[key]) for r in rows if r.get(key) not in (None, "")] for key in rows[0]}


class RecordingPairs(PlantedPairs):
    """Planted pairs that record which split each loader served and in which trainer stage (fit or test)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.served = []

    def train_dataloader(self):
        self.served.append(("train", self.trainer.state.fn))
        return super().train_dataloader()

    def val_dataloader(self):
        self.served.append(("val", self.trainer.state.fn))
        return super().val_dataloader()

    def test_dataloader(self):
        self.served.append(("test", self.trainer.state.fn))
        return super().test_dataloader()


def test_every_choice_reads_val_and_only_the_report_reads_test(tmp_path, monkeypatch):
    """Closed-form tuning gets the val features, checkpoint selection scores val, and the test split is read once,
    after fitting, by the report, with the selected checkpoint."""
    import json
    from types import SimpleNamespace

    from pytorch_lightning import Trainer
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.trainer.states import TrainerFn

    import prh_stitch.module as module_code
    from prh_stitch.cli.train import test_selected
    from prh_stitch.evaluation.captions import caption_retrieval

    tuned_on = []
    real_fit = module_code.fit_closed_form

    def recording_fit(stitcher, train, method, val=None, **options):
        tuned_on.append(val)
        return real_fit(stitcher, train, method, val=val, **options)

    monkeypatch.setattr(module_code, "fit_closed_form", recording_fit)
    torch.manual_seed(0)
    model = tiny_module(stitcher={"name": "linear", "init": "ridge", "closed_form": {"ridge_grid": [1e-2, 1.0]}})
    data = RecordingPairs(tmp_path / "cache", noise=2.0)
    selection = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="val/recall@1", mode="max", save_top_k=1)
    trainer = Trainer(default_root_dir=str(tmp_path), max_epochs=4, accelerator="cpu", devices=1, logger=False,
                      callbacks=[selection], enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0)
    trainer.fit(model, datamodule=data)
    # The ridge strength was chosen on the val features (the very tensors), never on test.
    val_source, val_target, _, _ = data.datasets["val"].tensors
    assert len(tuned_on) == 1 and tuned_on[0][0] is val_source and tuned_on[0][1] is val_target
    # Fitting read train and val only; selection's score is val recall@1 of the selected weights.
    assert {split for split, _ in data.served} == {"train", "val"}
    best = selection.best_model_path
    selected = prh_stitch.load_stitcher(best)
    with torch.no_grad():
        val_scores = caption_retrieval(selected(val_source), val_target, data.captions["val"], data.train_captions())
    assert float(selection.best_model_score) == pytest.approx(val_scores["a2b/recall@1"], abs=1e-6)

    line = test_selected(SimpleNamespace(trainer=trainer, model=model, datamodule=data), best)
    assert [entry for entry in data.served if entry[0] == "test"] == [("test", TrainerFn.TESTING)]
    test_source, test_target, _, _ = data.datasets["test"].tensors
    with torch.no_grad():
        expected = caption_retrieval(selected(test_source), test_target, data.captions["test"], data.train_captions())
    report = json.loads((Path(best).parent / "test.json").read_text())
    assert report["split"] == "test" and report["checkpoint"] == best
    assert report["selected_by"] == {"monitor": "val/recall@1", "split": "val"} and report["closed_form_tuned_on"] == "val"
    for name in ("all", "seen", "unseen"):
        for key, value in expected["subsets"][name].items():
            assert report["retrieval"]["subsets"][name][key] == pytest.approx(value, abs=1e-9), (name, key)
    assert report["retrieval"]["subsets"]["seen"]["n"] == 32 and report["retrieval"]["subsets"]["unseen"]["n"] == 64
    assert f"test recall@1 all {expected['a2b/recall@1']:.4f}" in line
