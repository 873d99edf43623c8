"""Interoperability with data nobody here wrote the writer for: shards written by plain ``webdataset.TarWriter`` and an
img2dataset-layout folder read by ``check``, extraction and streaming; our shards read by a plain
``webdataset.WebDataset``; shards served over http(s) through webdataset's gopen."""

import functools
import http.server
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from prh_stitch.data.__main__ import main as data_main
from prh_stitch.data.datamodule import StreamingDataModule
from prh_stitch.data.features import FeatureStore
from prh_stitch.data.shards import expand_urls
from prh_stitch.data.stream import PairedShards, SkipStats
from test_features import colour, direct_features, tiny_vit  # noqa: F401  (tiny_vit: a pytest fixture)


def jpeg(shard, index, size=24):
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour(shard, index)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def decoded_jpeg(shard, index):
    return Image.open(io.BytesIO(jpeg(shard, index))).convert("RGB")


@pytest.fixture(scope="module")
def webdataset_shards(tmp_path_factory):
    """Two shards written by webdataset's own TarWriter with its defaults (owner "bigdata", mode 0444, now as mtime)."""
    folder = tmp_path_factory.mktemp("wds")
    keys = []
    for shard in range(2):
        with wds.TarWriter(str(folder / f"wds-{shard:06d}.tar")) as sink:
            for index in range(5):
                key = f"w{shard}-{index:03d}"
                sink.write({"__key__": key, "jpg": jpeg(shard, index), "txt": f"shard {shard} sample {index}",
                            "json": json.dumps({"label": index % 3}).encode()})
                keys.append(key)
    return str(folder / "wds-{000000..000001}.tar"), keys


def check(capsys, pattern):
    code = data_main(["check", pattern])
    return code, json.loads(capsys.readouterr().out)


def test_webdataset_tarwriter_shards_are_read_by_check_streaming_and_extraction(webdataset_shards, capsys, tmp_path, tiny_vit):
    pattern, keys = webdataset_shards
    code, report = check(capsys, pattern)
    assert code == 0 and report["good"] == 10 and report["skipped"] == {} and report["num_shards"] == 2
    dm = StreamingDataModule(val=pattern, batch_size=4, num_workers=2)
    batches = list(dm.val_dataloader())
    assert sorted(k for b in batches for k in b["key"]) == keys and dm.skipped["val"] == {}
    for batch in batches:
        for key, image in zip(batch["key"], batch["image"]):
            shard, index = int(key[1]), int(key[3:])
            assert torch.equal(image, torch.from_numpy(np.array(decoded_jpeg(shard, index))).permute(2, 0, 1))
    features = FeatureStore(tmp_path / "store").get(tiny_vit, expand_urls(pattern), progress=False)
    assert features.keys == keys and features.labels == [int(k[3:]) % 3 for k in keys]
    reference = []
    for key in keys:
        batch = tiny_vit.collate([tiny_vit.transform(decoded_jpeg(int(key[1]), int(key[3:])))])
        reference.append(tiny_vit.encode(batch, [-1])[0])
    torch.testing.assert_close(features.features["pre_logits"], torch.cat(reference), rtol=1e-4, atol=1e-5)


def test_our_written_shards_are_read_by_a_plain_webdataset(tmp_path, capsys):
    code = data_main(["write", "--source", "scenes", "--n", "12", "--size", "32", "--val-fraction", "0.25",
                      "--samples-per-shard", "4", "--out", str(tmp_path)])
    written = json.loads(capsys.readouterr().out)
    assert code == 0
    ours = {s["key"]: s for s in PairedShards(written["train"]["pattern"])}
    plain = list(wds.WebDataset(written["train"]["pattern"], shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in plain] == sorted(ours) and len(plain) == 9
    for sample in plain:
        mine = ours[sample["__key__"]]
        assert sample["txt"] == mine["caption"] and sample["json"] == mine["meta"]
        assert np.array_equal(np.array(sample["jpg"]), np.array(mine["image"]))
    # The manifest is also a wids index of the series (per-shard sample counts).
    manifest = json.loads((tmp_path / "train-manifest.json").read_text())
    assert manifest["wids_version"] == 1
    assert [(s["url"], s["nsamples"]) for s in manifest["shardlist"]] == [
        ("train-000000.tar", 4), ("train-000001.tar", 4), ("train-000002.tar", 1)]


def test_an_img2dataset_folder_is_read_by_check_and_streaming(tmp_path, capsys):
    """img2dataset's layout: ``00000.tar`` with 9-digit keys (.jpg, .txt, .json holding url/status/size), next to
    its ``00000.parquet`` and ``00000_stats.json``; failed downloads leave no member, a caption can be empty."""
    keys = []
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / f"{shard:05d}.tar")) as sink:
            for index in range(4):
                key = f"{shard:05d}{index:04d}"
                caption = "" if (shard, index) == (1, 2) else f"shard {shard} sample {index}"
                meta = {"url": f"https://example.com/{key}.jpg", "caption": caption, "key": key, "status": "success",
                        "width": 24, "height": 24, "original_width": 640, "original_height": 480}
                sink.write({"__key__": key, "jpg": jpeg(shard, index), "txt": caption, "json": json.dumps(meta)})
                keys.append(key) if caption else None
        (tmp_path / f"{shard:05d}_stats.json").write_text(json.dumps({"count": 4, "successes": 4}))
        (tmp_path / f"{shard:05d}.parquet").write_bytes(b"PAR1 not read")
    code, report = check(capsys, str(tmp_path))  # a folder: its *.tar
    assert code == 0 and report["good"] == 7 and report["skipped"] == {"empty_caption": 1}
    dm = StreamingDataModule(train=str(tmp_path), batch_size=3, shuffle_buffer=0)
    samples = [(k, m) for b in dm.train_dataloader() for k, m in zip(b["key"], b["meta"])]
    assert [k for k, _ in samples] == keys and all(m["status"] == "success" for _, m in samples)
    assert dm.skipped["train"] == {"empty_caption": 1}


@pytest.fixture
def http_server(webdataset_shards):
    """The shards' folder over HTTP on a port the OS assigns (port 0: nothing is picked or probed)."""
    folder = Path(webdataset_shards[0]).parent
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_http_shards_stream_through_gopen_and_a_failed_download_is_reported(http_server, webdataset_shards):
    _, keys = webdataset_shards
    stats = SkipStats()
    delivered = [s["key"] for s in PairedShards(f"{http_server}/wds-{{000000..000001}}.tar", stats=stats)]
    assert delivered == keys and stats.good == 10 and dict(stats.skipped) == {}
    stats = SkipStats()
    delivered = [s["key"] for s in PairedShards([f"{http_server}/missing.tar", f"{http_server}/wds-000001.tar"],
                                                stats=stats)]
    assert delivered == keys[5:] and dict(stats.skipped) == {"pipe_failed": 1}
