"""Layer-stitching data, fast: the images and labels each source gives, the data module's defaults, where its cache
goes and what a cache entry is keyed on.

Fashion-MNIST is a few synthetic IDX files written here (so the tests run without the data set installed); every
image is checked against its source's own pixels or an independent bilinear resize (torch), never against the code
under test. The frozen networks are replaced by a duck-typed stand-in that records its batches.
"""

import gzip
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import prh_stitch.layer_stitch.data as data_module
from prh_stitch.data.sources import FASHION_MNIST_ENV, SOURCES
from prh_stitch.layer_stitch import LayerStitchDataModule
from prh_stitch.layer_stitch.data import load_images


# ---------------------------------------------------------------- scenes

def _scene_reference(n, size, seed, split):
    images, labels = [], []
    for _key, image, _caption, meta in SOURCES.get("scenes")(n=n, seed=seed, size=size, split=split):
        images.append(torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1))
        labels.append(meta["label"])
    return torch.stack(images), torch.tensor(labels)


def test_scenes_are_the_sources_scenes_of_that_seed_size_and_split():
    images, labels = load_images("scenes", "val", 4, 32, seed=3)
    expected_images, expected_labels = _scene_reference(4, 32, 3, "val")
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32)
    assert torch.equal(images, expected_images)
    assert labels.dtype == torch.long and torch.equal(labels, expected_labels)
    # The test can tell the seed and the split apart: another seed or split gives other scenes.
    assert not torch.equal(images, _scene_reference(4, 32, 0, "val")[0])
    assert not torch.equal(images, _scene_reference(4, 32, 3, "train")[0])


# ---------------------------------------------------------------- Fashion-MNIST (synthetic IDX files)

def _write_idx(path, array, magic):
    header = struct.pack(">I" + "I" * array.ndim, magic, *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fashion(tmp_path, monkeypatch):
    """Six train and five test 28x28 images with distinct pixels and labels; the source reads them from here."""
    rng = np.random.default_rng(0)
    files = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
    arrays = {"train": (rng.integers(0, 256, (6, 28, 28)), np.array([0, 1, 2, 3, 4, 5])),
              "test": (rng.integers(0, 256, (5, 28, 28)), np.array([9, 8, 7, 6, 5]))}
    for split, (image_file, label_file) in files.items():
        _write_idx(tmp_path / image_file, arrays[split][0], 0x00000803)
        _write_idx(tmp_path / label_file, arrays[split][1], 0x00000801)
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    return arrays


@pytest.mark.parametrize("split, file_split", [("train", "train"), ("val", "test")])
def test_fashion_mnist_gives_the_first_n_grey_images_of_its_split_as_rgb(fashion, split, file_split):
    images, labels = load_images("fashion_mnist", split, 4, 28, seed=0)
    grey = torch.from_numpy(fashion[file_split][0][:4].astype(np.uint8))
    assert images.shape == (4, 3, 28, 28) and images.dtype == torch.uint8
    assert all(torch.equal(images[:, c], grey) for c in range(3))
    assert labels.dtype == torch.long and labels.tolist() == fashion[file_split][1][:4].tolist()


def test_fashion_mnist_is_resized_bilinearly_to_the_asked_size(fashion):
    images, _ = load_images("fashion_mnist", "train", 3, 40, seed=0)
    assert images.shape == (3, 3, 40, 40)
    grey = torch.from_numpy(fashion["train"][0][:3].astype(np.float32))[:, None]
    bilinear = F.interpolate(grey, size=(40, 40), mode="bilinear", align_corners=False)[:, 0]
    bicubic = F.interpolate(grey, size=(40, 40), mode="bicubic", align_corners=False)[:, 0].clamp(0, 255)
    got = images[:, 0].float()
    assert (got - bilinear).abs().max() < 1.001  # PIL rounds to 8 bits
    assert (got - bicubic).abs().max() > 8.0  # and this resize is not the bicubic default of PIL
    assert torch.equal(images[:, 1], images[:, 0]) and torch.equal(images[:, 2], images[:, 0])


def test_asking_for_more_images_than_the_split_has_is_one_clear_line(fashion):
    with pytest.raises(ValueError) as error:
        load_images("fashion_mnist", "train", 10, 28, seed=0)
    assert str(error.value) == "fashion_mnist train has only 6 images, 10 were asked for; ask for fewer"


# ---------------------------------------------------------------- the data module

class _StandInEncoder:
    """What ``cached`` uses of a TimmEncoder: logits are each image's mean pixel per channel; batches recorded."""

    def __init__(self):
        self.batches = []
        self.model = self

    def fingerprint(self, layers, pooling):
        return "stand-in"

    def model_input(self, images):
        self.batches.append(len(images))
        return images.float()

    def forward_features(self, batch):
        return batch

    def forward_head(self, features, pre_logits=False):
        return features.mean(dim=(2, 3))


def _recording_loader(monkeypatch, pixels=lambda n: torch.zeros(n, 3, 2, 2, dtype=torch.uint8)):
    calls = []

    def fake_load_images(source, split, n, image_size, seed):
        calls.append((source, split, n, image_size, seed))
        return pixels(n), torch.arange(n) % 6

    monkeypatch.setattr(data_module, "load_images", fake_load_images)
    return calls


def test_the_defaults_are_512_train_and_256_val_scenes_of_128_pixels_in_batches_of_32_encoded_64_at_once(
        tmp_path, monkeypatch):
    monkeypatch.setenv("PRH_STITCH_CACHE", str(tmp_path))
    calls = _recording_loader(monkeypatch)
    module = LayerStitchDataModule()
    train, val = module.train_dataloader(), module.val_dataloader()
    assert calls == [("scenes", "train", 512, 128, 0), ("scenes", "val", 256, 128, 0)]
    assert train.batch_size == 32 and val.batch_size == 32
    assert len(train.dataset) == 512 and len(val.dataset) == 256
    encoder = _StandInEncoder()
    module.cached(encoder, "logits", None, "val")
    assert encoder.batches == [64, 64, 64, 64]


def test_the_cache_goes_to_the_given_folder_else_to_the_default_one(tmp_path, monkeypatch):
    monkeypatch.setenv("PRH_STITCH_CACHE", str(tmp_path / "default"))
    _recording_loader(monkeypatch)
    for given, folder in ((str(tmp_path / "given"), tmp_path / "given"), (None, tmp_path / "default")):
        module = LayerStitchDataModule(n_train=4, n_val=4, cache_dir=given)
        module.cached(_StandInEncoder(), "logits", None, "train")
        assert len(list((folder / "layer_stitch").glob("*.safetensors"))) == 1
    assert len(list((tmp_path / "given" / "layer_stitch").glob("*.safetensors"))) == 1


def test_a_cache_entry_belongs_to_the_images_not_just_their_labels(tmp_path, monkeypatch):
    """Two data sets with the same labels but other pixels share one cache folder: each gets its own outputs."""
    for fill in (10, 200):
        _recording_loader(monkeypatch, pixels=lambda n, fill=fill: torch.full((n, 3, 2, 2), fill, dtype=torch.uint8))
        module = LayerStitchDataModule(n_train=4, n_val=4, cache_dir=str(tmp_path))
        logits = module.cached(_StandInEncoder(), "logits", None, "train")
        assert torch.equal(logits, torch.full((4, 3), float(fill)))
