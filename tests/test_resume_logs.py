"""Where a resumed run logs: the interrupted run's TensorBoard version, with what it logged after its checkpoint
purged (the end-to-end check is test_train.py's interrupted-run test; these are the rule's cases, in milliseconds)."""

from types import SimpleNamespace

import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from prh_stitch.cli.train import continue_log_version


def _checkpoint(tmp_path, global_step=12):
    path = tmp_path / f"last-{global_step}.ckpt"
    torch.save({"state_dict": {}, **({} if global_step is None else {"global_step": global_step})}, path)
    return str(path)


def test_the_default_layout_continues_its_version_and_purges_after_the_checkpoint(tmp_path):
    root = tmp_path / "runs"
    (root / "lightning_logs" / "version_3" / "checkpoints").mkdir(parents=True)
    (root / "lightning_logs" / "version_4").mkdir()  # a later version exists: the resumed run must not pick "next"
    logger = TensorBoardLogger(str(root))
    trainer = SimpleNamespace(logger=logger)
    folder = str(root / "lightning_logs" / "version_3" / "checkpoints")
    assert continue_log_version(trainer, folder, _checkpoint(tmp_path, 12), version_given=False) == 3
    assert logger.version == 3 and logger.log_dir == str(root / "lightning_logs" / "version_3")
    assert logger._kwargs["purge_step"] == 12  # what the SummaryWriter is built with
    assert logger.experiment.log_dir == logger.log_dir
    logger.finalize("success")
    # A checkpoint that records no step (written by hand, say) purges nothing it cannot place: from step 0.
    bare = TensorBoardLogger(str(root))
    assert continue_log_version(SimpleNamespace(logger=bare), folder, _checkpoint(tmp_path, None), False) == 3
    assert bare._kwargs["purge_step"] == 0


def test_the_rule_leaves_the_logger_alone_where_it_does_not_apply(tmp_path):
    root = tmp_path / "runs"
    folder = root / "lightning_logs" / "version_3" / "checkpoints"
    folder.mkdir(parents=True)
    ckpt = _checkpoint(tmp_path)
    cases = {
        "a version was given": (TensorBoardLogger(str(root)), str(folder), True),
        "not TensorBoard": (CSVLogger(str(root)), str(folder), False),
        "checkpoints elsewhere": (TensorBoardLogger(str(root)), str(tmp_path / "mine" / "checkpoints"), False),
        "not a version folder": (TensorBoardLogger(str(root)), str(root / "lightning_logs" / "best" / "checkpoints"),
                                 False),
        "another logger root": (TensorBoardLogger(str(tmp_path / "other")), str(folder), False),
    }
    for why, (logger, checkpoint_dir, given) in cases.items():
        assert continue_log_version(SimpleNamespace(logger=logger), checkpoint_dir, ckpt, given) is None, why
        assert logger._version is None and "purge_step" not in getattr(logger, "_kwargs", {}), why
    opened = TensorBoardLogger(str(root))
    opened.experiment  # the writer exists already: its folder cannot change any more
    assert continue_log_version(SimpleNamespace(logger=opened), str(folder), ckpt, False) is None
    assert opened.version == 4  # the next free version, as Lightning chose it
    opened.finalize("success")


def test_a_version_counts_as_given_only_when_the_config_names_one():
    from jsonargparse import Namespace

    from prh_stitch.cli.train import _logger_version_given

    def config(logger):
        return SimpleNamespace(config=Namespace(trainer=Namespace(logger=logger)))

    tensorboard = "pytorch_lightning.loggers.TensorBoardLogger"
    assert _logger_version_given(config(Namespace(class_path=tensorboard, init_args=Namespace(version=7))))
    assert _logger_version_given(config(Namespace(class_path=tensorboard, init_args=Namespace(version="mine"))))
    assert _logger_version_given(config(Namespace(class_path=tensorboard, init_args=Namespace(version=0))))
    assert not _logger_version_given(config(Namespace(class_path=tensorboard, init_args=Namespace(version=None))))
    assert not _logger_version_given(config(Namespace(class_path=tensorboard)))
    for default in (True, None, False):  # the trainer's own default logger, or none
        assert not _logger_version_given(config(default))
    assert not _logger_version_given(SimpleNamespace(config=Namespace()))  # a config without a trainer section
