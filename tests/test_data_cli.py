"""``python -m prh_stitch.data write|check``: round trips and every error path, through ``main(argv)``."""

import gzip
import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from prh_stitch.cli.data import main
from prh_stitch.data.commands import is_val as _is_val
from prh_stitch.data.shards import ensure_scene_shards
from prh_stitch.data.stream import PairedShards


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_write_then_check_round_trip(tmp_path, capsys):
    out = tmp_path / "scenes"
    code, stdout, _ = run(capsys, "write", "--source", "scenes", "--out", str(out), "--n", "20",
                          "--val-fraction", "0.25", "--samples-per-shard", "6", "--size", "32", "--seed", "4")
    assert code == 0
    written = json.loads(stdout)
    assert written["train"]["num_samples"] == 15 and written["train"]["num_shards"] == 3
    assert written["val"]["num_samples"] == 5 and written["val"]["num_shards"] == 1

    code, stdout, stderr = run(capsys, "check", written["train"]["pattern"])
    assert code == 0 and stderr == ""
    report = json.loads(stdout)
    assert report["good"] == 15 and report["skipped"] == {} and report["num_shards"] == 3
    assert report["keys_sha256"] == written["train"]["keys_sha256"]

    # Same data as the cached built-in with the same split sizes and seed.
    train, val = ensure_scene_shards(tmp_path / "cache", n_train=15, n_val=5, seed=4, size=32)
    cached = [s["image"].tobytes() for s in PairedShards(val)]
    assert cached == [s["image"].tobytes() for s in PairedShards(written["val"]["pattern"])]


def test_check_reports_skips_but_succeeds_when_some_samples_are_good(tmp_path, capsys):
    run(capsys, "write", "--source", "scenes", "--out", str(tmp_path), "--n", "4", "--val-fraction", "0", "--size", "32")
    (tmp_path / "train-000001.tar").write_bytes(b"not a tar")
    code, stdout, _ = run(capsys, "check", str(tmp_path / "train-*.tar"))
    report = json.loads(stdout)
    assert code == 0 and report["good"] == 4 and report["skipped"] == {"unreadable_shard": 1}


def test_check_without_good_samples_fails_with_one_line(tmp_path, capsys):
    (tmp_path / "bad-000000.tar").write_bytes(b"")
    code, stdout, stderr = run(capsys, "check", str(tmp_path / "bad-*.tar"))
    assert code == 1
    assert json.loads(stdout)["skipped"] == {"unreadable_shard": 1}
    assert stderr.count("\n") == 1 and stderr.startswith("error: no good samples")


def test_check_pattern_matching_nothing(tmp_path, capsys):
    code, stdout, stderr = run(capsys, "check", str(tmp_path / "nothing-{000000..000003}.tar"))
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and "no shards match" in stderr and "prh_stitch.data write" in stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--source", "sceens"], "unknown data source 'sceens'. Did you mean 'scenes'?"),
        (["--source", "folder"], "needs --captions"),
        (["--source", "folder", "--captions", "/nonexistent/pairs.csv"], "does not exist"),
        (["--source", "scenes", "--val-fraction", "1.5"], "--val-fraction must be in"),
        (["--source", "scenes", "--n", "0"], "--n must be >= 1"),
        (["--source", "scenes", "--n", "5", "--val-fraction", "0.1"], "val series would be empty"),
        (["--source", "scenes", "--n", "3", "--max-shard-bytes", "10"], "max_shard_bytes"),
    ],
)
def test_write_errors_are_one_line_and_write_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "write", "--out", str(out), "--size", "32", *argv)
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and message in stderr
    assert not out.exists() or list(out.iterdir()) == []


def test_write_refuses_existing_output_unless_overwrite(tmp_path, capsys):
    args = ["write", "--source", "scenes", "--out", str(tmp_path), "--n", "4", "--size", "32", "--val-fraction", "0.5"]
    assert run(capsys, *args)[0] == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    code, _, stderr = run(capsys, *args)
    assert code == 2 and "--overwrite" in stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert run(capsys, *args, "--overwrite")[0] == 0


def test_folder_source_round_trip_and_bad_rows(tmp_path, capsys):
    for i in range(5):
        Image.new("RGB", (12, 12), (i * 40, 10, 10)).save(tmp_path / f"{i}.png")
    captions = tmp_path / "pairs.tsv"
    captions.write_text("path\ttext\n" + "".join(f"{i}.png\ta reddish square number {i}\n" for i in range(5)))
    code, stdout, _ = run(capsys, "write", "--source", "folder", "--captions", str(captions),
                          "--out", str(tmp_path / "out"), "--val-fraction", "0.2")
    assert code == 0
    written = json.loads(stdout)
    val = list(PairedShards(written["val"]["pattern"]))
    assert [s["caption"] for s in val] == ["a reddish square number 4"]  # the interleaved rule picks row 4 of 5

    captions.write_text("path\ttext\n0.png\tfine\nmissing.png\tgone\n")
    code, _, stderr = run(capsys, "write", "--source", "folder", "--captions", str(captions),
                          "--out", str(tmp_path / "bad"), "--val-fraction", "0")
    assert code == 2 and "missing.png does not exist" in stderr and "--skip-bad-rows" in stderr
    assert list((tmp_path / "bad").iterdir()) == []


def test_fashion_mnist_source_through_the_cli(tmp_path, capsys, monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, size=(10, 28, 28), dtype=np.uint8)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, 10, 28, 28) + images.tobytes())
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 0x801, 10) + np.arange(10, dtype=np.uint8).tobytes())
    monkeypatch.setenv("PRH_STITCH_FASHION_MNIST", str(tmp_path))
    code, stdout, _ = run(capsys, "write", "--source", "fashion_mnist", "--split", "test",
                          "--out", str(tmp_path / "out"), "--val-fraction", "0")
    assert code == 0
    samples = list(PairedShards(json.loads(stdout)["train"]["pattern"], image_mode=None))
    assert len(samples) == 10 and samples[3]["meta"]["label_name"] == "Dress"
    # Written as PNG by default: the pixels survive exactly.
    assert np.array_equal(np.asarray(samples[3]["image"]), images[3])

    monkeypatch.setenv("PRH_STITCH_FASHION_MNIST", str(tmp_path / "empty"))
    code, _, stderr = run(capsys, "write", "--source", "fashion_mnist", "--out", str(tmp_path / "x"))
    assert code == 2 and "apt-get install dataset-fashion-mnist" in stderr


def test_argparse_errors_return_a_status(capsys):
    assert main(["write", "--source", "scenes"]) == 2
    err = capsys.readouterr().err  # jsonargparse names the missing option by its key, write.out
    assert err.count("\n") == 1 and "required" in err and "write.out" in err
    assert main([]) == 2


def test_val_split_rule_is_exact():
    from fractions import Fraction

    chosen = [i for i in range(1000) if _is_val(i, Fraction("0.1"))]
    assert len(chosen) == 100 and chosen[:3] == [9, 19, 29]


def test_module_entry_point_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "prh_stitch.data", "check", str(tmp_path / "*.tar")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "no shards match" in result.stderr
