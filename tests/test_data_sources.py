"""Sample sources: scenes, a folder with a captions file, Fashion-MNIST (real files when installed,
a tiny IDX fixture otherwise)."""

import gzip
import json
import struct

import numpy as np
import pytest
from PIL import Image

from prh_stitch.data.sources import (
    FASHION_MNIST_CLASSES,
    SOURCES,
    fashion_mnist,
    fashion_mnist_dir,
    folder,
    scenes,
)

EXPECTED_SOURCES = ["scenes", "folder", "fashion_mnist"]


def test_registry_lists_sources_and_rejects_unknown_names():
    assert SOURCES.names() == sorted(EXPECTED_SOURCES)
    with pytest.raises(ValueError, match="Choose one of: fashion_mnist, folder, scenes"):
        SOURCES.get("imagenet")


def test_scenes_keys_splits_and_prefix_property():
    train = list(scenes(5, seed=2, size=32))
    val = list(scenes(3, seed=2, size=32, split="val"))
    assert [k for k, *_ in train] == [f"train-{i:08d}" for i in range(5)]
    assert [k for k, *_ in val] == [f"val-{i:08d}" for i in range(3)]
    # Scene i depends on its index only: a shorter set is a prefix of a longer one.
    shorter = list(scenes(2, seed=2, size=32))
    assert [(k, im.tobytes(), c) for k, im, c, _ in shorter] == [(k, im.tobytes(), c) for k, im, c, _ in train[:2]]
    assert train[0][3]["split"] == "train" and train[0][3]["index"] == 0
    with pytest.raises(ValueError, match="split"):
        scenes(1, split="validation")


# -- folder -----------------------------------------------------------------------------------------------

@pytest.fixture
def image_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.new("RGB", (10, 10), (50 * i, 0, 0)).save(tmp_path / "imgs" / f"{i}.png")
    return tmp_path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_folder_reads_csv_tsv_jsonl_with_extra_columns_in_meta(image_folder, suffix):
    rows = [{"filepath": f"imgs/{i}.png", "caption": f"red level {i}", "label": str(i)} for i in range(3)]
    path = image_folder / f"pairs{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        sep = "," if suffix == ".csv" else "\t"
        path.write_text("filepath" + sep + "caption" + sep + "label\n"
                        + "".join(sep.join(r.values()) + "\n" for r in rows))
    samples = list(folder(path))
    assert [(k, c) for k, _, c, _ in samples] == [(f"row-{i:09d}", f"red level {i}") for i in range(3)]
    assert samples[2][1].getpixel((0, 0)) == (100, 0, 0)
    assert samples[1][3] == {"label": "1", "image_path": "imgs/1.png", "row": 1}


def test_folder_column_errors_name_the_columns_found(image_folder):
    path = image_folder / "pairs.csv"
    path.write_text("picture,words\nimgs/0.png,hello\n")
    with pytest.raises(ValueError, match=r"no image column .*columns found: \['picture', 'words'\]"):
        folder(path)
    with pytest.raises(ValueError, match=r"no caption column 'text'.*columns found"):
        folder(path, image_column="picture", caption_column="text")
    assert [c for _, _, c, _ in folder(path, image_column="picture", caption_column="words")] == ["hello"]


def test_folder_unreadable_or_unsupported_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        folder(tmp_path / "missing.csv")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "caption": "x"}\nnot json\n')
    with pytest.raises(ValueError, match="cannot read captions file"):
        folder(bad)
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="cannot read captions file"):
        list(folder(binary))
    late = tmp_path / "late.csv"
    # Text files decode in chunks, so bad bytes far into the file surface during iteration.
    late.write_bytes(b"image,caption\n" + b"a.png,fine\n" * 1500 + b"b.png,\xff\xfe broken\n")
    Image.new("RGB", (2, 2)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"cannot read captions file .*late.csv near line \d+"):
        list(folder(late))
    other = tmp_path / "pairs.xlsx"
    other.write_text("x")
    with pytest.raises(ValueError, match="must end in"):
        folder(other)


def test_folder_bad_rows_fail_or_are_skipped(image_folder):
    path = image_folder / "pairs.csv"
    path.write_text("image,caption\nimgs/0.png,fine\nimgs/missing.png,gone\nimgs/1.png,\nimgs/2.png,also fine\n")
    with pytest.raises(ValueError, match="row 2: image .*missing.png does not exist"):
        list(folder(path))
    kept = [c for _, _, c, _ in folder(path, skip_bad_rows=True)]
    assert kept == ["fine", "also fine"]
    assert len(list(folder(path, skip_bad_rows=True, limit=1))) == 1


# -- Fashion-MNIST ---------------------------------------------------------------------------------------

def write_idx(folder_path, split_prefix, images, labels):
    with gzip.open(folder_path / f"{split_prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, len(images), 28, 28) + images.tobytes())
    with gzip.open(folder_path / f"{split_prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 0x801, len(labels)) + labels.tobytes())


def test_fashion_mnist_parses_idx_files(tmp_path):
    images = np.arange(3 * 28 * 28, dtype=np.uint64).reshape(3, 28, 28).astype(np.uint8)
    labels = np.array([7, 9, 0], dtype=np.uint8)
    write_idx(tmp_path, "t10k", images, labels)
    samples = list(fashion_mnist("test", root=tmp_path, templates=["a photo of {}"]))
    assert [c for _, _, c, _ in samples] == ["a photo of a sneaker", "a photo of an ankle boot", "a photo of a t-shirt"]
    assert samples[1][3] == {"label": 9, "label_name": "Ankle boot", "index": 1, "split": "test"}
    assert samples[0][0] == "test-00000" and samples[0][1].mode == "L"
    assert np.array_equal(np.asarray(samples[2][1]), images[2])
    assert len(list(fashion_mnist("test", root=tmp_path, limit=2))) == 2


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="'train' or 'test'"):
        fashion_mnist("val", root=tmp_path)
    with pytest.raises(ValueError, match="slot"):
        fashion_mnist("train", root=tmp_path, templates=["no slot"])


def test_fashion_mnist_real_files():
    root = fashion_mnist_dir()
    if not (root / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST is not installed in {root} (apt-get install dataset-fashion-mnist)")
    samples = list(fashion_mnist("test", limit=200))
    assert len(samples) == 200
    assert all(im.size == (28, 28) for _, im, _, _ in samples)
    assert {m["label_name"] for *_, m in samples} == set(FASHION_MNIST_CLASSES)
