"""Lightning DataModules: frozen-encoder features of paired image–text shards, and raw streaming batches.

``StitchingDataModule`` never runs the encoders in the training loop (``mode: cached``, the default): the
module asks it to write the built-in scenes if needed (``prepare_features``, once per node), then to get both
encoders' features from the feature store (``setup_features``, every process; what the store lacks is extracted
there, each DDP rank encoding a disjoint part, see ``features.py``). Batches are ``(source_features,
target_features, sample_index, caption_group)``. ``train`` fits, ``val`` makes every choice (checkpoint selection,
early stopping, closed-form tuning), ``test`` is reported once on the selected checkpoint. Without shard patterns
the built-in procedural scenes are written into the cache on first use, so ``python train.py`` needs no download.
``captions[split]`` and ``train_captions()`` tell seen from unseen captions; ``skipped`` counts skips per split.

``mode: stream`` trains without extracting the training split: a ``StreamingDataModule`` over the training shards,
resampled with a fixed epoch length so that every DDP rank takes the same number of steps, yields raw batches
(each encoder's preprocessing, and optional augmentation, done in the workers) and the ``StitchingModule`` runs
both frozen encoders on them. Validation and test still read the feature store: every sample once, of the same
un-augmented features, so whole-set metrics are exact and comparable between modes, and encoded once, not per epoch.

``StreamingDataModule``: ``PairedShards`` (each sample exactly once per epoch across ranks and workers) or
resampled shards cut to a fixed epoch length; the shuffle follows the trainer's epoch (or a count of passes
without a trainer), so the order is a function of ``seed`` and the epoch only. Batches: see ``batches.py``.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from prh_stitch.data.augment import AugmentOptions, augmented
from prh_stitch.data.features import FeatureSet, FeatureStore, Ranks, align_by_key, default_cache_dir
from prh_stitch.data.batches import BatchLoader, _as_is, batch_stages
from prh_stitch.data.stream import PairedShards, SkipStats
from prh_stitch.encoders.base import FrozenEncoder, Layer

log = logging.getLogger("prh_stitch.data")

# train fits, val makes every choice (checkpoint, early stopping, closed-form tuning), test is reported once.
SPLITS = ("train", "val", "test")
EVAL_SPLITS = ("val", "test")


@dataclass
class SceneData:
    """The built-in procedural scenes used when no shards are given (seeded, reproducible)."""

    n_train: int = 4096
    n_val: int = 1024
    n_test: int = 1024
    seed: int = 0
    image_size: int = 224


@dataclass
class StreamOptions:
    """How ``mode: stream`` reads the training shards.

    ``epoch_length``: training samples per epoch, all ranks together (null: the built-in scenes' ``n_train``;
    required with shard patterns, whose streams are resampled without end). ``shuffle_buffer``: samples in the
    shuffle buffer. ``norm_samples``: training samples whose features fit the stitcher's input/output
    normalisation before training (all ranks together; at most one epoch). ``augment``: image augmentation.
    """

    epoch_length: Optional[int] = None
    shuffle_buffer: int = 1000
    norm_samples: int = 4096
    augment: AugmentOptions = field(default_factory=AugmentOptions)


MODES = ("cached", "stream")


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


class PairDataset(TensorDataset):
    """A TensorDataset that hands the DataLoader a whole batch with one gather per tensor.

    The DataLoader calls ``__getitems__`` with a batch of indices when a dataset has it; indexing each
    tensor once per batch instead of once per sample (then stacking) is what keeps the loader far ahead of
    a linear stitcher. Rows come straight from the memory-mapped store when no copy was needed.
    """

    def __getitems__(self, indices: Sequence[int]) -> Tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return tuple(t[index] for t in self.tensors)


def _rows(feature_set: FeatureSet, layer: str, index: torch.Tensor) -> torch.Tensor:
    """float32 rows ``index`` of one layer; the memory-mapped array itself when that is all of it in order."""
    features = feature_set.layer(layer)
    if len(index) != len(features) or not torch.equal(index, torch.arange(len(features))):
        features = features[index]
    return features.float()  # a no-op for float32 stores: training then reads the store's pages directly


class StitchingDataModule(pl.LightningDataModule):
    def __init__(
        self,
        train: Optional[str] = None,
        val: Optional[str] = None,
        test: Optional[str] = None,
        scenes: SceneData = SceneData(),
        cache_dir: Optional[str] = None,
        batch_size: int = 256,
        extract_batch_size: int = 64,
        num_workers: int = 0,
        feature_dtype: str = "float32",
        seed: int = 0,
        mode: str = "cached",
        stream: StreamOptions = StreamOptions(),
    ) -> None:
        """
        Args:
            train: shard pattern of the training pairs (``shards/{000000..000099}.tar``, a glob, ``pipe:...``);
                None uses the built-in scenes.
            val: shard pattern of the validation pairs (every choice is made on them: checkpoint selection,
                closed-form tuning); None uses the built-in scenes.
            test: shard pattern of the test pairs, reported after training on the selected checkpoint and never
                used for a choice; None uses the built-in scenes.
            scenes: size and seed of the built-in scenes.
            cache_dir: where scenes and the feature store live (default ``$PRH_STITCH_CACHE`` or ``~/.cache/prh_stitch``).
            batch_size: stitcher training batch size (per process).
            extract_batch_size: encoder batch size for feature extraction.
            num_workers: DataLoader workers for decoding and preprocessing during extraction.
            feature_dtype: storage precision of cached features (float32, float16, bfloat16).
            seed: seed of the training shuffle (the order of epoch e depends only on seed and e, so resumed
                runs see the same batches as uninterrupted ones).
            mode: ``cached`` trains from the feature store; ``stream`` streams the training shards through the
                frozen encoders during training (see the module docstring).
            stream: options of ``mode: stream`` (epoch length, shuffle buffer, normalisation samples, augmentation).
        """
        super().__init__()
        if len({train is None, val is None, test is None}) > 1:
            raise ValueError("give all of the 'train', 'val' and 'test' shard patterns, or none (to use the built-in "
                             "scenes)")
        if test is not None and test in (train, val):
            raise ValueError("the test split must be its own shards, not the training or validation pattern again "
                             "(choices are made on val; test is reported once)")
        if mode not in MODES:
            raise ValueError(f"unknown data mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode == "stream" and stream.epoch_length is None and train is not None:
            raise ValueError("data.mode stream over shards needs data.stream.epoch_length (training samples per epoch)")
        self.mode = mode
        self.stream = stream
        self.streaming: Optional[StreamingDataModule] = None  # the raw training stream of mode 'stream'
        self.train_pattern = train
        self.val_pattern = val
        self.test_pattern = test
        self.patterns: Dict[str, str] = {}  # split -> shard pattern, once resolved by split_patterns()
        self.scenes = scenes
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.batch_size = int(batch_size)
        self.extract_batch_size = int(extract_batch_size)
        if self.batch_size < 1 or self.extract_batch_size < 1:  # now, not after minutes of extraction
            raise ValueError("data.batch_size and data.extract_batch_size must be >= 1, "
                             f"got {batch_size} and {extract_batch_size}")
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.store = FeatureStore(self.cache_dir / "features", dtype=feature_dtype)
        self.datasets: Dict[str, TensorDataset] = {}
        # split -> caption of every row of datasets[split] (row i = sample index i); filled by setup_features.
        self.captions: Dict[str, List[str]] = {}
        self._train_captions: Optional[frozenset] = None
        self.feature_sets: Dict[Tuple[str, str], FeatureSet] = {}
        # split -> {reason: count} of the samples and shards the features skipped; filled by setup_features.
        self.skipped: Dict[str, Dict[str, int]] = {}
        self._device: Optional[torch.device] = None

    # ---- shards -------------------------------------------------------------------------------
    def shard_urls(self, split: str) -> List[str]:
        from prh_stitch.data.shards import expand_urls

        urls = expand_urls(self.split_patterns()[split])
        if split != "train" and self.train_pattern is not None:
            if {os.path.realpath(u) for u in urls} == {os.path.realpath(u) for u in expand_urls(self.train_pattern)}:
                raise ValueError(f"data.train and data.{split} are the same shards ({urls[0]} ...); evaluating on the "
                                 f"training data measures nothing: give {split} shards of their own")
        return urls

    def split_patterns(self) -> Dict[str, str]:
        """``{split: shard pattern}`` of train, val and test (the built-in scenes written first when used)."""
        from prh_stitch.data.shards import ensure_scene_splits

        if self.train_pattern is not None:
            self.patterns = {"train": self.train_pattern, "val": self.val_pattern, "test": self.test_pattern}
        elif not self.patterns:
            s = self.scenes
            self.patterns = ensure_scene_splits(self.cache_dir / "scenes", {"train": s.n_train, "val": s.n_val,
                                                "test": s.n_test}, seed=s.seed, size=s.image_size)
        return dict(self.patterns)

    def train_captions(self) -> frozenset:
        """Every caption of the training split: what makes a val/test caption "seen" (read once, then kept)."""
        if self._train_captions is None:
            if "train" in self.captions:
                self._train_captions = frozenset(self.captions["train"])
            else:  # mode stream: the training split is not in the store; its captions are read from the shards
                self._train_captions = frozenset(shard_captions(self.shard_urls("train")))
        return self._train_captions

    # ---- features -----------------------------------------------------------------------------
    def prepare_features(self, requests: List[FeatureRequest], device: torch.device | str = "cpu") -> None:
        """Once per node, before any process sets up: write the built-in scenes if needed; note the device.

        Extraction happens in ``setup_features``, where every rank can take its share of it.
        """
        self._device = torch.device(device)
        self.split_patterns()

    def _features(self, request: FeatureRequest, split: str, ranks: Ranks) -> FeatureSet:
        device = self.trainer.strategy.root_device if self.trainer is not None else self._device
        return self.store.get(request.encoder, self.shard_urls(split), [request.layer], request.pooling,
                              batch_size=self.extract_batch_size, num_workers=self.num_workers,
                              progress=ranks.rank == 0, ranks=ranks, device=device)

    def setup_features(self, source: FeatureRequest, target: FeatureRequest) -> None:
        """Get both sides from the store (extracting what it lacks), join them by sample key, build the datasets."""
        ranks = Ranks.from_trainer(self.trainer)
        if self.mode == "stream":
            self._setup_stream(source, target)
        for split in SPLITS if self.mode == "cached" else EVAL_SPLITS:
            a = self._features(source, split, ranks)
            b = self._features(target, split, ranks)
            idx_a, idx_b = align_by_key(a, b)
            src = _rows(a, _layer_name(source), idx_a)
            tgt = _rows(b, _layer_name(target), idx_b)
            captions = [a.captions[i] for i in idx_a.tolist()]
            self.feature_sets[(split, "source")] = a
            self.feature_sets[(split, "target")] = b
            self.datasets[split] = PairDataset(src, tgt, torch.arange(len(src)), caption_groups(captions))
            self.captions[split] = captions
            # Both sides read the same shards, so their skip counts agree; the source's stand for the split.
            self.skipped[split] = dict(a.info["skipped"]["skipped"])
            skipped = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped[split].items())) or "none"
            rank_zero_info(
                f"prh_stitch: {split}: {len(src)} pairs ({src.shape[1]}-d -> {tgt.shape[1]}-d); "
                f"skipped {sum(self.skipped[split].values())} ({skipped})"
            )
        if self.mode == "cached" and len(self.datasets["train"]) == 0:
            raise ValueError("the training split has no samples")

    def _setup_stream(self, source: FeatureRequest, target: FeatureRequest) -> None:
        """The raw training stream: resampled shards, both encoders' preprocessing (and augmentation) in the workers."""
        epoch_length = self.stream.epoch_length or self.scenes.n_train
        world, _ = self._distributed()
        if epoch_length < world * self.batch_size:
            raise ValueError(f"data.stream.epoch_length {epoch_length} is less than one batch per rank "
                             f"({world} x {self.batch_size}); raise it")
        self.streaming = StreamingDataModule(
            train=self.shard_urls("train"), batch_size=self.batch_size, num_workers=self.num_workers,
            shuffle_buffer=self.stream.shuffle_buffer, seed=self.seed, resampled=True, epoch_length=epoch_length,
        )
        self.streaming.trainer = self.trainer  # its shuffle and draws follow the trainer's epoch
        self.streaming.set_encoders(augmented({"source": source.encoder, "target": target.encoder},
                                              self.stream.augment))

    def normalization_batches(self) -> Iterator[Tuple[dict, int]]:
        """``(batch, rows to use)`` of this rank's share of the first ``stream.norm_samples`` training samples.

        Every rank uses the same number of rows (its stream yields ``epoch_length // world`` per epoch), so the
        ranks' features can be gathered into one identical set everywhere.
        """
        world, _ = self._distributed()
        epoch_length = self.stream.epoch_length or self.scenes.n_train
        wanted = min(-(-self.stream.norm_samples // world), epoch_length // world)
        taken = 0
        loader = self._require_stream().train_dataloader()
        for batch in loader:
            if taken >= wanted:
                break
            rows = min(len(batch["key"]), wanted - taken)
            taken += rows
            yield batch, rows

    def _require_stream(self) -> StreamingDataModule:
        if self.streaming is None:
            raise RuntimeError("the training stream is not set up; the StitchingModule sets it up in its setup()")
        return self.streaming

    def training_tensors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "stream":
            raise ValueError("closed-form fits need the training features in the store: use data.mode cached")
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
        if self.mode == "stream":
            return self._require_stream().train_dataloader()
        dataset = self._require("train")
        world, rank = self._distributed()
        # Our own DistributedSampler (also for one process): its order depends only on (seed, epoch), which
        # Lightning sets each epoch, so a resumed run replays exactly the batches an uninterrupted run sees.
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=_as_is)

    def _eval_dataloader(self, split: str) -> DataLoader:
        dataset = self._require(split)
        world, rank = self._distributed()
        # Padding repeats a few samples to even out ranks; val/test metrics drop repeats by sample index.
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=_as_is)

    def val_dataloader(self) -> DataLoader:
        return self._eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_dataloader("test")


