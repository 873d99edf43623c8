"""``python train.py``: LightningCLI over StitchingModule and StitchingDataModule.

Every YAML key maps one to one onto a constructor argument (``model.*`` -> StitchingModule, ``data.*`` ->
StitchingDataModule, ``trainer.*`` -> Trainer, ``checkpoint.*`` -> ModelCheckpoint). With no arguments the
defaults in the code are the default run (the same values as configs/default.yaml).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.utilities import rank_zero_info

from prh_stitch.data.datamodule import StitchingDataModule
from prh_stitch.module import StitchingModule

# Errors of ours that carry a message meant for the user; anything else keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, ImportError)


class LatestCheckpoint(ModelCheckpoint):
    """``last.ckpt``, rewritten at the end of every epoch: what ``--ckpt_path last`` resumes from.

    A separate callback because ModelCheckpoint(save_last=True) of Lightning 2.6 rewrites last.ckpt only in
    epochs that also produced a new top-k checkpoint, which would resume from an old state.
    """

    def __init__(self, every_n_epochs: int = 1) -> None:
        super().__init__(monitor=None, save_top_k=1, filename="last", every_n_epochs=every_n_epochs,
                         enable_version_counter=False)

    @property
    def state_key(self) -> str:
        return "LatestCheckpoint"


class StitchCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/recall@1",
            "checkpoint.mode": "max",
            "checkpoint.filename": "best-{epoch:03d}",
        })
        parser.add_lightning_class_args(LatestCheckpoint, "last_checkpoint")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_argument(
            "--ckpt_path", type=Optional[str], default=None,
            help="Resume training: a checkpoint path, or 'last' for the newest last.ckpt under trainer.default_root_dir.",
        )
        parser.set_defaults({
            "trainer.max_epochs": 40,
            "trainer.default_root_dir": "runs/default",
            "trainer.log_every_n_steps": 10,
        })


def find_last_checkpoint(root: str | os.PathLike) -> str:
    candidates = sorted(Path(root).glob("**/last*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(
            f"--ckpt_path last: no last.ckpt under {os.fspath(root)!r}; pass the checkpoint's path instead"
        )
    return str(candidates[-1])


def main(argv: Optional[List[str]] = None) -> int:
    try:
        return _train(argv)
    except USER_ERRORS as exc:
        if os.environ.get("PRH_STITCH_DEBUG"):
            raise
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2


def build_cli(argv: Optional[List[str]] = None) -> StitchCLI:
    """Parse the config and command line and build model, data and trainer (nothing runs yet)."""
    return StitchCLI(
        StitchingModule, StitchingDataModule, args=argv, run=False, seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "train.py", "description": "Train a stitcher between two frozen encoders."},
    )


def _train(argv: Optional[List[str]]) -> int:
    fit(build_cli(argv))
    return 0


def fit(cli: StitchCLI) -> None:
    """Run training for a built CLI, resolving ``--ckpt_path last``, and print where everything went."""
    trainer = cli.trainer
    ckpt_path = cli.config.get("ckpt_path")
    if ckpt_path == "last":
        ckpt_path = find_last_checkpoint(trainer.default_root_dir)
    log_dir = trainer.log_dir or trainer.default_root_dir
    rank_zero_info(f"prh_stitch: logs and checkpoints go to {log_dir}")
    if ckpt_path:
        rank_zero_info(f"prh_stitch: resuming from {ckpt_path}")
    trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    if trainer.is_global_zero:
        callback = trainer.checkpoint_callback
        latest = next(c for c in trainer.callbacks if isinstance(c, LatestCheckpoint))
        print(
            "\nDone.\n"
            f"  best checkpoint: {callback.best_model_path} (val/recall@1 = {float(callback.best_model_score or 0):.4f})\n"
            f"  last checkpoint: {latest.best_model_path}\n"
            f"  TensorBoard:     tensorboard --logdir {trainer.default_root_dir}\n"
            f"  resume with:     python train.py <same options> --ckpt_path {latest.best_model_path}\n"
            f"  load in Python:  prh_stitch.load_stitcher({latest.best_model_path!r})"
        )
