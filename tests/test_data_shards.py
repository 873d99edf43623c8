"""Writing shards (layout, manifest, determinism, limits, atomicity), expanding patterns, cached scenes."""

import hashlib
import json
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image

import prh_stitch.data.shards as shards_module
from prh_stitch.data.scenes import SCENES_VERSION
from prh_stitch.data.shards import ensure_scene_shards, expand_urls, keys_digest, write_shards
from prh_stitch.data.sources import scenes
from prh_stitch.data.stream import scan


def tiny_samples(n, prefix="k", size=16):
    for i in range(n):
        image = Image.new("RGB", (size, size), (i * 7 % 256, 100, 200))
        yield f"{prefix}{i:04d}", image, f"sample number {i}", {"i": i}


def files_in(folder):
    return sorted(p.name for p in Path(folder).iterdir())


def test_layout_manifest_and_members(tmp_path):
    manifest = write_shards(tiny_samples(7), tmp_path, prefix="demo", samples_per_shard=3, source="tiny", seed=5)
    assert files_in(tmp_path) == ["demo-000000.tar", "demo-000001.tar", "demo-000002.tar", "demo-manifest.json"]
    assert json.loads((tmp_path / "demo-manifest.json").read_text()) == manifest
    assert manifest["num_samples"] == 7 and manifest["num_shards"] == 3
    assert [s["num_samples"] for s in manifest["shards"]] == [3, 3, 1]
    assert manifest["source"] == "tiny" and manifest["seed"] == 5
    assert manifest["pattern"] == "demo-{000000..000002}.tar"
    assert manifest["keys_sha256"] == keys_digest(f"k{i:04d}" for i in range(7))
    for shard in manifest["shards"]:
        data = (tmp_path / shard["name"]).read_bytes()
        assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
    with tarfile.open(tmp_path / "demo-000000.tar") as tar:
        assert tar.getnames() == [f"k000{i}.{ext}" for i in range(3) for ext in ("jpg", "json", "txt")]  # webdataset.TarWriter: sorted
        assert tar.extractfile("k0001.txt").read() == b"sample number 1"
        assert json.loads(tar.extractfile("k0001.json").read()) == {"i": 1}
    # What was written reads back as exactly these samples.
    assert scan(str(tmp_path / manifest["pattern"]))["keys_sha256"] == manifest["keys_sha256"]


@pytest.mark.parametrize("image_format", ["png", "webp"])
def test_lossless_formats_keep_pixels(tmp_path, image_format):
    write_shards(tiny_samples(2), tmp_path, image_format=image_format)
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        image = Image.open(tar.extractfile(f"k0001.{image_format}"))
        assert image.convert("RGB").getpixel((3, 3)) == (7, 100, 200)


def test_same_seed_gives_byte_identical_shards_and_manifest(tmp_path):
    outputs = []
    for run, seed in enumerate((3, 3, 4)):
        out = tmp_path / f"run{run}"
        write_shards(scenes(12, seed=seed, size=48), out, samples_per_shard=5, source="scenes", seed=seed)
        outputs.append({name: (out / name).read_bytes() for name in files_in(out)})
    assert outputs[0] == outputs[1]
    assert outputs[0]["shard-000000.tar"] != outputs[2]["shard-000000.tar"]


def test_max_shard_bytes_starts_new_shards(tmp_path):
    limit = 40 * 1024
    manifest = write_shards(tiny_samples(40, size=48), tmp_path, samples_per_shard=1000, max_shard_bytes=limit)
    assert manifest["num_shards"] > 1 and manifest["num_samples"] == 40
    assert all(s["bytes"] <= limit for s in manifest["shards"])


