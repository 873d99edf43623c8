"""The feature store: exact counts and skip reasons, resuming after SIGKILL, DDP splits, memory maps, fingerprints.

Shards are written on the fly: each good sample's caption says its shard and index ("shard 2 sample 3"), its
image is a flat colour derived from the same two numbers, so every reference below rebuilds the expected
inputs from scratch and runs the encoder directly.
"""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prh_stitch.data.__main__ import main as data_main
from prh_stitch.data.features import FeatureStore, Ranks, UnitDone, UnitReader
from prh_stitch.data.shards import write_shards
from prh_stitch.encoders import build_encoder
from test_data_stream import write_tar

REPO = Path(__file__).resolve().parents[1]


# -- shards with known contents -------------------------------------------------------------------------


def colour(shard, index):
    return (40 * shard % 256, (23 * index + 5) % 256, (shard * 7 + index * 11) % 256)


def scene(shard, index, size=24):
    return Image.new("RGB", (size, size), colour(shard, index))


def good_shard(folder, shard, n, start=0):
    """Shard ``shard`` with samples ``start .. start + n - 1`` through the project's own writer; returns its url."""
    samples = ((f"s{shard}-{i:03d}", scene(shard, i), f"shard {shard} sample {i}", {"label": i % 3})
               for i in range(start, start + n))
    manifest = write_shards(samples, folder, prefix=f"shard{shard}", samples_per_shard=n + 1, image_format="png")
    return str(Path(folder) / manifest["pattern"])


def png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def sample_members(shard, index, image=True, caption=None):
    key = f"s{shard}-{index:03d}"
    members = [(f"{key}.png", png(scene(shard, index)))] if image else []
    text = f"shard {shard} sample {index}" if caption is None else caption
    if text is not False:
        members.append((f"{key}.txt", text.encode()))
    members.append((f"{key}.json", json.dumps({"label": index % 3}).encode()))
    return members


