"""Resume is exact: a train.py run killed outright (no cleanup, like kill -9) and resumed with --ckpt_path last ends
with the same best checkpoint, best score and last weights as a run that was never interrupted."""

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from pytorch_lightning import Callback

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 4
KILL_AT = 2  # the process dies as epoch 2 starts: epochs 0 and 1 are done and saved


class HardExitAtEpoch(Callback):
    """Ends the process on the spot (``os._exit``: no exception, no cleanup, no checkpoint), like ``kill -9``."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            os._exit(9)


def train(root: Path, *extra: str) -> subprocess.CompletedProcess:
    # The best checkpoint is the one with the lowest recall, so that "best" lies before the kill and a resumed run
    # that forgot it would pick a later epoch (with mode max the best is usually the last epoch either way).
    args = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny.yaml"),
            "--trainer.default_root_dir", str(root), "--trainer.max_epochs", str(EPOCHS),
            "--trainer.enable_progress_bar=false", "--checkpoint.mode", "min", *extra]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(Path(__file__).parent)]))
    return subprocess.run(args, cwd=root.parent, env=env, capture_output=True, text=True, timeout=600)


def best_and_last(root: Path):
    """The best checkpoint's path relative to the run folder and its score, and the last checkpoint's contents."""
    last = torch.load(max(root.glob("**/last.ckpt"), key=lambda p: p.stat().st_mtime), map_location="cpu",
                      weights_only=True)
    (state,) = [v for k, v in last["callbacks"].items() if k.startswith("ModelCheckpoint")]
    best = Path(state["best_model_path"])
    assert best.exists(), best
    return str(best.relative_to(root)), float(state["best_model_score"]), last


def test_a_run_killed_at_a_fixed_epoch_resumes_to_the_same_best_checkpoint_and_weights(tmp_path):
    straight = train(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    best_path, best_score, last = best_and_last(tmp_path / "straight")
    assert int(best_path.split("best-epoch=")[1][:3]) < KILL_AT, "the test needs a best epoch before the kill"

    killer = tmp_path / "kill.yaml"
    killer.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "test_resume.HardExitAtEpoch", "init_args": {"epoch": KILL_AT}}]}}))
    killed = train(tmp_path / "resumed", "--config", str(killer))
    assert killed.returncode == 9, killed.stderr[-3000:]
    assert torch.load(next((tmp_path / "resumed").glob("**/last.ckpt")), weights_only=True)["epoch"] == KILL_AT - 1

    resumed = train(tmp_path / "resumed", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "dirpath has changed" not in resumed.stderr
    r_path, r_score, r_last = best_and_last(tmp_path / "resumed")
    assert (r_path, r_score) == (best_path, best_score)
    assert r_last["epoch"] == last["epoch"] == EPOCHS - 1 and r_last["global_step"] == last["global_step"]
    assert r_last["state_dict"].keys() == last["state_dict"].keys()
    for key, value in last["state_dict"].items():
        assert torch.equal(r_last["state_dict"][key], value), key
    # One best checkpoint, as in the straight run: the resumed run kept pruning the same top-k.
    assert sorted(p.name for p in (tmp_path / "resumed").glob("**/best-*.ckpt")) == \
        sorted(p.name for p in (tmp_path / "straight").glob("**/best-*.ckpt"))