@pytest.mark.parametrize(
    "samples, message",
    [
        ([("a", Image.new("RGB", (4, 4)), "x", {}), ("a", Image.new("RGB", (4, 4)), "y", {})], "duplicate sample key 'a'"),
        ([("has.dot", Image.new("RGB", (4, 4)), "x", {})], "must match"),
        ([("ok", Image.new("RGB", (4, 4)), "   ", {})], "empty caption"),
        ([("ok", b"raw bytes", "x", {})], "must be a PIL image"),
        ([("ok", Image.new("RGB", (4, 4)), "x", {"bad": object()})], "not JSON-serialisable"),
        ([], "no samples"),
    ],
)
def test_bad_samples_raise_and_leave_nothing(tmp_path, samples, message):
    good_first = list(tiny_samples(5))  # so a failure happens after complete shards were written
    with pytest.raises(ValueError, match=message):
        write_shards(good_first + samples if samples else samples, tmp_path, samples_per_shard=2)
    assert files_in(tmp_path) == []


def test_a_failing_source_leaves_nothing(tmp_path):
    def source():
        yield from tiny_samples(5)
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        write_shards(source(), tmp_path, samples_per_shard=2)
    assert files_in(tmp_path) == []


def test_existing_series_needs_overwrite_and_stale_shards_go(tmp_path):
    write_shards(tiny_samples(5), tmp_path, samples_per_shard=1)
    with pytest.raises(ValueError, match="already holds 'shard' shards"):
        write_shards(tiny_samples(2), tmp_path)
    manifest = write_shards(tiny_samples(2), tmp_path, samples_per_shard=1, overwrite=True)
    assert files_in(tmp_path) == ["shard-000000.tar", "shard-000001.tar", "shard-manifest.json"]
    assert expand_urls(str(tmp_path)) == [str(tmp_path / s["name"]) for s in manifest["shards"]]


def test_invalid_writer_settings(tmp_path):
    with pytest.raises(ValueError, match="samples_per_shard"):
        write_shards(tiny_samples(1), tmp_path, samples_per_shard=0)
    with pytest.raises(ValueError, match="max_shard_bytes"):
        write_shards(tiny_samples(1), tmp_path, max_shard_bytes=100)
    with pytest.raises(ValueError, match="image_format"):
        write_shards(tiny_samples(1), tmp_path, image_format="gif")


# -- expand_urls ------------------------------------------------------------------------------------------

@pytest.fixture
def shard_files(tmp_path):
    paths = []
    for name in ("a-000000.tar", "a-000001.tar", "a-000002.tar", "b-000000.tar"):
        (tmp_path / name).write_bytes(b"")
        paths.append(str(tmp_path / name))
    return tmp_path, paths


def test_expand_braces_globs_folders_and_lists(shard_files):
    root, (a0, a1, a2, b0) = shard_files
    assert expand_urls(f"{root}/a-{{000000..000002}}.tar") == [a0, a1, a2]
    assert expand_urls(f"{root}/a-*.tar") == [a0, a1, a2]
    assert expand_urls(str(root)) == [a0, a1, a2, b0]
    assert expand_urls(f"{root}/a-{{000000,000002}}.tar,{root}/b-000000.tar") == [a0, a2, b0]
    assert expand_urls(f"{root}/b-*.tar::{root}/a-000001.tar") == [b0, a1]
    assert expand_urls([f"{root}/b-000000.tar", f"file://{root}/a-000000.tar"]) == [b0, a0]
    assert expand_urls(f"{root}/a-*.tar,{root}/a-000000.tar") == [a0, a1, a2]  # named twice, read once


def test_expand_passes_pipe_and_remote_urls_through_with_braces():
    assert expand_urls("pipe:curl -s http://h/x-{0..2}.tar") == [f"pipe:curl -s http://h/x-{i}.tar" for i in range(3)]
    assert expand_urls("https://h/x-{0..1}.tar,s3://b/y.tar") == ["https://h/x-0.tar", "https://h/x-1.tar", "s3://b/y.tar"]


def test_expand_errors_name_the_pattern_and_the_fix(shard_files):
    root, _ = shard_files
    with pytest.raises(ValueError, match=r"no shards match .*nothing-\*\.tar.*python -m prh_stitch\.data write"):
        expand_urls(f"{root}/nothing-*.tar")
    with pytest.raises(ValueError, match="1 shard.* do not exist"):
        expand_urls(f"{root}/a-{{000000..000003}}.tar")
    with pytest.raises(ValueError, match="no shards match"):
        expand_urls(" , ")