def build_dataset(folder):
    """Good, bad and broken shards. Returns (urls, {good key: (shard, index)}, expected skip counts)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    urls, good = [], {}
    for shard, n in ((0, 7), (1, 5)):
        urls.append(good_shard(folder, shard, n))
        good.update({f"s{shard}-{i:03d}": (shard, i) for i in range(n)})
    # Shard 2: one sample of each per-sample failure between good ones.
    members = sample_members(2, 0)
    members += [("s2-001.png", b"\x89PNG not an image"), ("s2-001.txt", b"shard 2 sample 1")]
    members += sample_members(2, 2, caption=False)  # missing caption
    members += sample_members(2, 3, caption="  \n")  # empty caption
    members += sample_members(2, 4)
    urls.append(write_tar(folder / "broken-2.tar", members))
    good.update({"s2-000": (2, 0), "s2-004": (2, 4)})
    # Shard 3: cut inside the image data of its last sample.
    whole = good_shard(folder / "whole", 3, 4)
    with tarfile.open(whole) as tar:
        last_image = [m for m in tar.getmembers() if m.name == "s3-003.png"][0]
    cut = folder / "cut-3.tar"
    cut.write_bytes(Path(whole).read_bytes()[: last_image.offset_data + 10])
    urls.append(str(cut))
    good.update({f"s3-{i:03d}": (3, i) for i in range(3)})
    # Shard 4: not a tar at all.
    garbage = folder / "garbage-4.tar"
    garbage.write_bytes(b"definitely not a tar archive" * 30)
    urls.append(str(garbage))
    skips = {"undecodable_image": 1, "missing_caption": 1, "empty_caption": 1,
             "truncated_sample": 1, "truncated_shard": 1, "unreadable_shard": 1}
    return urls, good, skips


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def tiny_vit():
    return build_encoder("tiny_vit")


def direct_features(encoder, good, layers=(-1,)):
    """The reference: the encoder run on each expected image alone, in key order."""
    rows = {}
    for key in sorted(good):
        shard, index = good[key]
        batch = encoder.collate([encoder.transform(scene(shard, index))])
        rows[key] = encoder.encode(batch, list(layers))
    return [torch.cat([rows[key][i] for key in sorted(good)]) for i in range(len(layers))]


# -- extraction -----------------------------------------------------------------------------------------


# Shards 0-2 end with their end marker; shard 3 is cut and shard 4 is not a tar, so no entry holding them is committed.
WHOLE = 3
SAMPLE_SKIPS = {"undecodable_image": 1, "missing_caption": 1, "empty_caption": 1}


def whole_shards(dataset):
    urls, good, _ = dataset
    return urls[:WHOLE], {k: v for k, v in good.items() if v[0] < WHOLE}, SAMPLE_SKIPS


def test_extraction_keeps_every_good_sample_and_counts_each_skip_with_and_without_workers(tmp_path, dataset, tiny_vit):
    urls, good, skips = whole_shards(dataset)
    results = {}
    for workers in (0, 2):
        store = FeatureStore(tmp_path / f"store{workers}", chunk_size=3)
        results[workers] = store.get(tiny_vit, urls, layers=[-1, 1], batch_size=2, num_workers=workers, progress=False)
    one, two = results[0], results[2]
    assert one.keys == sorted(good)
    assert one.captions == [f"shard {good[k][0]} sample {good[k][1]}" for k in one.keys]
    assert one.labels == [good[k][1] % 3 for k in one.keys]
    for result in (one, two):
        counts = result.info["skipped"]
        assert counts["good"] == len(good) and counts["skipped"] == skips
        per_shard = {entry["url"]: entry for entry in counts["shards"]}
        assert per_shard[urls[2]]["good"] == 2 and per_shard[urls[0]]["skipped"] == {}
    assert two.keys == one.keys and two.info["skipped"] == one.info["skipped"]
    reference = direct_features(tiny_vit, good, layers=[-1, 1])
    for i, layer in enumerate(["pre_logits", "blocks.1"]):
        # Batches never span a unit of work, so the worker count changes nothing, to the bit.
        assert torch.equal(one.features[layer], two.features[layer])
        torch.testing.assert_close(one.features[layer], reference[i], rtol=1e-4, atol=1e-5)


def test_reads_are_memory_mapped_from_the_entry_files(tmp_path, dataset, tiny_vit):
    urls, good, _ = dataset
    store = FeatureStore(tmp_path / "store")
    store.get(tiny_vit, urls[:2], progress=False)
    again = FeatureStore(tmp_path / "store")
    features = again.get(tiny_vit, urls[:2], progress=False)
    assert again.hits == 1 and again.extractions == 0
    entry = Path(features.info["entry"])
    assert not (entry / "parts").exists(), "parts should be merged away once the entry is complete"
    tensor = features.features["pre_logits"]
    mapped = mapped_ranges(entry / "layer-0.npy")
    address = tensor.data_ptr()
    assert any(lo <= address < hi for lo, hi in mapped), "the features are not read from a mapping of the entry file"
    assert tensor.shape == (len([k for k in good if k.startswith(("s0", "s1"))]), 64)


def mapped_ranges(path):
    """Address ranges this process maps from ``path`` (Linux /proc/self/maps)."""
    target = os.path.realpath(path)
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


# Raw samples per shard of ``build_dataset`` (shard 3 holds 4 before its cut, shard 4 none), and manifests that
# overstate or understate them: a stale count must not lose or repeat a sample, a unit or a shard's end.
RAW_COUNTS = {"none": None, "true": [7, 5, 5, 4, 0], "over": [9, 5, 6, 6, 2], "under": [5, 3, 5, 2, 0]}


@pytest.mark.parametrize("counts", sorted(RAW_COUNTS))
@pytest.mark.parametrize("world", [1, 2, 3, 6])
@pytest.mark.parametrize("shards", ["many", "few"])
def test_units_split_over_ranks_are_disjoint_and_cover_everything(dataset, world, shards, counts):
    """Brute force over the reader alone (no encoder): every raw sample decoded by exactly one consumer, every unit
    ended once, each shard's end (``last``) and problems counted once; with counts, in contiguous runs."""
    urls, good, skips = dataset
    urls = urls if shards == "many" else urls[:2]  # 2 shards for up to 6 consumers: blocks are split instead
    counts = None if RAW_COUNTS[counts] is None else RAW_COUNTS[counts][:len(urls)]
    seen, units, counted, ends = Counter(), Counter(), Counter(), Counter()
    runs = []
    for rank in range(world):
        reader = UnitReader(urls, chunk_size=2, done=set(), finished_shards={}, rank=rank, world=world, counts=counts)
        mine = []
        for item in reader:
            if isinstance(item, UnitDone):
                units[(item.shard, item.block)] += 1
                ends[item.shard] += item.last
                counted.update(item.skipped)
                mine.append((item.shard, item.block))
            else:
                seen[item["key"]] += 1
        runs.append(mine)
    expected = {k for k in good if shards == "many" or k.startswith(("s0", "s1"))}
    assert set(seen) == expected and set(seen.values()) == {1}
    assert set(units.values()) == {1}
    assert ends == Counter(range(len(urls)))  # one unit ends each shard
    assert counted == (Counter(skips) if shards == "many" else Counter())
    if counts is not None:  # contiguous runs: rank r's units all come before rank r + 1's
        flat = [unit for mine in runs for unit in mine]
        assert flat == sorted(flat)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_a_resumed_run_with_a_short_manifest_still_reads_past_it_exactly_once(dataset, world):
    """Shard 0 holds 7 samples (blocks 0-3 of 2) but its manifest says 5 (blocks 0-2), and block 2 was done in an
    earlier run: the units left, block 3 past the manifest's end included, are each done once."""
    urls, good, _ = dataset
    urls, done = urls[:2], {(0, 2)}
    seen, units, ends = Counter(), Counter(), Counter()
    for rank in range(world):
        reader = UnitReader(urls, chunk_size=2, done=done, finished_shards={}, rank=rank, world=world, counts=[5, 3])
        for item in reader:
            if isinstance(item, UnitDone):
                units[(item.shard, item.block)] += 1
                ends[item.shard] += item.last
            else:
                seen[item["key"]] += 1
    assert set(units) == {(0, 0), (0, 1), (0, 3), (1, 0), (1, 1), (1, 2)} and set(units.values()) == {1}
    assert ends == Counter({0: 1, 1: 1})
    assert set(seen) == {k for k in good if k.startswith(("s0", "s1")) and k not in ("s0-004", "s0-005")}
    assert set(seen.values()) == {1}


