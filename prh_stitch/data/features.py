"""The feature store: frozen-encoder outputs computed once, kept on disk, reused by every run.

Encoders are frozen and the default inputs are not augmented, so an encoder's pooled features for a sample
are a pure function of (encoder weights, preprocessing, layers, pooling, sample). Each entry of the store is
keyed by a fingerprint of all of those plus a fingerprint of the shards read, and holds:

    <root>/<entry>/features.safetensors   one (N, D) tensor per layer, rows in key order
    <root>/<entry>/index.json             sample keys, captions, labels, fingerprints, skip counts

An entry is written into a temporary folder and renamed into place only when complete, so a killed
extraction never leaves a half-written entry that a later run could take for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from prh_stitch.encoders.base import FrozenEncoder, Layer

log = logging.getLogger("prh_stitch.data")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_cache_dir() -> Path:
    """``$PRH_STITCH_CACHE``, else ``~/.cache/prh_stitch``."""
    return Path(os.environ.get("PRH_STITCH_CACHE") or Path.home() / ".cache" / "prh_stitch")


def data_fingerprint(urls: Sequence[str]) -> str:
    """Identity of a list of shards: local files by path, size and modification time; ``pipe:`` by URL."""
    parts = []
    for url in urls:
        if url.startswith("pipe:"):
            parts.append(url)
        else:
            st = os.stat(url)
            parts.append(f"{os.path.abspath(url)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


@dataclass
class FeatureSet:
    """Pooled features of one encoder on one dataset: rows ordered by sample key."""

    keys: List[str]
    captions: List[str]
    labels: List[int]
    features: Dict[str, Tensor]  # layer name -> (N, D)
    info: Dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    def layer(self, name: str) -> Tensor:
        if name not in self.features:
            raise ValueError(f"the feature set has no layer {name!r}; it holds {sorted(self.features)}")
        return self.features[name]


def align_by_key(a: FeatureSet, b: FeatureSet) -> Tuple[Tensor, Tensor]:
    """Row indices into ``a`` and ``b`` of the samples present in both, in key order.

    The two sides can differ when one encoder's pass skipped a sample the other kept (e.g. shards that
    changed between extractions would already change the fingerprint, but a key can still be missing).
    """
    position_b = {key: i for i, key in enumerate(b.keys)}
    idx_a, idx_b = [], []
    for i, key in enumerate(a.keys):
        j = position_b.get(key)
        if j is not None:
            idx_a.append(i)
            idx_b.append(j)
    if not idx_a:
        raise ValueError("the two feature sets share no sample keys; were they extracted from the same shards?")
    return torch.tensor(idx_a), torch.tensor(idx_b)


class _EncoderInputs(IterableDataset):
    """Streams samples and applies one encoder's per-sample preprocessing (in the DataLoader workers)."""

    def __init__(self, samples: IterableDataset, encoder: FrozenEncoder) -> None:
        self.samples = samples
        self.encoder = encoder

    def __iter__(self) -> Iterator[Tuple[str, str, int, Any]]:
        image_side = self.encoder.modality == "image"
        for sample in self.samples:
            raw = sample["image"] if image_side else sample["caption"]
            label = sample["meta"].get("label", -1) if isinstance(sample.get("meta"), dict) else -1
            yield sample["key"], sample["caption"], int(label), self.encoder.transform(raw)


class _Collate:
    def __init__(self, encoder: FrozenEncoder) -> None:
        self.encoder = encoder

    def __call__(self, items):
        keys, captions, labels, inputs = zip(*items)
        return list(keys), list(captions), list(labels), self.encoder.collate(inputs)