# -- ensure_scene_shards ------------------------------------------------------------------------------

def test_ensure_scene_shards_writes_once_and_splits_are_disjoint(tmp_path, monkeypatch):
    train, val = ensure_scene_shards(tmp_path, n_train=9, n_val=4, seed=1, size=32, samples_per_shard=4)
    folder = tmp_path / f"scenes-v{SCENES_VERSION}-9-4-s1-32px"
    assert Path(train).parent == folder and Path(val).parent == folder
    assert len(expand_urls(train)) == 3 and len(expand_urls(val)) == 1
    train_report, val_report = scan(train), scan(val)
    assert train_report["good"] == 9 and val_report["good"] == 4
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temp folder left

    # Disjoint seed streams: no val image equals a train image.
    from prh_stitch.data.stream import PairedShards
    train_pixels = {s["image"].tobytes() for s in PairedShards(train)}
    assert not train_pixels & {s["image"].tobytes() for s in PairedShards(val)}

    def no_writing(*args, **kwargs):
        raise AssertionError("the second call must not write")

    monkeypatch.setattr(shards_module, "write_shards", no_writing)
    assert ensure_scene_shards(tmp_path, n_train=9, n_val=4, seed=1, size=32, samples_per_shard=4) == (train, val)


def test_ensure_scene_shards_crash_leaves_no_complete_looking_folder(tmp_path, monkeypatch):
    real_write = shards_module.write_shards

    def crash_on_val(samples, out_dir, prefix="shard", **kwargs):
        if prefix == "val":
            raise KeyboardInterrupt  # as if the process were stopped half way
        return real_write(samples, out_dir, prefix=prefix, **kwargs)

    monkeypatch.setattr(shards_module, "write_shards", crash_on_val)
    with pytest.raises(KeyboardInterrupt):
        ensure_scene_shards(tmp_path, n_train=3, n_val=2, size=32)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(shards_module, "write_shards", real_write)
    train, val = ensure_scene_shards(tmp_path, n_train=3, n_val=2, size=32)
    assert scan(train)["good"] == 3 and scan(val)["good"] == 2


def test_ensure_scene_shards_rebuilds_a_folder_without_manifests(tmp_path):
    folder = tmp_path / f"scenes-v{SCENES_VERSION}-3-2-s0-32px"
    folder.mkdir()
    (folder / "train-000000.tar").write_bytes(b"half written")
    train, val = ensure_scene_shards(tmp_path, n_train=3, n_val=2, size=32)
    assert scan(train)["good"] == 3 and scan(val)["good"] == 2 and scan(train)["skipped"] == {}


def test_scene_folders_of_different_splits_never_share_a_name(tmp_path, monkeypatch):
    """{train, test} and {train, val} of equal sizes used to map to one folder, and the second call found it
    "without complete manifests" and deleted the first caller's shards."""
    from prh_stitch.data.shards import ensure_scene_splits

    with_test = ensure_scene_splits(tmp_path, {"train": 3, "test": 2}, size=32)
    with_val = ensure_scene_splits(tmp_path, {"train": 3, "val": 2}, size=32)
    assert Path(with_test["test"]).parent != Path(with_val["val"]).parent
    assert Path(with_val["val"]).parent.name == f"scenes-v{SCENES_VERSION}-3-2-s0-32px"  # the historical name
    assert scan(with_test["train"])["good"] == 3 and scan(with_test["test"])["good"] == 2  # still there
    monkeypatch.setattr(shards_module, "write_shards", lambda *a, **k: pytest.fail("the second call must not write"))
    assert ensure_scene_splits(tmp_path, {"train": 3, "test": 2}, size=32) == with_test


def test_ensure_scene_shards_validates_counts(tmp_path):
    with pytest.raises(ValueError, match="scene counts must be >= 1"):
        ensure_scene_shards(tmp_path, n_train=0, n_val=2)
    assert not os.listdir(tmp_path)