# -- resuming after SIGKILL, through the command line ---------------------------------------------------


def test_killed_extraction_resumes_from_its_parts_and_equals_a_one_shot_run(tmp_path, capsys, tiny_vit):
    folder = tmp_path / "data"
    first = good_shard(folder, 0, 12)
    second = good_shard(folder, 1, 8)
    gate = tmp_path / "gate"
    # The second shard arrives only once the gate exists: the extraction is held there, its first shard's
    # parts on disk, when it is killed. The URL string is the same in every run, and so is the fingerprint.
    data = f"{first}::pipe:while [ ! -e {gate} ]; do sleep 0.05; done; cat {second}"
    store = tmp_path / "store"
    args = ["extract", "--encoder", "tiny_vit", "--data", data, "--out", str(store), "--name", "entry",
            "--chunk-size", "4", "--batch-size", "3", "--no-progress"]
    process = subprocess.Popen([sys.executable, "-m", "prh_stitch.data", *args], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    parts = store / "entry" / "parts"
    deadline = time.monotonic() + 120
    try:
        while len(list(parts.glob("s000000-*.safetensors"))) < 3:
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no parts were written in time"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (store / "entry" / "index.json").exists()
    # A part with a final name but cut short (outside damage) is not taken for a finished unit.
    damaged = parts / "s000001-b000000.safetensors"
    damaged.write_bytes((parts / "s000000-b000000.safetensors").read_bytes()[:-7])
    gate.touch()

    # The rerun goes through the same main() in this process: the subprocess above was the one to kill.
    code, out, err = run_cli_inprocess(capsys, *args)
    assert code == 0, err[-2000:]
    summary = json.loads(out)
    assert summary["status"] == "resumed" and summary["num_samples"] == 20
    assert summary["chunks"] == 5 and summary["chunks_reused"] == 3 and summary["chunks_computed"] == 2
    assert summary["samples_encoded"] == 8  # only the second shard went through the encoder

    resumed_set = FeatureStore(store).read(summary["entry"])
    one_shot = FeatureStore(tmp_path / "one_shot", chunk_size=4).get(tiny_vit, [first, data.split("::")[1]],
                                                                    batch_size=3, progress=False)
    assert resumed_set.keys == one_shot.keys
    # float32 tolerances, not equality: the killed process may have computed with another thread count
    torch.testing.assert_close(resumed_set.features["pre_logits"], one_shot.features["pre_logits"])
    good = {f"s{s}-{i:03d}": (s, i) for s, n in ((0, 12), (1, 8)) for i in range(n)}
    torch.testing.assert_close(resumed_set.features["pre_logits"], direct_features(tiny_vit, good)[0], rtol=1e-4, atol=1e-5)

    code, out, _ = run_cli_inprocess(capsys, *args)
    assert code == 0 and json.loads(out)["status"] == "hit"


# -- errors ---------------------------------------------------------------------------------------------


def run_cli_inprocess(capsys, *argv):
    code = data_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_an_entry_made_from_other_weights_is_a_clear_error_and_is_left_intact(tmp_path, capsys, dataset):
    urls, _, _ = dataset
    data = ",".join(urls[:2])
    store = tmp_path / "store"
    args = ["extract", "--encoder", "tiny_bert", "--data", data, "--out", str(store), "--name", "text", "--no-progress"]
    code, out, _ = run_cli_inprocess(capsys, *args)
    assert code == 0
    entry = Path(json.loads(out)["entry"])
    before = (entry / "layer-0.npy").read_bytes()

    code, out, err = run_cli_inprocess(capsys, *args, "--options", '{"seed": 1}')
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "was made from something else (weights: stored" in err and "delete that folder" in err
    assert (entry / "layer-0.npy").read_bytes() == before

    # Same for a half-done entry: resuming it with other weights would mix two models' features.
    partial = store / "partial"
    partial.mkdir()
    (partial / "identity.json").write_text((entry / "identity.json").read_text())
    code, _, err = run_cli_inprocess(capsys, *args[:-3], "--name", "partial", "--no-progress", "--options", '{"seed": 2}')
    assert code == 2 and "weights: stored" in err
    assert sorted(p.name for p in partial.iterdir()) == ["identity.json"]


def test_shards_cut_or_unreadable_are_named_and_nothing_is_committed(tmp_path, dataset, tiny_vit):
    urls, _, _ = dataset
    store = FeatureStore(tmp_path / "store", chunk_size=3)
    with pytest.raises(ValueError, match=r"2 shard\(s\) were not read to their end, e.g. '.*cut-3.tar' "
                                         r"\(truncated_shard\); nothing was committed"):
        store.get(tiny_vit, urls, batch_size=2, progress=False)
    entry, = (tmp_path / "store").iterdir()  # finished units stay for a rerun; no index, no lock
    parts = sorted(p.name for p in (entry / "parts").iterdir())
    assert not (entry / "index.json").exists()
    # Shard 3's first unit was read whole; the units ending shards 3 and 4 (which saw the problems) are not kept.
    assert parts == ["s000000-b000000.safetensors", "s000000-b000001.safetensors", "s000000-b000002-last.safetensors",
                     "s000001-b000000.safetensors", "s000001-b000001-last.safetensors",
                     "s000002-b000000.safetensors", "s000002-b000001-last.safetensors", "s000003-b000000.safetensors"]
    with pytest.raises(ValueError, match="not read to their end"):  # still refused: never committed short
        store.get(tiny_vit, urls, batch_size=2, progress=False)


def test_shards_without_usable_samples_fail_and_leave_no_entry(tmp_path, capsys):
    shard = write_tar(tmp_path / "nocaptions.tar", sample_members(5, 0, caption=False) + sample_members(5, 1, caption=False))
    store = tmp_path / "store"
    code, out, err = run_cli_inprocess(capsys, "extract", "--encoder", "tiny_vit", "--data", shard,
                                       "--out", str(store), "--no-progress")
    assert code == 2 and out == "" and "no usable samples" in err and "missing_caption" in err
    assert not store.exists() or list(store.iterdir()) == []


def test_nan_features_fail_and_leave_no_entry(tmp_path, dataset):
    urls, _, _ = dataset
    encoder = build_encoder("tiny_vit")
    with torch.no_grad():
        encoder.model.blocks[-1].norm1.weight.fill_(float("nan"))
    store = FeatureStore(tmp_path / "store", chunk_size=4)
    with pytest.raises(ValueError, match="NaN/Inf features at layer 'pre_logits'"):
        store.get(encoder, urls[:1], progress=False)
    assert list((tmp_path / "store").iterdir()) == []


# -- DDP ------------------------------------------------------------------------------------------------


def _extract_on_rank(rank, world, rendezvous, urls, root, out):
    import torch.distributed as dist

    torch.set_num_threads(1)  # two ranks and their workers share the test machine's cores
    # Ranks started by spawn would start their DataLoader workers by spawn too (re-importing everything);
    # Lightning starts DDP ranks as fresh processes whose workers fork, which is what this mirrors.
    torch.multiprocessing.set_start_method("fork", force=True)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        store = FeatureStore(root, chunk_size=2)
        result = store.get(build_encoder("tiny_vit"), urls, layers=[-1], batch_size=2, num_workers=2,
                           progress=False, ranks=Ranks.from_torch())
        Path(out, f"rank{rank}.json").write_text(json.dumps({
            "keys": result.keys, "extraction": result.info["extraction"], "skipped": result.info["skipped"],
        }))
    finally:
        dist.destroy_process_group()


def test_two_ddp_processes_with_two_workers_each_extract_disjoint_parts_equal_to_one_process(tmp_path, dataset, tiny_vit):
    urls, good, skips = whole_shards(dataset)
    root = tmp_path / "ddp"
    torch.multiprocessing.spawn(_extract_on_rank, args=(2, str(tmp_path / "rendezvous"), urls, str(root), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    single = FeatureStore(tmp_path / "single", chunk_size=2).get(tiny_vit, urls, batch_size=2, progress=False)
    encoded = [r["extraction"]["samples_encoded"] for r in ranks]
    assert all(n > 0 for n in encoded) and sum(encoded) == len(good)  # disjoint parts, together everything
    assert sum(r["extraction"]["chunks_computed"] for r in ranks) == single.info["chunks"]
    for r in ranks:
        assert r["keys"] == single.keys and r["skipped"]["skipped"] == skips
    merged = FeatureStore(root).read(next(root.iterdir()))
    assert merged.keys == single.keys
    # float32 tolerances, not equality: the ranks compute with one thread each, this process with more
    torch.testing.assert_close(merged.features["pre_logits"], single.features["pre_logits"])
    assert np.isfinite(merged.features["pre_logits"].numpy()).all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_stores_hold_the_float32_features_rounded(tmp_path, dataset, tiny_vit, dtype):
    urls, _, _ = dataset
    full = FeatureStore(tmp_path / "fp32").get(tiny_vit, urls[:2], progress=False)
    half = FeatureStore(tmp_path / dtype, dtype=dtype).get(tiny_vit, urls[:2], progress=False)
    stored = half.features["pre_logits"]
    assert stored.dtype == getattr(torch, dtype) and half.info["dtype"] == dtype
    assert torch.equal(stored, full.features["pre_logits"].to(stored.dtype))


def test_a_failure_before_any_unit_is_done_leaves_no_entry(tmp_path, dataset, tiny_vit):
    urls, _, _ = dataset
    with pytest.raises(ValueError, match="no_such_pooling"):
        FeatureStore(tmp_path / "store").get(tiny_vit, urls[:1], layers=[0], pooling="no_such_pooling", progress=False)
    assert list((tmp_path / "store").iterdir()) == []


# -- repeated captions are encoded once per unit ---------------------------------------------------------


def test_a_text_encoder_encodes_each_caption_once_per_unit_and_every_row_equals_its_own_encoding(tmp_path):
    """Captions repeat (templated scenes, one caption per class). A text encoder's output is a function of the
    caption, so the store encodes each distinct caption once per unit and gives its repeats the same rows: the
    entry equals each caption encoded alone, and the model sees only the distinct captions of each unit."""
    words = ["a red circle", "two blue squares", "a red circle", "one star", "two blue squares", "a red circle",
             "one star", "a green cross", "a red circle", "a red circle"]
    samples = [(f"k{i:02d}", scene(0, i), caption, {"label": i % 3}) for i, caption in enumerate(words)]
    manifest = write_shards(samples, tmp_path / "data", prefix="text", samples_per_shard=len(words),
                            image_format="png")
    url = str(tmp_path / "data" / manifest["pattern"])
    encoder = build_encoder("tiny_bert")
    seen_rows = []
    original = encoder._encode

    def counting(batch, layers, pooling):
        seen_rows.append(int(batch["input_ids"].shape[0]))
        return original(batch, layers, pooling)

    encoder._encode = counting
    layers = list(range(encoder.num_layers))
    chunk = 6  # two units: captions 0-5 (3 distinct) and 6-9 (3 distinct)
    stored = FeatureStore(tmp_path / "store", chunk_size=chunk).get(encoder, [url], layers=layers, batch_size=4,
                                                                     progress=False)
    assert sum(seen_rows) == 3 + 3
    run = stored.info["extraction"]
    assert run["samples_encoded"] == 10 and run["captions_reused"] == 4
    encoder._encode = original
    for name in stored.features:
        layer = encoder.layer_names.index(name)
        for row, key in enumerate(stored.keys):
            alone = encoder.encode(encoder.collate([encoder.transform(words[int(key[1:])])]), [layer])[0][0]
            torch.testing.assert_close(stored.features[name][row], alone, rtol=1e-5, atol=1e-5)
    # An image encoder's samples are all encoded (its input is the image, not the caption).
    vit_rows = []
    vit = build_encoder("tiny_vit")
    vit_original = vit._encode
    vit._encode = lambda batch, layers, pooling: (vit_rows.append(batch.shape[0]), vit_original(batch, layers, pooling))[1]
    FeatureStore(tmp_path / "store_vit", chunk_size=chunk).get(vit, [url], batch_size=4, progress=False)
    assert sum(vit_rows) == 10
