"""The feature store and the score cache under faults (#14): each case ends in a clear one-line error or a correct
result, nothing wrong is reused and nothing is left behind.

Cases: a cut ``pipe:`` stream, flipped bytes in a stored array, shuffled keys in an index, a cut array, a cut
index, an edited score record, a full disk (injected, and on a real small tmpfs where a private mount namespace
is allowed), a read-only store, two extractors of one entry, temporary files of dead writers, a moved cache, and
the smaller data checks (repeated keys, train = val, a cut inside a member's header, batch sizes, file modes).
"""

import errno
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from prh_stitch.alignment.score_cache import ScoreCache, score_key
from prh_stitch.alignment.scoring import score_pair
from prh_stitch.alignment.settings import ScoreSettings
from prh_stitch.data.datamodule import StitchingDataModule
from prh_stitch.data.features import CorruptEntry, FeatureStore
from prh_stitch.data.shards import ensure_scene_shards
from prh_stitch.data.store_safety import verify_store
from prh_stitch.data.stream import scan
from prh_stitch.errors import UserError
from test_data_stream import write_tar
from test_features import REPO, good_shard, run_cli_inprocess, sample_members, tiny_vit  # noqa: F401 (fixture)

PY = sys.executable


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    return [good_shard(folder, 0, 7), good_shard(folder, 1, 5)]


@pytest.fixture(scope="module")
def clean(tmp_path_factory, shards, tiny_vit):
    """A committed entry (``entry``) and its features, copied by each test that damages it."""
    root = tmp_path_factory.mktemp("clean") / "store"
    features = FeatureStore(root, chunk_size=4).get(tiny_vit, shards, layers=[-1, 1], name="entry", progress=False)
    return root, {k: v.clone() for k, v in features.features.items()}, features.keys


def damaged_copy(tmp_path, clean):
    root = tmp_path / "store"
    shutil.copytree(clean[0], root)
    return root, root / "entry"


def leftovers(root):
    """Temporary and lock files anywhere under ``root``."""
    return sorted(str(p) for p in Path(root).rglob("*") if p.name.endswith((".tmp", ".lock")) or ".tmp-" in p.name)


def one_line(err):
    return err.count("\n") == 1 and "Traceback" not in err


# -- a stream that fails is never committed ---------------------------------------------------------------


def test_a_cut_pipe_stream_commits_nothing_and_names_the_shard(tmp_path, capsys, shards):
    whole = Path(shards[0])
    fixed, half = tmp_path / "fixed", whole.stat().st_size // 2
    # Until `fixed` exists the command sends the first half and fails (a network blip); then all of it.
    url = f"pipe:head -c {half} {whole}; test -e {fixed} || exit 1; tail -c +{half + 1} {whole}"
    args = ["extract", "--encoder", "tiny_vit", "--data", f"{url}::{shards[1]}", "--out", str(tmp_path / "store"),
            "--name", "entry", "--chunk-size", "4", "--no-progress"]
    code, out, err = run_cli_inprocess(capsys, *args)
    assert code == 2 and out == "" and one_line(err)
    assert "1 shard(s) were not read to their end" in err and f"head -c {half}" in err and "pipe_failed" in err
    assert not (tmp_path / "store" / "entry" / "index.json").exists() and leftovers(tmp_path / "store") == []

    fixed.touch()  # the source is repaired: the same URL now gives every sample, and every sample is stored
    code, out, err = run_cli_inprocess(capsys, *args)
    assert code == 0, err
    assert json.loads(out)["num_samples"] == 12 and json.loads(out)["status"] == "resumed"


# -- damaged entries are found, named, and repaired ---------------------------------------------------------


def flip_bytes(entry):
    path = entry / "layer-0.npy"
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 200, len(data) - 100):  # finite garbage in the last rows' data
        data[i] ^= 0x01
    path.write_bytes(bytes(data))


def shuffle_keys(entry):
    index = json.loads((entry / "index.json").read_text())
    index["keys"] = index["keys"][1:] + index["keys"][:1]
    (entry / "index.json").write_text(json.dumps(index))


def cut_array(entry):
    path = entry / "layer-1.npy"
    path.write_bytes(path.read_bytes()[:-64])


