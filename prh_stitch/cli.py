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

# ``task`` (top-level config key or --task) picks the model and data classes; the default is the feature stitcher,
# so configs without the key (default.yaml, tiny.yaml) and `python train.py` are unchanged.
TASKS = ("stitch", "layer_stitch")

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
            "--task", type=str, default="stitch",
            help="stitch: a stitcher between two encoders' features (default); layer_stitch: cut network A at a "
                 "layer and continue through network B (prh_stitch.layer_stitch).",
        )
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


def _requested_task(argv: Optional[List[str]]) -> str:
    """The ``task`` of the last config file or ``--task`` option that sets one (later ones win, as in the parser)."""
    import yaml

    args = list(sys.argv[1:] if argv is None else argv)
    task = "stitch"
    for position, arg in enumerate(args):
        name, _, value = arg.partition("=")
        if name not in ("--config", "--task"):
            continue
        if not value and position + 1 < len(args):
            value = args[position + 1]
        if name == "--task":
            task = value
        elif os.path.isfile(value):
            with open(value) as handle:
                loaded = yaml.safe_load(handle)
            if isinstance(loaded, dict) and "task" in loaded:
                task = str(loaded["task"])
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return task


def build_cli(argv: Optional[List[str]] = None) -> StitchCLI:
    """Parse the config and command line and build model, data and trainer (nothing runs yet)."""
    if _requested_task(argv) == "layer_stitch":
        from prh_stitch.layer_stitch import LayerStitchDataModule, LayerStitchingModule

        model_class, data_class = LayerStitchingModule, LayerStitchDataModule
        description = "Train a stitching layer from network A's layer i into network B's layer j."
    else:
        model_class, data_class = StitchingModule, StitchingDataModule
        description = "Train a stitcher between two frozen encoders."
    return StitchCLI(
        model_class, data_class, args=argv, run=False, seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "train.py", "description": description},
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
    rank_zero_info(f"prh_stitch: if interrupted, resume with --ckpt_path last "
                   f"(or --ckpt_path {os.path.join(log_dir, 'checkpoints', 'last.ckpt')})")
    if ckpt_path:
        rank_zero_info(f"prh_stitch: resuming from {ckpt_path}")
    trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    if trainer.is_global_zero:
        callback = trainer.checkpoint_callback
        latest = next(c for c in trainer.callbacks if isinstance(c, LatestCheckpoint))
        hint = (f"\n  load in Python:  prh_stitch.load_stitcher({latest.best_model_path!r})"
                if isinstance(cli.model, StitchingModule) else "")
        print(
            "\nDone.\n"
            f"  best checkpoint: {callback.best_model_path} ({callback.monitor} = {float(callback.best_model_score or 0):.4f})\n"
            f"  last checkpoint: {latest.best_model_path}\n"
            f"  TensorBoard:     tensorboard --logdir {trainer.default_root_dir}\n"
            f"  resume with:     python train.py <same options> --ckpt_path {latest.best_model_path}"
            f"{hint}"
        )
