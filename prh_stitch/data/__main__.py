"""``python -m prh_stitch.data``: write shards from a source, check shards, or extract features into the store.

    python -m prh_stitch.data write --source scenes --out data/scenes --n 10000 --val-fraction 0.1
    python -m prh_stitch.data write --source folder --captions pairs.csv --out data/mine
    python -m prh_stitch.data write --source fashion_mnist --split test --out data/fmnist --val-fraction 0
    python -m prh_stitch.data check "data/scenes/train-{000000..000009}.tar"
    python -m prh_stitch.data extract --encoder efficientnet_lite0 --layers -1 3 \
        --data "data/scenes/train-{000000..000009}.tar" --out ~/.cache/prh_stitch/features --workers 2

``write`` prints one JSON object (patterns and counts of the written series); ``check`` prints one JSON
object, the scan report; ``extract`` prints one JSON object (entry folder, samples, widths, seconds, skips,
parts computed and reused). ``extract`` is the feature store's own code path, the one training uses: an
entry extracted here is a store hit for a training run with the same ``cache_dir``, and a killed
extraction resumes where it stopped when run again. Exit status: 0 success (``check``: some good samples,
skips allowed), 1 ``check`` found no good sample, 2 bad input (unknown source or encoder, missing file,
pattern matching nothing, existing output, an entry made from other weights, no usable sample, NaN
features). Errors are one line on stderr, never a traceback, and a failed ``write`` removes whatever it
had written.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple

from prh_stitch.data.shards import ShardWriter
from prh_stitch.data.sources import SOURCES, Sample
from prh_stitch.data.stream import scan

# Lossless PNG for Fashion-MNIST: 28x28 grayscale is tiny and JPEG would blur the only signal there is.
DEFAULT_IMAGE_FORMAT = {"scenes": "jpg", "folder": "jpg", "fashion_mnist": "png"}
DEFAULT_SCENES = 1000  # --n for scenes when not given: enough for a smoke run, seconds to write


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m prh_stitch.data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    write = commands.add_parser("write", help="write paired image-caption shards from a source")
    write.add_argument("--source", required=True, help=f"one of: {', '.join(SOURCES.names())}")
    write.add_argument("--out", required=True, help="output folder (train-*.tar, val-*.tar and their manifests)")
    write.add_argument("--n", type=int, default=None,
                       help=f"number of samples (scenes: default {DEFAULT_SCENES}; others: a limit, default all)")
    write.add_argument("--val-fraction", type=float, default=0.1,
                       help="share of samples written as the 'val' series (0 writes only 'train')")
    write.add_argument("--samples-per-shard", type=int, default=1000)
    write.add_argument("--max-shard-bytes", type=int, default=None, help="also start a new shard before this size")
    write.add_argument("--seed", type=int, default=0, help="scenes: the generator seed")
    write.add_argument("--size", type=int, default=224, help="scenes: image side in pixels")
    write.add_argument("--captions", help="folder: CSV/TSV/JSONL file naming images and captions")
    write.add_argument("--image-root", help="folder: images are relative to this (default: the captions file's folder)")
    write.add_argument("--image-column", help="folder: column holding the image path")
    write.add_argument("--caption-column", help="folder: column holding the caption")
    write.add_argument("--skip-bad-rows", action="store_true",
                       help="folder: skip rows with a missing image or empty caption instead of failing")
    write.add_argument("--split", default="train", choices=("train", "test"), help="fashion_mnist: which split")
    write.add_argument("--image-format", choices=("jpg", "png", "webp"), default=None,
                       help="default: png for fashion_mnist, jpg otherwise")
    write.add_argument("--overwrite", action="store_true", help="replace existing series in --out")

    check = commands.add_parser("check", help="read every sample of some shards and report counts and skips")
    check.add_argument("pattern", help="shard pattern: brace range, glob, folder, list, pipe: URL")

    from prh_stitch.data.features import DEFAULT_CHUNK_SIZE, DTYPES

    extract = commands.add_parser("extract", help="extract an encoder's features of some shards into the feature store")
    extract.add_argument("--encoder", required=True, help="built-in name, timm:<model> or hf:<id or folder>")
    extract.add_argument("--layers", nargs="+", default=["-1"],
                         help="layer indices (negative from the end) or names; default -1, the final representation")
    extract.add_argument("--pooling", default=None, help="cls, mean, last, head; default: the layer's natural pooling")
    extract.add_argument("--data", required=True, help="shard pattern: brace range, glob, folder, list, pipe: URL")
    extract.add_argument("--out", default=None,
                         help="feature store folder (default $PRH_STITCH_CACHE/features, the one training uses)")
    extract.add_argument("--name", default=None, help="entry folder name (default: encoder name + fingerprint)")
    extract.add_argument("--batch-size", type=int, default=64)
    extract.add_argument("--workers", type=int, default=0, help="DataLoader workers for decoding and preprocessing")
    extract.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="storage precision")
    extract.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                         help="samples per part written to disk (the granularity of resuming and of splitting work)")
    extract.add_argument("--device", default="cpu", help="where the encoder runs (cpu, cuda, cuda:1, ...)")
    extract.add_argument("--checkpoint", default=None, help="local weights file for a timm:/hf: encoder")
    extract.add_argument("--options", default="{}", help="JSON object of encoder options, e.g. '{\"max_length\": 64}'")
    extract.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def _is_val(index: int, fraction: Fraction) -> bool:
    """Evenly interleaved split: sample i is validation when floor((i+1)f) > floor(i f).

    Exact rational arithmetic, so the count is floor(n f) and no float rounding moves a sample.
    """
    return int((index + 1) * fraction) > int(index * fraction)


def _routed_samples(args, fraction: Fraction) -> Tuple[Iterator[Tuple[str, Sample]], Optional[int], dict]:
    """``(("train" | "val", sample) pairs, seed recorded in the manifests, info)``.

    Scenes draw train and val from their own seed streams (as ``ensure_scene_shards`` does, so
    ``--n 1000 --val-fraction 0.1`` writes the same data as ``ensure_scene_shards(root, 900, 100)``);
    file-based sources are one stream, read once and split by the interleaving rule of ``_is_val``.
    """
    factory = SOURCES.get(args.source)
    if args.source == "scenes":
        n = DEFAULT_SCENES if args.n is None else args.n
        n_val = int(n * fraction)
        train = factory(n - n_val, seed=args.seed, size=args.size, split="train")
        val = factory(n_val, seed=args.seed, size=args.size, split="val")
        pairs = itertools.chain((("train", s) for s in train), (("val", s) for s in val))
        return pairs, args.seed, {"n": n, "size": args.size}
    if args.source == "folder":
        if not args.captions:
            raise ValueError("--source folder needs --captions FILE (CSV/TSV/JSONL naming images and captions)")
        stream = factory(args.captions, image_root=args.image_root, image_column=args.image_column,
                         caption_column=args.caption_column, limit=args.n, skip_bad_rows=args.skip_bad_rows)
        info = {"captions": str(Path(args.captions).resolve()), "limit": args.n}
    else:
        stream = factory(split=args.split, limit=args.n)
        info = {"split": args.split, "limit": args.n}
    pairs = (("val" if _is_val(i, fraction) else "train", s) for i, s in enumerate(stream))
    return pairs, None, info


def _summary(out: Path, manifest: dict) -> dict:
    return {"pattern": str(out / manifest["pattern"]), "num_samples": manifest["num_samples"],
            "num_shards": manifest["num_shards"], "keys_sha256": manifest["keys_sha256"]}


def _write(args) -> int:
    if not 0 <= args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.n is not None and args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    fraction = Fraction(str(args.val_fraction))
    pairs, seed, info = _routed_samples(args, fraction)
    out = Path(args.out).expanduser().resolve()
    image_format = args.image_format or DEFAULT_IMAGE_FORMAT.get(args.source, "jpg")
    common = dict(samples_per_shard=args.samples_per_shard, max_shard_bytes=args.max_shard_bytes,
                  source=args.source, seed=seed, image_format=image_format, overwrite=args.overwrite,
                  info=dict(info, val_fraction=args.val_fraction))
    splits = ("train", "val") if fraction > 0 else ("train",)
    with contextlib.ExitStack() as stack:
        # The writers abort together on any error: a failed run leaves no series behind.
        writers = {split: stack.enter_context(ShardWriter(out, prefix=split, **common)) for split in splits}
        for split, sample in pairs:
            writers[split].add(*sample)
        total = sum(w.num_samples for w in writers.values())
        for split, writer in writers.items():
            if writer.num_samples == 0:
                raise ValueError(
                    f"the {split} series would be empty ({total} samples, --val-fraction {args.val_fraction}); "
                    "change --n or --val-fraction"
                )
        manifests = {split: writer.close() for split, writer in writers.items()}
    print(json.dumps({"out": str(out), **{split: _summary(out, m) for split, m in manifests.items()}}))
    return 0


def _check(args) -> int:
    report = scan(args.pattern)
    print(json.dumps(report, sort_keys=True))
    if report["good"] == 0:
        skipped = ", ".join(f"{reason}: {count}" for reason, count in report["skipped"].items()) or "no samples at all"
        print(f"error: no good samples in {args.pattern!r} ({skipped})", file=sys.stderr)
        return 1
    return 0


def _layer(text: str):
    try:
        return int(text)
    except ValueError:
        return text  # a layer name, e.g. blocks.3


def _extract(args) -> int:
    from prh_stitch.data.features import FeatureStore, default_cache_dir
    from prh_stitch.data.shards import expand_urls
    from prh_stitch.encoders import POOLERS, build_encoder

    started = time.perf_counter()
    try:
        options = json.loads(args.options)
    except ValueError as exc:
        raise ValueError(f"--options must be a JSON object: {exc}") from None
    if not isinstance(options, dict):
        raise ValueError(f"--options must be a JSON object, got {args.options!r}")
    if args.batch_size < 1 or args.workers < 0:
        raise ValueError(f"--batch-size must be >= 1 and --workers >= 0, got {args.batch_size} and {args.workers}")
    urls = expand_urls(args.data)
    encoder = build_encoder(args.encoder, checkpoint=args.checkpoint, options=options)
    layers = [_layer(layer) for layer in args.layers]
    for layer in layers:
        encoder.resolve_layer(layer)  # a bad layer or pooling fails before any work
    if args.pooling not in (None, "head"):
        POOLERS.get(args.pooling)
    out = args.out if args.out is not None else default_cache_dir() / "features"
    store = FeatureStore(out, dtype=args.dtype, chunk_size=args.chunk_size)
    features = store.get(encoder, urls, layers, args.pooling, batch_size=args.batch_size, num_workers=args.workers,
                         progress=not args.no_progress, name=args.name, device=args.device)
    info, run = features.info, features.info["extraction"]
    print(json.dumps({
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
    }))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse has printed its usage message; report the status, don't exit
        return int(exit_.code or 0)
    try:
        return {"write": _write, "check": _check, "extract": _extract}[args.command](args)
    except (ValueError, OSError) as exc:
        message = str(exc).replace("\n", " ")
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(levelname)s: %(message)s")
    sys.exit(main())