def cut_index(entry):
    path = entry / "index.json"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def strip_hashes(entry):  # an entry as an older version wrote it
    index = json.loads((entry / "index.json").read_text())
    del index["sha256"]
    (entry / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("damage, problem", [
    (flip_bytes, "layer-0.npy does not match its recorded SHA-256"),
    (shuffle_keys, "the keys, captions or labels in index.json do not match their recorded hash"),
    (cut_array, "layer-1.npy holds"),
    (cut_index, "index.json cannot be read"),
    (strip_hashes, "index.json has no content hashes: an entry of an older version"),
])
def test_a_damaged_entry_is_one_error_naming_it_and_the_repair_rebuilds_it(tmp_path, capsys, clean, shards, tiny_vit,
                                                                          damage, problem):
    root, entry = damaged_copy(tmp_path, clean)
    damage(entry)
    store = FeatureStore(root, chunk_size=4)
    with pytest.raises(CorruptEntry) as caught:
        store.get(tiny_vit, shards, layers=[-1, 1], name="entry", progress=False)
    message = str(caught.value)
    assert problem in message and str(entry) in message and "\n" not in message
    assert f"python -m prh_stitch.data verify --repair --out {root}" in message

    code, out, err = run_cli_inprocess(capsys, "verify", "--out", str(root))
    assert code == 1 and one_line(err) and "(e.g. entry: " in err and "verify --repair" in err
    assert json.loads(out)["damaged"][0]["problem"].startswith(problem.split(" holds")[0])
    code, out, err = run_cli_inprocess(capsys, "verify", "--out", str(root), "--repair")
    assert code == 0 and json.loads(out)["repaired"] == ["entry"] and not entry.exists()

    again = store.get(tiny_vit, shards, layers=[-1, 1], name="entry", progress=False)  # extracted afresh
    assert again.keys == clean[2] and store.extractions == 1
    for name, reference in clean[1].items():
        torch.testing.assert_close(again.features[name], reference)
    assert verify_store(root) == {"root": str(root), "checked": 1, "ok": 1, "damaged": [], "repaired": []}


# -- scores follow the features they came from --------------------------------------------------------------


def test_scores_are_keyed_on_feature_content_and_an_edited_record_is_recomputed(tmp_path, clean, shards, tiny_vit):
    fa = FeatureStore(clean[0]).read(clean[0] / "entry")
    fb = FeatureStore(clean[0]).read(clean[0] / "entry")
    settings = ScoreSettings(metrics=("cka",), k=3, permutations=2, bootstrap=2, max_null=0)
    cache = ScoreCache(tmp_path / "scores")
    first = score_pair("a", fa, "b", fb, "cka", settings, torch.device("cpu"), cache)
    path, = (tmp_path / "scores").iterdir()
    stored = json.loads(path.read_text())
    stored["record"]["score"] = 0.0797  # an edit: the checksum no longer matches
    path.write_text(json.dumps(stored))
    again = score_pair("a", fa, "b", fb, "cka", settings, torch.device("cpu"), cache)
    assert again["score"] == first["score"] != 0.0797
    assert cache.get(path.stem)["score"] == first["score"]  # rewritten, and it verifies again

    # Other content under the same encoder and data fingerprints: another key, so no stale score is returned.
    other = FeatureStore(clean[0]).read(clean[0] / "entry")
    other.info = dict(other.info, content_sha256="0" * 64)
    opts = {}
    assert score_key(cache, fa, fb, "cka", opts, settings) != score_key(cache, other, fb, "cka", opts, settings)


# -- full disks and read-only stores --------------------------------------------------------------------------


def test_a_full_disk_during_the_commit_is_one_error_naming_the_entry_and_leaves_nothing(tmp_path, shards, tiny_vit,
                                                                                        monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    store = FeatureStore(tmp_path / "store", chunk_size=4)
    with pytest.raises(UserError) as caught:
        store.get(tiny_vit, shards, layers=[-1, 1], name="entry", progress=False)
    message = str(caught.value)
    assert message.startswith(f"no space left on the device while writing feature store entry {tmp_path / 'store' / 'entry'}")
    assert "PRH_STITCH_CACHE" in message and "\n" not in message
    entry = tmp_path / "store" / "entry"
    assert leftovers(tmp_path) == [] and sorted(p.name for p in entry.iterdir()) == ["identity.json", "parts"]
    monkeypatch.undo()  # space again: the rerun commits from the parts without encoding anything
    again = store.get(tiny_vit, shards, layers=[-1, 1], name="entry", progress=False)
    assert again.info["extraction"]["samples_encoded"] == 0 and len(again) == 12


def in_private_mount(tmp_path, mount, command):
    """Run ``command`` (a shell line) with a tmpfs mounted by ``mount`` options at tmp_path/mnt, in a private user and
    mount namespace (no root needed where unprivileged user namespaces are allowed); skip where they are not."""
    point = tmp_path / "mnt"
    point.mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {point}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private namespace here: {probe.stderr.strip() or probe.returncode}")
    script = f"mount -t tmpfs -o {mount} tmpfs {point} && {command}"
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO))


