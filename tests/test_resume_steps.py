"""Resuming with ``--ckpt_path``, fast: train.py's own code path (``fit(build_cli(argv))``) on planted features, so a
whole run takes about a second. What a resumed run actually did (its epochs, global steps, starting weights and
optimizer state) is recorded, since a seeded restart from scratch would end with the same weights."""

import os
import time
from pathlib import Path

import pytest
import torch
from pytorch_lightning import Callback
from pytorch_lightning.callbacks import ModelCheckpoint

from prh_stitch.cli import build_cli, fit
from prh_stitch.cli.train import continue_checkpoint_folder, find_last_checkpoint
from test_train import PlantedPairs, Recorder

STEPS_PER_EPOCH = 3  # 96 training rows in batches of 32


class PlantedData(PlantedPairs):
    """PlantedPairs with typed options, so that LightningCLI can build it from ``data.class_path``."""

    def __init__(self, cache_dir: str = "", n_train: int = 96, n_val: int = 40, n_test: int = 24,
                 batch_size: int = 32, seed: int = 0) -> None:
        super().__init__(cache_dir, n_train=n_train, n_val=n_val, n_test=n_test, batch_size=batch_size, seed=seed)


def args(root, *extra):
    return ["--model.source.name", "tiny_vit", "--model.target.name", "tiny_bert", "--model.lr", "0.01",
            "--data.class_path", "test_resume_steps.PlantedData", "--data.cache_dir", str(root / "cache"),
            "--data.batch_size=32",
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.max_epochs=4", "--trainer.num_sanity_val_steps=0",
            "--board.similarity_rows=0", "--board.examples=0", "--board.projector_rows=0", *extra]