class FeatureStore:
    """Extract-or-load pooled features, keyed by encoder and data fingerprints."""

    def __init__(self, root: Optional[str | os.PathLike] = None, dtype: str = "float32") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"unknown feature dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        self.root = Path(root) if root is not None else default_cache_dir() / "features"
        self.dtype = dtype
        self.hits = 0
        self.extractions = 0

    def entry_key(self, encoder: FrozenEncoder, layers: Sequence[Layer], pooling: Optional[str], urls: Sequence[str]) -> str:
        payload = f"{encoder.fingerprint(layers, pooling)}|{data_fingerprint(urls)}|{self.dtype}"
        return f"{encoder.name.replace('/', '_').replace(':', '_')}-{hashlib.sha256(payload.encode()).hexdigest()[:20]}"

    def get(
        self,
        encoder: FrozenEncoder,
        urls: Sequence[str],
        layers: Sequence[Layer] = (-1,),
        pooling: Optional[str] = None,
        batch_size: int = 64,
        num_workers: int = 0,
        progress: bool = True,
    ) -> FeatureSet:
        """Features of ``encoder`` on the shards ``urls``: from the store if present, else extracted now."""
        entry = self.root / self.entry_key(encoder, layers, pooling, urls)
        if (entry / "index.json").is_file():
            self.hits += 1
            log.info("features of %s: store hit (%s)", encoder.name, entry)
            return self._read(entry)
        self.extractions += 1
        feature_set = self.extract(encoder, urls, layers, pooling, batch_size, num_workers, progress)
        self._write(entry, feature_set)
        return feature_set

    def extract(
        self,
        encoder: FrozenEncoder,
        urls: Sequence[str],
        layers: Sequence[Layer] = (-1,),
        pooling: Optional[str] = None,
        batch_size: int = 64,
        num_workers: int = 0,
        progress: bool = True,
    ) -> FeatureSet:
        """Run the encoder over every good sample of the shards (no store involved)."""
        from tqdm.auto import tqdm

        from prh_stitch.data.stream import PairedShards, SkipStats

        stats = SkipStats()
        samples = PairedShards(list(urls), stats=stats, split_by_node=False)
        loader = DataLoader(
            _EncoderInputs(samples, encoder), batch_size=batch_size, num_workers=num_workers,
            collate_fn=_Collate(encoder),
        )
        names = [encoder.layer_names[encoder.resolve_layer(layer)] for layer in layers]
        chunks: Dict[str, List[Tensor]] = {name: [] for name in names}
        keys: List[str] = []
        captions: List[str] = []
        labels: List[int] = []
        started = time.perf_counter()
        with tqdm(desc=f"features {encoder.name}", unit="sample", disable=not progress) as bar:
            for batch_keys, batch_captions, batch_labels, batch in loader:
                outputs = encoder.encode(batch, layers, pooling)
                for name, out in zip(names, outputs):
                    chunks[name].append(out.to("cpu", DTYPES[self.dtype]))
                keys += batch_keys
                captions += batch_captions
                labels += batch_labels
                bar.update(len(batch_keys))
        if not keys:
            raise ValueError(
                f"no usable samples in {len(urls)} shard(s) ({urls[0]} ...); skipped: {stats.as_dict()}. "
                "Check the shards with: python -m prh_stitch.data check \"PATTERN\""
            )
        if len(set(keys)) != len(keys):
            raise ValueError("duplicate sample keys in the shards; keys must be unique to join image and text features")
        order = sorted(range(len(keys)), key=keys.__getitem__)
        features = {}
        for name in names:
            stacked = torch.cat(chunks[name])[torch.tensor(order)]
            bad = ~torch.isfinite(stacked.float()).all(dim=1)
            if bad.any():
                examples = [keys[order[i]] for i in bad.nonzero().flatten()[:3].tolist()]
                raise ValueError(
                    f"encoder {encoder.name!r} produced NaN/Inf features at layer {name!r} for {int(bad.sum())} "
                    f"sample(s) (e.g. {examples}); check the weights and inputs, or store float32 features"
                )
            features[name] = stacked.contiguous()
        info = {
            "encoder": encoder.name,
            "encoder_fingerprint": encoder.fingerprint(layers, pooling),
            "data_fingerprint": data_fingerprint(urls),
            "layers": names,
            "pooling": pooling,
            "dtype": self.dtype,
            "num_samples": len(keys),
            "skipped": stats.as_dict(),
            "seconds": round(time.perf_counter() - started, 3),
        }
        return FeatureSet(
            keys=[keys[i] for i in order], captions=[captions[i] for i in order],
            labels=[labels[i] for i in order], features=features, info=info,
        )

    def _write(self, entry: Path, feature_set: FeatureSet) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{entry.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({f"layer:{k}": v for k, v in feature_set.features.items()}, str(tmp / "features.safetensors"))
        index = {"keys": feature_set.keys, "captions": feature_set.captions, "labels": feature_set.labels,
                 "info": feature_set.info}
        # index.json is written last: its presence is what marks an entry complete.
        (tmp / "index.json").write_text(json.dumps(index))
        try:
            os.rename(tmp, entry)
        except OSError:
            # Another process (a second node or rank) finished the same entry first; theirs is identical.
            shutil.rmtree(tmp, ignore_errors=True)

    def _read(self, entry: Path) -> FeatureSet:
        index = json.loads((entry / "index.json").read_text())
        tensors = load_file(str(entry / "features.safetensors"))
        features = {k.split(":", 1)[1]: v for k, v in tensors.items()}
        return FeatureSet(keys=index["keys"], captions=index["captions"], labels=index["labels"],
                          features=features, info=index["info"])