def test_a_full_real_tmpfs_is_one_error_and_leaves_no_temporary_files(tmp_path, shards):
    point = tmp_path / "mnt"
    extract = (f"{PY} -m prh_stitch.data extract --encoder tiny_vit --layers -1 0 1 --data {shards[0]},{shards[1]} "
               f"--out {point}/store --name entry --chunk-size 2 --no-progress")
    # 36 KiB: identity.json and the 7 parts (a 4 KiB page each) fit, the parts and the layer arrays do not; the
    # files left are listed before the namespace (and its mount) goes.
    done = in_private_mount(tmp_path, "size=36k", f"{extract}; echo rc=$?; find {point} -name '*.tmp*' -o -name '*.lock'")
    assert "rc=2" in done.stdout, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "no space left on the device while writing feature store entry" in errors[0]
    assert "Traceback" not in done.stderr and done.stdout.strip().endswith("rc=2")  # find printed nothing


def test_a_read_only_store_is_one_line_naming_the_folder(tmp_path, shards):
    point = tmp_path / "mnt"
    done = in_private_mount(tmp_path, "ro,size=64k", f"{PY} -m prh_stitch.data extract --encoder tiny_vit "
                            f"--data {shards[0]} --out {point}/features --no-progress")
    assert done.returncode == 2 and one_line(done.stderr), done.stderr[-2000:]
    assert f"the feature store folder {point}/features is not writable" in done.stderr
    assert "set PRH_STITCH_CACHE to a writable folder" in done.stderr


# -- processes -------------------------------------------------------------------------------------------------


def waiting_for(lock):
    """Whether some process waits for the flock of ``lock`` (/proc/locks marks blocked requests with '->')."""
    try:
        inode = lock.stat().st_ino
    except FileNotFoundError:
        return False
    return any("->" in line and "FLOCK" in line and line.split()[-3].endswith(f":{inode}")
               for line in Path("/proc/locks").read_text().splitlines())