class OptimizerAtStart(Callback):
    """The optimizer state and the learning rate when training starts (after a resumed run restored them)."""

    def __init__(self):
        self.state, self.lr = None, None

    def on_train_start(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        self.state = {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
                      for k, s in optimizer.state_dict()["state"].items()}
        self.lr = optimizer.param_groups[0]["lr"]


class _Crash(RuntimeError):
    pass


class CrashAtEpoch(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise _Crash("simulated interruption")


def newest_last(root):
    return max(Path(root).glob("**/last.ckpt"), key=lambda p: p.stat().st_mtime)


def test_a_resumed_run_continues_the_epochs_steps_weights_and_optimizer_of_its_checkpoint(tmp_path, capsys):
    straight = build_cli(args(tmp_path / "straight", "--model.warmup_steps=5"))
    fit(straight)
    straight_best = straight.trainer.checkpoint_callback.best_model_path

    interrupted = build_cli(args(tmp_path / "resumed", "--model.warmup_steps=5"))
    first = Recorder()
    interrupted.trainer.callbacks += [first, CrashAtEpoch(2)]
    with pytest.raises(_Crash):
        fit(interrupted)
    assert first.epochs == [0, 1, 2] and first.steps == list(range(2 * STEPS_PER_EPOCH))
    saved = torch.load(newest_last(tmp_path / "resumed"), map_location="cpu", weights_only=True)
    assert saved["epoch"] == 1 and saved["global_step"] == 2 * STEPS_PER_EPOCH
    capsys.readouterr()

    resumed = build_cli(args(tmp_path / "resumed", "--model.warmup_steps=5", "--ckpt_path", "last"))
    second, optimizer = Recorder(), OptimizerAtStart()
    resumed.trainer.callbacks += [second, optimizer]
    fit(resumed)
    assert second.epochs == [2, 3] and second.steps == list(range(2 * STEPS_PER_EPOCH, 4 * STEPS_PER_EPOCH))
    for key, value in second.initial_stitcher.items():
        torch.testing.assert_close(value, saved["state_dict"][f"stitcher.{key}"], rtol=0, atol=0)
    # AdamW's moments and step counts, and the schedule's position (past the 5 warm-up steps), came back too.
    (saved_optimizer,) = saved["optimizer_states"]
    assert optimizer.state.keys() == saved_optimizer["state"].keys() and optimizer.state
    for key, state in saved_optimizer["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(optimizer.state[key][name], value, rtol=0, atol=0)
    assert optimizer.lr == pytest.approx(saved["lr_schedulers"][0]["_last_lr"][0]) and optimizer.lr < 0.01
    final = torch.load(newest_last(tmp_path / "resumed"), map_location="cpu", weights_only=True)
    assert final["epoch"] == 3 and final["global_step"] == 4 * STEPS_PER_EPOCH
    for key, value in straight.model.stitcher.state_dict().items():
        torch.testing.assert_close(final["state_dict"][f"stitcher.{key}"], value)
    # The resumed run kept saving into the interrupted run's folder and selected the same best epoch.
    best = resumed.trainer.checkpoint_callback.best_model_path
    assert Path(best).parent == newest_last(tmp_path / "resumed").parent == Path(saved["callbacks"][
        next(k for k in saved["callbacks"] if k.startswith("ModelCheckpoint"))]["dirpath"])
    assert Path(best).name == Path(straight_best).name
    out = capsys.readouterr().out
    last = newest_last(tmp_path / "resumed")
    assert f"  last checkpoint: {last}\n" in out
    assert f"  resume with:     python train.py <same options> --ckpt_path {last}\n" in out
    assert f"  best checkpoint: {best} (val/recall@1 = " in out


def test_ckpt_path_last_picks_the_newest_last_checkpoint_anywhere_under_the_root(tmp_path):
    older = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    newer = tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "last-v1.ckpt"
    best = tmp_path / "lightning_logs" / "version_2" / "checkpoints" / "best-epoch=003.ckpt"
    for i, path in enumerate((older, newer, best)):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        stamp = time.time() - 100 + 10 * i
        os.utime(path, (stamp, stamp))
    assert find_last_checkpoint(tmp_path) == str(newer)
    os.utime(older, (time.time(), time.time()))
    assert find_last_checkpoint(str(tmp_path)) == str(older)
    with pytest.raises(FileNotFoundError) as error:
        find_last_checkpoint(tmp_path / "lightning_logs" / "version_2")
    root = str(tmp_path / "lightning_logs" / "version_2")
    assert str(error.value) == f"--ckpt_path last: no last.ckpt under {root!r}; pass the checkpoint's path instead"


def test_a_resumed_run_saves_where_the_interrupted_one_did_unless_told_otherwise(tmp_path):
    from types import SimpleNamespace

    from prh_stitch.cli.train import LatestCheckpoint

    folder, gone, mine = tmp_path / "run" / "checkpoints", tmp_path / "deleted", tmp_path / "mine"
    folder.mkdir(parents=True)
    best, latest, fixed = ModelCheckpoint(monitor="val/recall@1"), LatestCheckpoint(), ModelCheckpoint(dirpath=mine)
    assert latest.state_key == "LatestCheckpoint" and latest.state_key != best.state_key
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"callbacks": {best.state_key: {"dirpath": str(folder)}, "LatestCheckpoint": {"dirpath": str(gone)},
                              fixed.state_key: {"dirpath": str(folder)}}}, checkpoint)
    trainer = SimpleNamespace(callbacks=[best, latest, fixed, Recorder()])
    assert continue_checkpoint_folder(trainer, str(checkpoint)) == str(folder)
    assert best.dirpath == str(folder)
    assert latest.dirpath is None  # its saved folder no longer exists
    assert fixed.dirpath == str(mine)  # set by the user: left alone
    # The first continued folder is the one reported, in callback order.
    first, second = ModelCheckpoint(monitor="a"), LatestCheckpoint()
    other = tmp_path / "other"
    other.mkdir()
    torch.save({"callbacks": {first.state_key: {"dirpath": str(other)},
                              "LatestCheckpoint": {"dirpath": str(folder)}}}, checkpoint)
    assert continue_checkpoint_folder(SimpleNamespace(callbacks=[first, second]), str(checkpoint)) == str(other)
    assert second.dirpath == str(folder)
    # A checkpoint without callback states continues nothing.
    torch.save({"state_dict": {}}, checkpoint)
    plain = ModelCheckpoint()
    assert continue_checkpoint_folder(SimpleNamespace(callbacks=[plain]), str(checkpoint)) is None
    assert plain.dirpath is None
    torch.save({"callbacks": {plain.state_key: "not a dict"}}, checkpoint)
    assert continue_checkpoint_folder(SimpleNamespace(callbacks=[plain]), str(checkpoint)) is None


def test_latest_checkpoint_is_rewritten_every_epoch_as_last_ckpt(tmp_path):
    from prh_stitch.cli.train import LatestCheckpoint

    latest = LatestCheckpoint()
    assert latest.monitor is None and latest.save_top_k == 1 and latest.filename == "last"
    assert latest._every_n_epochs == 1 and latest._enable_version_counter is False
    assert LatestCheckpoint(every_n_epochs=3)._every_n_epochs == 3
