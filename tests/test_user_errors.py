"""Every user-facing failure is one line ``PROG: error: ...`` naming the problem and the fix, exit status 2, no
traceback: a read-only cache, an unsafe checkpoint, weights that do not fit their metadata, a learning rate too
large for float32, and a diverged run (which must say it diverged, not blame the data)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prh_stitch
from prh_stitch.checkpoint import CHECKPOINT_KEY
from prh_stitch.cli import main as train_main
from prh_stitch.cli.evaluate import main as evaluate_main
from prh_stitch.encoders import EncoderSpec
from prh_stitch.errors import user_message
from prh_stitch.losses import Diverged, check_stitched
from prh_stitch.stitchers import Stitcher

from test_evaluate import write_scene_shards

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")


def one_error_line(stderr: str, prog: str) -> str:
    """The error line; anything else on stderr is the libraries' logging, never a traceback or a second error."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"{prog}: error: "), stderr[-3000:]
    return errors[0]


def tiny_train(root, *extra):
    return ["--config", TINY, "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar=false",
            "--trainer.max_epochs=1", *extra]


# ---- a cache folder that cannot be written ----------------------------------------------------------------

def read_only_command(folder: Path):
    """A command prefix that runs with ``folder`` mounted read-only (a private mount namespace), or None."""
    probe = ["unshare", "-rm", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && '
             '! touch "$0/probe" 2>/dev/null', str(folder)]
    if shutil.which("unshare") and subprocess.run(probe, capture_output=True).returncode == 0:
        return ["unshare", "-rm", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && '
                'shift && exec "$@"', str(folder), "--"]
    if os.geteuid() != 0:  # without mounts: permission bits, which bind anyone but root
        folder.chmod(0o555)
        return []
    return None