def test_a_second_extractor_waits_for_the_first_and_reads_its_entry(tmp_path, shards):
    gate = tmp_path / "gate"
    data = f"{shards[0]}::pipe:while [ ! -e {gate} ]; do sleep 0.05; done; cat {shards[1]}"
    args = [PY, "-m", "prh_stitch.data", "extract", "--encoder", "tiny_vit", "--data", data, "--out",
            str(tmp_path / "store"), "--name", "entry", "--chunk-size", "4", "--no-progress"]
    processes = []
    try:
        processes.append(subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        deadline = time.monotonic() + 180
        while not list((tmp_path / "store" / "entry" / "parts").glob("s000000-*")):  # the first holds the lock
            assert processes[0].poll() is None and time.monotonic() < deadline, processes[0].stderr.read()[-2000:]
            time.sleep(0.05)
        processes.append(subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        while not waiting_for(tmp_path / "store" / ".entry.lock"):  # the second is blocked on the entry's lock
            assert processes[1].poll() is None and time.monotonic() < deadline, processes[1].stderr.read()[-2000:]
            time.sleep(0.05)
        gate.touch()
        outputs = [p.communicate(timeout=300) for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert [p.returncode for p in processes] == [0, 0], [o[1][-2000:] for o in outputs]
    one, two = (json.loads(o[0]) for o in outputs)
    assert (one["status"], two["status"]) == ("extracted", "hit")
    assert one["samples_encoded"] == 12 and two["samples_encoded"] == 0 and two["num_samples"] == 12
    assert leftovers(tmp_path / "store") == []


def test_temporary_files_of_dead_writers_are_removed_on_the_next_open(tmp_path, clean, shards, tiny_vit):
    root, entry = damaged_copy(tmp_path, clean)
    dead = subprocess.run([PY, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has exited
    stale = [entry / f".layer-0.npy.{dead_pid}.ab12cd34.tmp", entry / "parts" / f".x.safetensors.{dead_pid}.k9_z0abc.tmp",
             entry / ".index.json.q1w2e3r4.tmp"]  # the last: an older writer's name, without a process id
    live = entry / f".layer-1.npy.{os.getpid()}.ab12cd34.tmp"
    (entry / "parts").mkdir()
    for path in stale + [live]:
        path.write_bytes(b"partial")
    features = FeatureStore(root).get(tiny_vit, shards, layers=[-1, 1], name="entry", progress=False)
    assert features.keys == clean[2]
    assert not any(p.exists() for p in stale) and live.exists()  # a live writer's file is its own


def test_moving_the_cache_keeps_built_in_scene_entries(tmp_path, tiny_vit):
    cache = tmp_path / "cache"
    train, _ = ensure_scene_shards(cache / "scenes", n_train=6, n_val=2, size=32)
    FeatureStore(cache / "features").get(tiny_vit, [train], progress=False)
    moved = tmp_path / "moved"
    shutil.move(cache, moved)
    train, _ = ensure_scene_shards(moved / "scenes", n_train=6, n_val=2, size=32)
    store = FeatureStore(moved / "features")
    features = store.get(tiny_vit, [train], progress=False)
    assert store.hits == 1 and store.extractions == 0 and len(features) == 6
    assert features.info["entry"].startswith(str(moved))


# -- the smaller data checks ----------------------------------------------------------------------------------


def test_check_fails_on_repeated_keys(tmp_path, capsys):
    url = write_tar(tmp_path / "dup.tar", sample_members(0, 0) + sample_members(0, 1) + sample_members(0, 0))
    code, out, err = run_cli_inprocess(capsys, "check", url)
    assert code == 1 and json.loads(out)["duplicate_keys"] == 1
    assert one_line(err) and "1 sample key(s)" in err and "repeat" in err


def test_train_shards_equal_to_val_shards_are_refused(tmp_path, shards):
    dm = StitchingDataModule(train=",".join(shards), val=",".join(reversed(shards)), cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="data.train and data.val are the same shards"):
        dm.shard_urls("val")


def test_a_cut_inside_a_members_header_makes_its_sample_truncated(tmp_path):
    url = write_tar(tmp_path / "whole.tar", sample_members(0, 0) + sample_members(0, 1))
    with tarfile.open(url) as tar:
        caption = next(m for m in tar.getmembers() if m.name == "s0-001.txt")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(Path(url).read_bytes()[: caption.offset + 100])  # inside the caption's header
    report = scan(str(cut))
    assert report["good"] == 1 and report["skipped"] == {"truncated_sample": 1, "truncated_shard": 1}


def test_batch_sizes_are_checked_before_any_work(tmp_path, shards, tiny_vit):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        FeatureStore(tmp_path / "store").get(tiny_vit, shards, batch_size=0, progress=False)
    assert not (tmp_path / "store").exists()
    with pytest.raises(ValueError, match="data.batch_size and data.extract_batch_size must be >= 1"):
        StitchingDataModule(batch_size=0, cache_dir=str(tmp_path))


def test_store_files_and_score_records_follow_the_umask(tmp_path, shards, tiny_vit):
    old = os.umask(0o022)
    try:
        FeatureStore(tmp_path / "store").get(tiny_vit, shards[:1], progress=False)
        ScoreCache(tmp_path / "scores").put("k", {"score": 1.0})
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 4  # identity, index, one layer, the score record
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o644)}