def shard_captions(urls: Sequence[str]) -> Iterator[str]:
    """The captions of shards, read without decoding any image: every whole sample with an image member and a
    non-empty ``.txt`` (a sample whose image would fail to decode is the one case counted here but skipped by
    training; its caption then counts as seen)."""
    from prh_stitch.data.stream import IMAGE_EXTENSIONS, PROBLEM, TRUNCATED, read_shard

    for url in urls:
        for raw in read_shard(url):
            if PROBLEM in raw or raw.get(TRUNCATED) or "txt" not in raw or not any(e in raw for e in IMAGE_EXTENSIONS):
                continue
            try:
                caption = raw["txt"].decode("utf-8").strip()
            except UnicodeDecodeError:
                continue  # undecodable: skipped by training as well
            if caption:
                yield caption


def _layer_name(request: FeatureRequest) -> str:
    return request.encoder.layer_names[request.encoder.resolve_layer(request.layer)]


class StreamingDataModule(pl.LightningDataModule):
    """Raw image-caption batches from shards, split over ranks and workers, with visible skip counts.

    The webdataset pipeline of ``stream.PairedShards`` with the batching stages of ``batches``; the batch format is
    described there.
    """

    def __init__(
        self,
        train: Optional[str] = None,
        val: Optional[str] = None,
        batch_size: int = 64,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        resampled: bool = False,
        epoch_length: Optional[int] = None,
        image_mode: Optional[str] = "RGB",
        image_size: Optional[int] = None,
    ) -> None:
        """
        Args:
            train: shard pattern of the training stream (brace range, glob, folder, list, ``pipe:``, ``https://``).
            val: shard pattern of the validation stream (read once per pass, in order, never resampled).
            batch_size: samples per batch (per rank).
            num_workers: DataLoader workers; decoding and every encoder's preprocessing run there.
            shuffle_buffer: training shuffle: shard order per epoch plus a buffer of this many samples (0: off).
            seed: seed of the shuffle and of resampling; with the epoch it fixes the order.
            resampled: draw training shards with replacement, without end, cut to ``epoch_length`` per epoch
                (all ranks together; every rank gets the same number of batches).
            epoch_length: samples per training epoch in resampled mode.
            image_mode: convert decoded images to this PIL mode (None keeps the stored one).
            image_size: resize every decoded image to this square side, before any preprocessing (None: as stored).
        """
        super().__init__()
        if train is None and val is None:
            raise ValueError("give a 'train' and/or a 'val' shard pattern")
        if resampled and not epoch_length:
            raise ValueError("resampled streams never end by themselves: give epoch_length (samples per epoch)")
        self.patterns = {"train": train, "val": val}
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.resampled = bool(resampled)
        self.epoch_length = epoch_length
        self.image_mode = image_mode
        self.image_size = image_size
        self.encoders: Dict[str, FrozenEncoder] = {}
        self.stats: Dict[str, SkipStats] = {"train": SkipStats(), "val": SkipStats()}
        self._passes: Counter = Counter()
        for name in ("train", "val"):  # fail on a bad pattern now, not in the first epoch
            if self.patterns[name] is not None:
                self.reader(name)

    def set_encoders(self, encoders: Mapping[str, FrozenEncoder]) -> None:
        """Preprocess every sample for each of these encoders (in the workers); batches get ``inputs[name]``."""
        self.encoders = dict(encoders)

    @property
    def skipped(self) -> Dict[str, Dict[str, int]]:
        """Skipped samples and shards by reason, per split, as counted by this process so far."""
        return {split: dict(stats.skipped) for split, stats in self.stats.items()}

    def reader(self, split: str) -> PairedShards:
        pattern = self.patterns[split]
        if pattern is None:
            raise ValueError(f"no {split!r} shard pattern was given to the StreamingDataModule")
        train = split == "train"
        return PairedShards(pattern, shuffle_buffer=self.shuffle_buffer if train else 0, seed=self.seed,
                            split_by_node=True, image_mode=self.image_mode,
                            resampled=train and self.resampled, epoch_length=self.epoch_length)

    def _epoch_source(self, split: str) -> Callable[[], int]:
        def epoch() -> int:
            trainer = getattr(self, "trainer", None)  # None until a Trainer adopts the module
            if trainer is not None:
                return int(trainer.current_epoch)
            self._passes[split] += 1
            return self._passes[split] - 1

        return epoch

    def dataloader(self, split: str) -> BatchLoader:
        reader = self.reader(split)
        for stage in batch_stages(self.batch_size, self.encoders, self.image_size, reader.stats):
            reader.append(stage)
        length = None
        if split == "train" and self.resampled:
            length = reader.batches_per_rank(self.batch_size, self.num_workers)
        # Persistent workers: started once per loader, not once per epoch; the epoch reaches them through shared
        # memory (see PairedShards.set_epoch).
        return BatchLoader(reader, self.stats[split], self._epoch_source(split), self.num_workers, length)

    def train_dataloader(self) -> BatchLoader:
        return self.dataloader("train")

    def val_dataloader(self) -> BatchLoader:
        return self.dataloader("val")
