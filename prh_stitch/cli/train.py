"""``python train.py`` / ``prh-train``: LightningCLI over a LightningModule and a LightningDataModule.

Every YAML key maps one to one onto a constructor argument (``model.*`` -> the module, ``data.*`` -> the data
module, ``trainer.*`` -> Trainer, ``checkpoint.*`` -> ModelCheckpoint). Which module and data module is
LightningCLI's own subclass selection: ``model.class_path`` / ``data.class_path`` (the layer-stitch configs set
``prh_stitch.layer_stitch.LayerStitchingModule`` and ``LayerStitchDataModule``; ``configs/prefix_smollm2.yaml`` sets
``prh_stitch.prefix.PrefixStitchingModule``); without them it is the feature
stitcher (StitchingModule, StitchingDataModule), so ``python train.py`` with no arguments is the default run (the
same values as configs/default.yaml). ``--config NAME`` finds a shipped config by name (``--config tiny``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import List, Optional

from pytorch_lightning import LightningDataModule, LightningModule
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info

from prh_stitch.cli.common import argv_of, run_command, with_shipped_configs
from prh_stitch.module import StitchingModule
from prh_stitch.training_board import TrainingBoard

PROG = "train.py"
# The classes a config without ``class_path`` trains: the feature stitcher.
DEFAULT_MODEL = "prh_stitch.module.StitchingModule"
DEFAULT_DATA = "prh_stitch.data.datamodule.StitchingDataModule"


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
        parser.add_lightning_class_args(TrainingBoard, "board")  # figures, projector and hp_metric in TensorBoard
        parser.add_argument(
            "--ckpt_path", type=Optional[str], default=None,
            help="Resume training: a checkpoint path, or 'last' for the newest last.ckpt under trainer.default_root_dir.",
        )
        parser.set_defaults({
            "model": {"class_path": DEFAULT_MODEL},
            "data": {"class_path": DEFAULT_DATA},
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


def continue_checkpoint_folder(trainer, ckpt_path: str) -> Optional[str]:
    """Point the checkpoint callbacks of a resumed run at the folder the interrupted run saved into.

    A resumed run gets a new logger version, hence by default a new checkpoint folder, and ModelCheckpoint restores
    its best score and top-k only when the folder is unchanged: "best" would restart from the first resumed epoch.
    Callbacks whose folder the user set are left alone. Reading the checkpoint here (tensors and plain data only)
    also refuses a file that is not a checkpoint with one clear line, before Lightning loads it.
    Returns the folder continued, or None.
    """
    from prh_stitch.checkpoint import read_checkpoint

    states = read_checkpoint(ckpt_path).get("callbacks") or {}
    continued = None
    for callback in (c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)):
        state = states.get(callback.state_key)
        folder = state.get("dirpath") if isinstance(state, dict) else None
        if callback.dirpath is None and isinstance(folder, str) and os.path.isdir(folder):
            callback.dirpath = folder
            continued = continued or folder
    return continued


def continue_log_version(trainer, checkpoint_dir: str, ckpt_path: str, version_given: bool) -> Optional[int]:
    """Log a resumed run into the TensorBoard version of the run it continues, not a new one.

    Otherwise TensorBoard shows two runs with half a curve each. Done when the continued checkpoint folder is
    ``<logger root>/version_K/checkpoints`` (the default layout), the logger is TensorBoard's and no version was
    given: the logger gets version K and ``purge_step`` at the checkpoint's global step, so TensorBoard hides what
    the interrupted run logged after its last checkpoint and no step is drawn twice. Returns K, or None.
    """
    from prh_stitch.checkpoint import read_checkpoint

    logger = trainer.logger
    if version_given or not isinstance(logger, TensorBoardLogger) or logger._experiment is not None:
        return None  # the writer opens its folder (and reads purge_step) on first use: it must not exist yet
    run = Path(checkpoint_dir).parent
    match = re.fullmatch(r"version_(\d+)", run.name)
    if not match or run.parent.resolve() != Path(logger.root_dir).resolve():
        return None
    logger._version = int(match.group(1))  # as TensorBoardLogger(version=K), decided before anything is logged
    logger._kwargs["purge_step"] = int(read_checkpoint(ckpt_path).get("global_step", 0))  # goes to SummaryWriter
    return logger._version


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``train.py``; returns the exit status (2 for bad input, with one line on stderr)."""
    from prh_stitch.encoders.base import keep_large_allocations_in_heap

    keep_large_allocations_in_heap()  # an explicit choice of this command: see the function's docstring
    return run_command(PROG, lambda: _train(argv), parser_exits=True)


