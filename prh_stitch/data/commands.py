"""The data command's work as library functions: write shards from a source, check shards, extract features.

Each returns the JSON-ready report the command prints; bad input raises ``ValueError`` (or ``OSError`` for a file
the system refused) with one line naming the problem and the fix. :mod:`prh_stitch.cli.data` parses options
onto these signatures and nothing else.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from fractions import Fraction
from pathlib import Path
from typing import Any, Dict, Iterator, List, Literal, Optional, Tuple, Union

from prh_stitch.data.features import DEFAULT_CHUNK_SIZE
from prh_stitch.data.shards import ShardWriter
from prh_stitch.data.sources import SOURCES, Sample
from prh_stitch.data.stream import scan

# Lossless PNG for Fashion-MNIST: 28x28 grayscale is tiny and JPEG would blur the only signal there is.
DEFAULT_IMAGE_FORMAT = {"scenes": "jpg", "folder": "jpg", "fashion_mnist": "png"}
DEFAULT_SCENES = 1000  # n for scenes when not given: enough for a smoke run, seconds to write


def is_val(index: int, fraction: Fraction) -> bool:
    """Evenly interleaved split: sample i is validation when floor((i+1)f) > floor(i f).

    Exact rational arithmetic, so the count is floor(n f) and no float rounding moves a sample.
    """
    return int((index + 1) * fraction) > int(index * fraction)


def _routed_samples(source: str, fraction: Fraction, n: Optional[int], seed: int, size: int, split: str,
                    captions: Optional[str], image_root: Optional[str], image_column: Optional[str],
                    caption_column: Optional[str], skip_bad_rows: bool, test_fraction: Fraction = Fraction(0),
                    ) -> Tuple[Iterator[Tuple[str, Sample]], Optional[int], dict]:
    """``(("train" | "val" | "test", sample) pairs, seed recorded in the manifests, info)``.

    Scenes draw train, val and test from their own seed streams (as ``ensure_scene_splits`` does, so
    ``--n 1000 --val-fraction 0.1`` writes the same data as ``ensure_scene_shards(root, 900, 100)``);
    file-based sources are one stream, read once and split by the interleaving rule of :func:`is_val`: sample i
    is held out at the combined fraction, and held-out sample h is test at the test share of it.
    """
    factory = SOURCES.get(source)
    if source == "scenes":
        n = DEFAULT_SCENES if n is None else n
        n_val, n_test = int(n * fraction), int(n * test_fraction)
        series = {"train": n - n_val - n_test, "val": n_val, "test": n_test}
        pairs = itertools.chain.from_iterable(
            zip(itertools.repeat(name), factory(count, seed=seed, size=size, split=name))
            for name, count in series.items() if count)
        return pairs, seed, {"n": n, "size": size}
    if source == "folder":
        if not captions:
            raise ValueError("--source folder needs --captions FILE (CSV/TSV/JSONL naming images and captions)")
        stream = factory(captions, image_root=image_root, image_column=image_column,
                         caption_column=caption_column, limit=n, skip_bad_rows=skip_bad_rows)
        info = {"captions": str(Path(captions).resolve()), "limit": n}
    else:
        stream = factory(split=split, limit=n)
        info = {"split": split, "limit": n}
    return _interleaved(stream, fraction, test_fraction), None, info


def _interleaved(stream: Iterator[Sample], fraction: Fraction, test_fraction: Fraction) -> Iterator[Tuple[str, Sample]]:
    held, held_fraction = 0, fraction + test_fraction
    for i, sample in enumerate(stream):
        if not is_val(i, held_fraction):
            yield "train", sample
            continue
        yield ("test" if is_val(held, test_fraction / held_fraction) else "val"), sample
        held += 1


def _summary(out: Path, manifest: dict) -> dict:
    return {"pattern": str(out / manifest["pattern"]), "num_samples": manifest["num_samples"],
            "num_shards": manifest["num_shards"], "keys_sha256": manifest["keys_sha256"]}


def write_shards(
    source: str,
    out: str,
    n: Optional[int] = None,
    val_fraction: float = 0.1,
    samples_per_shard: int = 1000,
    max_shard_bytes: Optional[int] = None,
    seed: int = 0,
    size: int = 224,
    captions: Optional[str] = None,
    image_root: Optional[str] = None,
    image_column: Optional[str] = None,
    caption_column: Optional[str] = None,
    skip_bad_rows: bool = False,
    split: Literal["train", "test"] = "train",
    test_fraction: float = 0.0,
    image_format: Optional[Literal["jpg", "png", "webp"]] = None,
    overwrite: bool = False,
) -> Dict[str, Any]:
    """Write paired image-caption shards from a source; a failed run removes whatever it had written.

    Args:
        source: scenes, folder or fashion_mnist
        out: output folder (train-*.tar, val-*.tar and their manifests)
        n: number of samples (scenes: default 1000; others: a limit, default all)
        val_fraction: share of samples written as the 'val' series (0 writes only 'train')
        samples_per_shard: samples per shard
        max_shard_bytes: also start a new shard before this size
        seed: scenes: the generator seed
        size: scenes: image side in pixels
        captions: folder: CSV/TSV/JSONL file naming images and captions
        image_root: folder: images are relative to this (default: the captions file's folder)
        image_column: folder: column holding the image path
        caption_column: folder: column holding the caption
        skip_bad_rows: folder: skip rows with a missing image or empty caption instead of failing
        split: fashion_mnist: which split
        test_fraction: share of samples written as the 'test' series (reported once, never used for a choice;
            scenes draw it from their own test stream)
        image_format: default: png for fashion_mnist, jpg otherwise
        overwrite: replace existing series in out

    Returns:
        ``{"out": folder, "train": summary, "val": summary, "test": summary}`` (no "val" / "test" when its fraction
        is 0), each summary
        the written series' pattern, sample and shard counts and keys digest.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if not 0 <= test_fraction < 1 - val_fraction:
        raise ValueError(f"--test-fraction must be in [0, 1 - val fraction), got {test_fraction}")
    if n is not None and n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    fraction = Fraction(str(val_fraction))
    pairs, recorded_seed, info = _routed_samples(source, fraction, n, seed, size, split, captions, image_root,
                                                 image_column, caption_column, skip_bad_rows,
                                                 Fraction(str(test_fraction)))
    out_dir = Path(out).expanduser().resolve()
    common = dict(samples_per_shard=samples_per_shard, max_shard_bytes=max_shard_bytes, source=source,
                  seed=recorded_seed, image_format=image_format or DEFAULT_IMAGE_FORMAT.get(source, "jpg"),
                  overwrite=overwrite, info=dict(info, val_fraction=val_fraction, test_fraction=test_fraction))
    splits = ("train",) + (("val",) if fraction > 0 else ()) + (("test",) if test_fraction > 0 else ())
    with contextlib.ExitStack() as stack:
        # The writers abort together on any error: a failed run leaves no series behind.
        writers = {name: stack.enter_context(ShardWriter(out_dir, prefix=name, **common)) for name in splits}
        for name, sample in pairs:
            writers[name].add(*sample)
        total = sum(w.num_samples for w in writers.values())
        for name, writer in writers.items():
            if writer.num_samples == 0:
                raise ValueError(
                    f"the {name} series would be empty ({total} samples, --val-fraction {val_fraction}, "
                    f"--test-fraction {test_fraction}); change --n or the fractions"
                )
        manifests = {name: writer.close() for name, writer in writers.items()}
    return {"out": str(out_dir), **{name: _summary(out_dir, m) for name, m in manifests.items()}}


def check_shards(pattern: str) -> Dict[str, Any]:
    """Read every sample of some shards: the scan report (counts, skips by reason, keys digest)."""
    return scan(pattern)


def check_failure_line(pattern: str, report: Dict[str, Any]) -> Optional[str]:
    """The one line saying a scan found shards training refuses (no good sample, repeated keys), or None."""
    if report["good"] == 0:
        skipped = ", ".join(f"{reason}: {count}" for reason, count in report["skipped"].items()) or "no samples at all"
        return f"no good samples in {pattern!r} ({skipped})"
    if report["duplicate_keys"]:
        return (f"{report['duplicate_keys']} sample key(s) of {pattern!r} repeat; keys must be unique to join image "
                "and text features (training refuses these shards): rewrite them with unique keys")
    return None


def verify_store(out: Optional[str] = None, repair: bool = False) -> Dict[str, Any]:
    """Check every complete entry of a feature store against the hashes in its index.

    Args:
        out: feature store folder (default $PRH_STITCH_CACHE/features, the one training uses)
        repair: delete damaged entries, so that the next use extracts them again

    Returns:
        root, entries checked, entries ok, damaged entries with their problem, entries deleted.
    """
    from prh_stitch.data.store_entry import default_cache_dir
    from prh_stitch.data.store_safety import verify_store as verify

    return verify(out if out is not None else default_cache_dir() / "features", repair=repair)


def _layer(value: Union[int, str]) -> Union[int, str]:
    try:
        return int(value)
    except ValueError:
        return value  # a layer name, e.g. blocks.3


def extract_features(
    encoder: str,
    data: str,
    layers: List[Union[int, str]] = [-1],  # noqa: B006 (never mutated: jsonargparse shows it as the default)
    pooling: Optional[str] = None,
    out: Optional[str] = None,
    name: Optional[str] = None,
    batch_size: int = 64,
    workers: int = 0,
    dtype: Literal["bfloat16", "float16", "float32"] = "float32",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    device: str = "cpu",
    checkpoint: Optional[str] = None,
    options: str = "{}",
    progress: bool = True,
) -> Dict[str, Any]:
    """Extract an encoder's features of some shards into the feature store (the code path training uses).

    An entry extracted here is a store hit for a training run with the same cache_dir, and a killed extraction
    resumes where it stopped when run again.

    Args:
        encoder: built-in name, timm:<model> or hf:<id or folder>
        data: shard pattern: brace range, glob, folder, list, pipe: URL
        layers: layer indices (negative from the end) or names; default -1, the final representation
        pooling: cls, mean, last, head; default: the layer's natural pooling
        out: feature store folder (default $PRH_STITCH_CACHE/features, the one training uses)
        name: entry folder name (default: encoder name + fingerprint)
        batch_size: samples per encoder batch
        workers: DataLoader workers for decoding and preprocessing
        dtype: storage precision
        chunk_size: samples per part written to disk (the granularity of resuming and of splitting work)
        device: where the encoder runs (cpu, cuda, cuda:1, ...)
        checkpoint: local weights file for a timm:/hf: encoder
        options: JSON object of encoder options, e.g. '{"max_length": 64}'
        progress: progress bar on stderr (--no-progress turns it off)

    Returns:
        entry folder, status, samples, layers, widths, dtype, seconds, skips, parts computed and reused.
    """
    from prh_stitch.data.features import FeatureStore, default_cache_dir
    from prh_stitch.data.shards import expand_urls
    from prh_stitch.encoders import POOLERS, build_encoder

    started = time.perf_counter()
    try:
        encoder_options = json.loads(options)
    except ValueError as exc:
        raise ValueError(f"--options must be a JSON object: {exc}") from None
    if not isinstance(encoder_options, dict):
        raise ValueError(f"--options must be a JSON object, got {options!r}")
    if batch_size < 1 or workers < 0:
        raise ValueError(f"--batch-size must be >= 1 and --workers >= 0, got {batch_size} and {workers}")
    urls = expand_urls(data)
    model = build_encoder(encoder, checkpoint=checkpoint, options=encoder_options)
    layer_keys = [_layer(layer) for layer in layers]
    for layer in layer_keys:
        model.resolve_layer(layer)  # a bad layer or pooling fails before any work
    if pooling not in (None, "head"):
        POOLERS.get(pooling)
    store = FeatureStore(out if out is not None else default_cache_dir() / "features", dtype=dtype,
                         chunk_size=chunk_size)
    features = store.get(model, urls, layer_keys, pooling, batch_size=batch_size, num_workers=workers,
                         progress=progress, name=name, device=device)
    info, run = features.info, features.info["extraction"]
    return {
        "entry": info["entry"],
        "status": run["status"],
        "num_samples": len(features),
        "layers": info["layers"],
        "dims": info["dims"],
        "dtype": info["dtype"],
        "seconds": round(time.perf_counter() - started, 3),
        "skipped": info["skipped"]["skipped"],
        "chunks": info["chunks"],
        "chunks_computed": run["chunks_computed"],
        "chunks_reused": run["chunks_reused"],
        "samples_encoded": run["samples_encoded"],
        "captions_reused": run.get("captions_reused", 0),
    }