def test_a_read_only_cache_is_one_line_naming_the_folder_and_prh_stitch_cache(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    prefix = read_only_command(cache)
    if prefix is None:
        pytest.skip("running as root without user namespaces: no way to make a folder read-only here")
    data = write_scene_shards(tmp_path / "shards", 16)
    env = dict(os.environ, PRH_STITCH_CACHE=str(cache), PYTHONPATH=str(REPO))
    # `sh -c 'shift && exec "$@"' folder -- cmd...` runs cmd; the leading "--" is $1, shifted away.
    command = prefix + [sys.executable, str(REPO / "evaluate.py"), "align", "--vision", "tiny_vit", "--text",
                        "tiny_bert", "--data", data, "--out", str(tmp_path / "report"), "--no-progress",
                        "--device", "cpu"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    line = one_error_line(result.stderr, "evaluate.py")
    # The store notices first (its folder under the cache), or the shared wrapper does (the cache folder itself).
    assert f"folder {cache}" in line and ("(Read-only file system" in line or "Permission denied" in line)
    assert "set PRH_STITCH_CACHE" in line and not (tmp_path / "report").exists()


@pytest.mark.parametrize("number, reason", [("EROFS", "Read-only file system"), ("EACCES", "Permission denied"),
                                            ("ENOSPC", "No space left on device")])
def test_unwritable_and_full_folders_name_the_nearest_existing_folder(tmp_path, monkeypatch, number, reason):
    import errno

    code = getattr(errno, number)
    message = user_message(OSError(code, os.strerror(code), str(tmp_path / "features" / "entry" / "x.npy")))
    assert message.startswith(f"cannot write to {tmp_path} ({reason})") and "PRH_STITCH_CACHE" in message
    monkeypatch.setenv("PRH_STITCH_CACHE", str(tmp_path))
    message = user_message(OSError(code, os.strerror(code), str(tmp_path / "features" / "entry" / "x.npy")))
    assert message.startswith(f"cannot write to the cache folder {tmp_path} ({reason})")
    assert user_message(OSError(errno.EIO, "I/O error", "x")) is None  # not the user's setup: keeps its traceback


# ---- checkpoints ----------------------------------------------------------------------------------------

def test_an_unsafe_checkpoint_given_to_train_is_refused_in_one_line_and_never_runs(tmp_path, capsys):
    ran = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {ran}",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "callbacks": Payload()}, evil)
    assert train_main(tiny_train(tmp_path / "run", "--ckpt_path", str(evil))) == 2
    line = one_error_line(capsys.readouterr().err, "train.py")
    assert "refusing to load" in line and str(evil) in line and not ran.exists()


def mislabelled_checkpoint(path: Path) -> Path:
    """Weights of a linear stitcher under metadata that says ``mlp``."""
    linear = Stitcher("linear", 32, 32, "none", "none")
    mlp = Stitcher("mlp", 32, 32, "none", "none", hidden_dim=16)
    spec = EncoderSpec(name="tiny_bert").to_dict()
    torch.save({"state_dict": {f"stitcher.{k}": v for k, v in linear.state_dict().items()}, CHECKPOINT_KEY: {
        "format": 1, "version": "0.1.0", "stitcher": mlp.config(), "source": spec, "target": dict(spec),
        "source_layer": "layers.1", "target_layer": "layers.1", "objective": {"name": "mse", "options": {}}}}, path)
    return path


def test_weights_that_do_not_fit_the_checkpoints_metadata_are_one_line(tmp_path, capsys):
    ckpt = mislabelled_checkpoint(tmp_path / "mislabelled.ckpt")
    with pytest.raises(ValueError, match="stitcher 'mlp' that its weights do not fit .*(Missing|Unexpected) key"):
        prh_stitch.load_stitcher(ckpt)
    data = write_scene_shards(tmp_path / "shards", 16)
    assert evaluate_main(["stitch", "--ckpt", str(ckpt), "--data", data, "--out", str(tmp_path / "out"),
                          "--no-progress", "--device", "cpu"]) == 2
    line = one_error_line(capsys.readouterr().err, "evaluate.py")
    assert "'mlp'" in line and "weights do not fit" in line and "retrain" in line
    assert not (tmp_path / "out").exists()


def test_torchs_state_dict_mismatch_names_the_first_problem():
    with pytest.raises(RuntimeError) as raised:
        Stitcher("mlp", 8, 8, "none", "none", hidden_dim=4).load_state_dict(
            Stitcher("linear", 8, 8, "none", "none").state_dict())
    message = user_message(raised.value)
    assert message.startswith("the checkpoint's weights do not fit this model (Missing key(s) in state_dict")
    assert message.endswith("with the model options it was trained with") and "\n" not in message


# ---- training that cannot work or blew up -----------------------------------------------------------------

def test_a_learning_rate_too_large_for_float32_is_one_line(tmp_path, capsys):
    assert train_main(tiny_train(tmp_path, "--model.lr", "1e38")) == 2
    line = one_error_line(capsys.readouterr().err, "train.py")
    assert "overflow" in line and "--model.lr" in line


def test_a_diverged_run_says_it_diverged_with_the_step_and_the_lr(tmp_path, capsys):
    assert train_main(tiny_train(tmp_path, "--model.lr", "1e20")) == 2
    line = one_error_line(capsys.readouterr().err, "train.py")
    assert "training diverged at step" in line and "(lr 1e+20)" in line and "data is not at fault" in line
    assert re.search(r"diverged at step \d+ \(lr 1e\+20\)", line), line  # the step as a number, not missing
    assert "zero rows" not in line


def test_divergence_is_told_apart_from_bad_data_rows():
    source = torch.randn(4, 3)
    check_stitched(source * 2, source, 5, 1e-3)  # a working stitcher
    source[1] = 0.0
    check_stitched(torch.zeros(4, 3) + (source != 0), source, 5, 1e-3)  # a zero output for a zero input: the data's
    for pred, what in ((torch.full((4, 3), float("inf")), "not finite"), (torch.zeros(4, 3), "zero"),
                       (torch.full((4, 3), 1e30), "so large that their norm overflows float32")):
        with pytest.raises(Diverged, match=rf"diverged at step 5 \(lr 0.1\).* 3 of 4 rows are {what} "):
            check_stitched(pred, source, 5, 0.1)