def build_cli(argv: Optional[List[str]] = None) -> StitchCLI:
    """Parse the config and command line and build model, data and trainer (nothing runs yet)."""
    import warnings

    with warnings.catch_warnings():
        # The arguments are the command line's own, with shipped config names resolved to their files.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return StitchCLI(
            LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
            args=with_shipped_configs(argv_of(argv)), run=False, seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": PROG, "description": "Train a stitcher between two frozen encoders, or a "
                           "stitching layer between two networks' layers (model.class_path)."},
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
    checkpoint_dir = continue_checkpoint_folder(trainer, ckpt_path) if ckpt_path else None
    if checkpoint_dir is not None:
        continue_log_version(trainer, checkpoint_dir, ckpt_path, _logger_version_given(cli))
    log_dir = trainer.log_dir or trainer.default_root_dir
    checkpoint_dir = checkpoint_dir or os.path.join(log_dir, "checkpoints")
    rank_zero_info(f"prh_stitch: logs go to {log_dir}, checkpoints to {checkpoint_dir}")
    rank_zero_info(f"prh_stitch: if interrupted, resume with --ckpt_path last "
                   f"(or --ckpt_path {os.path.join(checkpoint_dir, 'last.ckpt')})")
    if ckpt_path:
        rank_zero_info(f"prh_stitch: resuming from {ckpt_path}")
    trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    callback = trainer.checkpoint_callback
    latest = next(c for c in trainer.callbacks if isinstance(c, LatestCheckpoint))
    # Read before testing: loading the selected checkpoint for the test restores the callbacks' state as saved then.
    best_path, best_score, last_path = callback.best_model_path, callback.best_model_score, latest.best_model_path
    tested = test_selected(cli, best_path) if isinstance(cli.model, StitchingModule) else None
    folder = None
    from prh_stitch.prefix.module import PrefixStitchingModule

    # A prefix map is a stitcher too (its checkpoint section is a stitcher's): the same folder, without test scores.
    if isinstance(cli.model, (StitchingModule, PrefixStitchingModule)) and trainer.is_global_zero:
        from prh_stitch.model_folder import save_stitcher_folder

        # The selected checkpoint (what test.json scored) as a shareable model folder next to last.ckpt.
        test_json = test_json_path(trainer, best_path)
        test = json.loads(test_json.read_text()) if test_json.is_file() else None
        folder = save_stitcher_folder(best_path or last_path, Path(last_path).parent / "stitcher", test=test)
    if trainer.is_global_zero:
        hint = (f"\n  stitcher folder: {folder} (prh_stitch.load_stitcher(folder); push with "
                f"HubStitcher.from_pretrained(folder).push_to_hub(repo_id))" if folder is not None else "")
        print(
            "\nDone.\n"
            f"  best checkpoint: {best_path} ({callback.monitor} = {float(best_score or 0):.4f})\n"
            f"  last checkpoint: {last_path}\n"
            f"  TensorBoard:     tensorboard --logdir {trainer.default_root_dir}\n"
            f"  resume with:     python train.py <same options> --ckpt_path {last_path}"
            f"{hint}"
        )
        if tested is not None:
            print(f"  {tested}")


def _logger_version_given(cli: StitchCLI) -> bool:
    """Whether the config names a logger version (then a resumed run logs where it says, not into the old one)."""
    logger = cli.config.get("trainer", {}).get("logger")
    init_args = logger.get("init_args") if hasattr(logger, "get") else None
    return bool(init_args is not None and init_args.get("version") is not None)


def test_json_path(trainer, selected: Optional[str]) -> Path:
    """Where ``test.json`` goes: next to the selected checkpoint, or in the log folder when none was selected."""
    return (Path(selected).parent if selected else Path(trainer.log_dir or trainer.default_root_dir)) / "test.json"


def test_selected(cli: StitchCLI, selected: Optional[str]) -> Optional[str]:
    """Score the test split once, with the checkpoint that validation selected; returns the summary line.

    The test split is touched here only: the checkpoint was chosen on ``val`` (``checkpoint.monitor``), closed-form
    choices were made on ``val`` too. ``test/*`` goes to the run's logger, and the scores (overall, seen and
    unseen captions, chance) to ``test.json`` next to the checkpoint.
    """
    from prh_stitch import reports
    from prh_stitch.evaluation.captions import summary_line

    trainer, model = cli.trainer, cli.model
    callback = trainer.checkpoint_callback
    selected = selected or None
    # Without a selected checkpoint (no monitor, or it was never logged) the weights at the end of training are tested.
    # Testing loads the selected weights into the module; the module is given back as training left it.
    final = {key: value.clone() for key, value in model.state_dict().items()}
    trainer.test(model, datamodule=cli.datamodule, ckpt_path=selected, verbose=False)
    model.load_state_dict(final)
    scores = model.test_scores
    if scores is None or not trainer.is_global_zero:
        return None
    path = reports.write_json(test_json_path(trainer, selected), {
        "split": "test",
        "checkpoint": selected or "weights at the end of training (no selected checkpoint)",
        "selected_by": {"monitor": callback.monitor if callback is not None else None, "split": "val"},
        "closed_form_tuned_on": "val" if model.stitcher_spec.closed_form_method else None,
        "data": model._split_record(),
        "retrieval": scores,
        "note": "a2b = stitched source -> target; items with the identical caption count as correct; seen = the "
                "caption occurs in the training split; chance@k is exact for a uniformly random ranking",
    })
    return f"{summary_line('test', scores)}\n  test scores:     {path}"
