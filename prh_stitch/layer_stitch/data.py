"""Images with class labels for layer stitching, and the frozen networks' outputs on them (cached).

Batches are ``(sample_index, label)``: the stitching layer's input (A's activations at the cut) and target (B's
outputs) are frozen, so they are computed once per split and indexed, never recomputed per epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from prh_stitch.encoders.base import Layer
from prh_stitch.encoders.timm_backend import TimmEncoder
from prh_stitch.layer_stitch.cache import ActivationCache, tensor_digest
from prh_stitch.layer_stitch.surgery import layer_name, run_until

DATA_SOURCES = ("scenes", "fashion_mnist")
OUTPUTS = ("activations", "logits", "pre_logits")


def load_images(source: str, split: str, n: int, image_size: int, seed: int) -> Tuple[Tensor, Tensor]:
    """``n`` RGB images (uint8, ``(n, 3, S, S)``) and their class labels from a data source."""
    from PIL import Image

    from prh_stitch.data.sources import SOURCES

    if source == "scenes":
        samples = SOURCES.get("scenes")(n=n, seed=seed, size=image_size, split=split)
    else:
        samples = SOURCES.get("fashion_mnist")(split="train" if split == "train" else "test", limit=n)
    images, labels = [], []
    for _key, image, _caption, meta in samples:
        image = image.convert("RGB")
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.BILINEAR)
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
        labels.append(int(meta["label"]))
    if len(images) < n:
        raise ValueError(f"{source} {split} has only {len(images)} images, {n} were asked for; ask for fewer")
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


class LayerStitchDataModule(pl.LightningDataModule):
    """Images with class labels; batches are ``(sample_index, label)`` into per-split frozen caches."""

    def __init__(
        self,
        source: str = "scenes",
        n_train: int = 512,
        n_val: int = 256,
        image_size: int = 128,
        seed: int = 0,
        batch_size: int = 32,
        encode_batch_size: int = 64,
        cache_dir: Optional[str] = None,
    ) -> None:
        """
        Args:
            source: ``scenes`` (built in; label = shape of the first object, 6 classes) or ``fashion_mnist``.
            n_train: training images.
            n_val: validation images (Fashion-MNIST: from its test split).
            image_size: side in pixels fed to both networks (CNNs take any size; a ViT needs its own).
            seed: scene seed, and the seed of the training order.
            batch_size: stitch-layer training batch size.
            encode_batch_size: batch size when filling the cache with the frozen networks.
            cache_dir: where cached activations go (default ``$PRH_STITCH_CACHE`` or ``~/.cache/prh_stitch``).
        """
        super().__init__()
        from prh_stitch.data.features import default_cache_dir

        if source not in DATA_SOURCES:
            raise ValueError(f"unknown layer-stitch data source {source!r}; choose 'scenes' or 'fashion_mnist'")
        self.source, self.n = source, {"train": int(n_train), "val": int(n_val)}
        self.image_size, self.seed = int(image_size), int(seed)
        self.batch_size, self.encode_batch_size = int(batch_size), int(encode_batch_size)
        self.cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
        self.cache = ActivationCache(self.cache_root)
        self._images: Dict[str, Tuple[Tensor, Tensor]] = {}
        self._digests: Dict[str, str] = {}

    def images(self, split: str) -> Tuple[Tensor, Tensor]:
        """``(uint8 images (n, 3, S, S), labels (n,))`` of ``train`` or ``val``, loaded once."""
        if split not in self._images:
            self._images[split] = load_images(self.source, split, self.n[split], self.image_size, self.seed)
            self._digests[split] = tensor_digest(self._images[split][0])
        return self._images[split]

    def labels(self, split: str) -> Tensor:
        return self.images(split)[1]

    def normalised_images(self, encoder: TimmEncoder, split: str, index: Tensor) -> Tensor:
        """Images of ``split`` at ``index`` as ``encoder`` takes them (its device, normalisation, memory format)."""
        return encoder.model_input(self.images(split)[0][index.cpu()])

    @torch.no_grad()
    def cached(self, encoder: TimmEncoder, what: str, layer: Layer, split: str) -> Tensor:
        """Frozen outputs of ``encoder`` on a split: ``what`` = ``activations`` (at ``layer``; stored float16),
        ``logits`` or ``pre_logits`` (``layer`` ignored). Computed once, then kept in memory and on disk."""
        if what not in OUTPUTS:
            raise ValueError(f"unknown frozen output {what!r}; choose one of {', '.join(OUTPUTS)}")
        images = self.images(split)[0]
        name = layer_name(encoder, layer) if what == "activations" else what
        identity = {"encoder": encoder.fingerprint([-1], None), "what": what, "layer": name,
                    "images": self._digests[split]}

        def compute() -> Tensor:
            chunks = []
            for start in range(0, len(images), self.encode_batch_size):
                batch = encoder.model_input(images[start:start + self.encode_batch_size])
                if what == "activations":
                    out = run_until(encoder, name, batch)
                else:
                    out = encoder.model.forward_head(encoder.model.forward_features(batch),
                                                     pre_logits=what == "pre_logits")
                chunks.append(out.float().cpu())
            return torch.cat(chunks)

        return self.cache.get(identity, compute, torch.float16 if what == "activations" else torch.float32)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        labels = self.labels(split)
        dataset = TensorDataset(torch.arange(len(labels)), labels)
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, generator=generator)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)
