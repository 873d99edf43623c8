"""Lightning DataModule that serves frozen-encoder features of paired image–text shards.

Training a stitcher never runs the encoders: the module asks this DataModule to make sure the features of
its two encoders are in the feature store (``prepare_features``, once per node, before any process trains)
and then to load them (``setup_features``, on every process). Batches are
``(source_features, target_features, sample_index, caption_group)``.

Without ``train``/``val`` shard patterns, the built-in procedural scenes are written into the cache on first
use and used instead, so ``python train.py`` needs no data download.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from prh_stitch.data.features import FeatureSet, FeatureStore, align_by_key, default_cache_dir
from prh_stitch.encoders.base import FrozenEncoder, Layer

log = logging.getLogger("prh_stitch.data")

SPLITS = ("train", "val")


@dataclass
class SceneData:
    """The built-in procedural scenes used when no shards are given (seeded, reproducible)."""

    n_train: int = 4096
    n_val: int = 1024
    seed: int = 0
    image_size: int = 224


@dataclass
class FeatureRequest:
    """Which features of which encoder a model needs."""

    encoder: FrozenEncoder
    layer: Layer = -1
    pooling: Optional[str] = None


def caption_groups(captions: List[str]) -> torch.Tensor:
    """Group id per row: rows with identical caption text share an id (any of them is a correct match)."""
    first: Dict[str, int] = {}
    return torch.tensor([first.setdefault(c, len(first)) for c in captions], dtype=torch.long)


class StitchingDataModule(pl.LightningDataModule):
    def __init__(
        self,
        train: Optional[str] = None,
        val: Optional[str] = None,
        scenes: SceneData = SceneData(),
        cache_dir: Optional[str] = None,
        batch_size: int = 256,
        extract_batch_size: int = 64,
        num_workers: int = 0,
        feature_dtype: str = "float32",
        seed: int = 0,
    ) -> None:
        """
        Args:
            train: shard pattern of the training pairs (``shards/{000000..000099}.tar``, a glob, ``pipe:...``);
                None uses the built-in scenes.
            val: shard pattern of the validation pairs; None uses the built-in scenes.
            scenes: size and seed of the built-in scenes.
            cache_dir: where scenes and the feature store live (default ``$PRH_STITCH_CACHE`` or ``~/.cache/prh_stitch``).
            batch_size: stitcher training batch size (per process).
            extract_batch_size: encoder batch size for feature extraction.
            num_workers: DataLoader workers for decoding and preprocessing during extraction.
            feature_dtype: storage precision of cached features (float32, float16, bfloat16).
            seed: seed of the training shuffle (the order of epoch e depends only on seed and e, so resumed
                runs see the same batches as uninterrupted ones).
        """
        super().__init__()
        if (train is None) != (val is None):
            raise ValueError("give both 'train' and 'val' shard patterns, or neither (to use the built-in scenes)")
        self.train_pattern = train
        self.val_pattern = val
        self.scenes = scenes
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.batch_size = int(batch_size)
        self.extract_batch_size = int(extract_batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.store = FeatureStore(self.cache_dir / "features", dtype=feature_dtype)
        self.datasets: Dict[str, TensorDataset] = {}
        self.feature_sets: Dict[Tuple[str, str], FeatureSet] = {}

    # ---- shards -------------------------------------------------------------------------------
    def shard_urls(self, split: str) -> List[str]:
        from prh_stitch.data.shards import ensure_scene_shards, expand_urls

        pattern = self.train_pattern if split == "train" else self.val_pattern
        if pattern is None:
            s = self.scenes
            train, val = ensure_scene_shards(self.cache_dir / "scenes", s.n_train, s.n_val, seed=s.seed, size=s.image_size)
            pattern = train if split == "train" else val
        return expand_urls(pattern)

    # ---- features -----------------------------------------------------------------------------
    def _features(self, request: FeatureRequest, split: str, progress: bool = True) -> FeatureSet:
        return self.store.get(
            request.encoder, self.shard_urls(split), [request.layer], request.pooling,
            batch_size=self.extract_batch_size, num_workers=self.num_workers, progress=progress,
        )

    def prepare_features(self, requests: List[FeatureRequest], device: torch.device | str = "cpu") -> None:
        """Extract whatever the store lacks, on ``device`` (called once per node before training)."""
        for request in requests:
            original = request.encoder.device
            request.encoder.to(device)
            try:
                for split in SPLITS:
                    self._features(request, split)
            finally:
                request.encoder.to(original)

    def setup_features(self, source: FeatureRequest, target: FeatureRequest) -> None:
        """Load both sides from the store, join them by sample key, and build the datasets."""
        for split in SPLITS:
            a = self._features(source, split, progress=False)
            b = self._features(target, split, progress=False)
            idx_a, idx_b = align_by_key(a, b)
            src = next(iter(a.features.values()))[idx_a].float()
            tgt = next(iter(b.features.values()))[idx_b].float()
            captions = [a.captions[i] for i in idx_a.tolist()]
            self.feature_sets[(split, "source")] = a
            self.feature_sets[(split, "target")] = b
            self.datasets[split] = TensorDataset(src, tgt, torch.arange(len(src)), caption_groups(captions))
            log.info("%s: %d pairs (%d-d -> %d-d)", split, len(src), src.shape[1], tgt.shape[1])
        if len(self.datasets["train"]) == 0:
            raise ValueError("the training split has no samples")

    def training_tensors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        src, tgt, _, _ = self.datasets["train"].tensors
        return src, tgt

    # ---- loaders ------------------------------------------------------------------------------
    def _require(self, split: str) -> TensorDataset:
        if split not in self.datasets:
            raise RuntimeError("features are not loaded; the StitchingModule loads them in its setup()")
        return self.datasets[split]

    def _distributed(self) -> Tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def train_dataloader(self) -> DataLoader:
        dataset = self._require("train")
        world, rank = self._distributed()
        # Our own DistributedSampler (also for one process): its order depends only on (seed, epoch), which
        # Lightning sets each epoch, so a resumed run replays exactly the batches an uninterrupted run sees.
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        dataset = self._require("val")
        world, rank = self._distributed()
        # Padding repeats a few samples to even out ranks; validation metrics drop repeats by sample index.
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)
