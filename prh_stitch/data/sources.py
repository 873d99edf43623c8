"""Sample sources: iterables of ``(key, PIL image, caption, meta)`` that ``write_shards`` turns into shards.

Registered by name in ``SOURCES`` (``SOURCES.get("scenes")(n=100)``) so the CLI and configs can pick
one by string, with the valid choices listed on a typo. Every source is deterministic: iterating it
twice gives the same keys, images and captions, which is what makes written shards reproducible.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import os
import struct
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from prh_stitch.data.scenes import generate_scene, is_held_out
from prh_stitch.registry import Registry

logger = logging.getLogger("prh_stitch.data")

Sample = Tuple[str, Image.Image, str, Dict[str, Any]]
SOURCES: Registry = Registry("data source")

# Distinct entropy words per split: scene i of "train" and scene i of "val" come from unrelated streams.
SCENE_SPLITS = {"train": 0, "val": 1, "test": 2}


@SOURCES.register("scenes")
def scenes(n: int, seed: int = 0, size: int = 224, split: str = "train") -> Iterator[Sample]:
    """``n`` procedurally drawn scenes; scene ``i`` is drawn from ``default_rng([seed, split_id, i])``.

    Seeding each scene on its own index makes scene ``i`` independent of ``n`` (the first 100 of a
    1000-scene set are the 100-scene set) and keeps the splits disjoint streams for the same seed. The
    ``train`` split never contains the held-out combinations of ``scenes.HELD_OUT_OBJECTS`` and
    ``HELD_OUT_TEMPLATES``; ``val`` and ``test`` draw from the full distribution, so some of their captions are
    unseen in training by construction (``meta["held_out"]`` marks those scenes).
    """
    if split not in SCENE_SPLITS:
        raise ValueError(f"scene split must be one of {sorted(SCENE_SPLITS)}, got {split!r}")
    if n < 0:
        raise ValueError(f"number of scenes must be >= 0, got {n}")
    if size < 16:
        raise ValueError(f"scene size must be at least 16 pixels, got {size}")
    return _scene_samples(n, seed, size, split)


def _scene_samples(n: int, seed: int, size: int, split: str) -> Iterator[Sample]:
    for index in range(n):
        rng = np.random.default_rng([seed, SCENE_SPLITS[split], index])
        image, caption, meta = generate_scene(rng, size, hold_out=split == "train")
        meta = dict(meta, index=index, split=split, seed=seed, held_out=is_held_out(meta))
        yield f"{split}-{index:08d}", image, caption, meta


# -- folder of images + captions file -------------------------------------------------------------------

IMAGE_COLUMNS = ("image", "image_path", "filepath", "file_name", "filename", "file", "path", "img")
CAPTION_COLUMNS = ("caption", "text", "title", "sentence", "description")


def _read_caption_rows(captions_file: Path) -> Tuple[List[str], Iterator[Dict[str, Any]]]:
    """Column names and an iterator of row dicts; JSONL columns are the keys of the first record."""
    suffix = captions_file.suffix.lower()
    try:
        if suffix in (".csv", ".tsv", ".tab"):
            handle = open(captions_file, newline="", encoding="utf-8")
            reader = csv.DictReader(handle, delimiter="," if suffix == ".csv" else "\t")
            columns = list(reader.fieldnames or [])

            def rows() -> Iterator[Dict[str, Any]]:
                with handle:
                    try:
                        yield from reader
                    except (UnicodeDecodeError, csv.Error) as exc:
                        raise ValueError(f"cannot read captions file {captions_file} near line {reader.line_num}: {exc}") from None

            return columns, rows()
        if suffix in (".jsonl", ".ndjson"):
            records = []
            with open(captions_file, encoding="utf-8") as handle:
                for line_no, line in enumerate(handle, 1):
                    if line.strip():
                        record = json.loads(line)
                        if not isinstance(record, dict):
                            raise ValueError(f"line {line_no} is not a JSON object")
                        records.append(record)
            columns = list(records[0]) if records else []
            return columns, iter(records)
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as exc:
        raise ValueError(f"cannot read captions file {captions_file}: {exc}") from None
    raise ValueError(f"captions file {captions_file} must end in .csv, .tsv, .tab, .jsonl or .ndjson")


def _pick_column(kind: str, requested: Optional[str], candidates: Sequence[str], columns: List[str], path: Path) -> str:
    if requested is not None:
        if requested not in columns:
            raise ValueError(f"{path} has no {kind} column {requested!r}; columns found: {columns}")
        return requested
    lowered = {c.lower(): c for c in columns}
    for name in candidates:
        if name in lowered:
            return lowered[name]
    raise ValueError(
        f"{path} has no {kind} column (looked for {list(candidates)}); columns found: {columns}. "
        f"Name it with --{kind}-column"
    )


@SOURCES.register("folder")
def folder(
    captions_file: str | os.PathLike,
    image_root: Optional[str | os.PathLike] = None,
    image_column: Optional[str] = None,
    caption_column: Optional[str] = None,
    limit: Optional[int] = None,
    skip_bad_rows: bool = False,
) -> Iterator[Sample]:
    """Images listed in a CSV/TSV/JSONL file with their captions; paths relative to ``image_root``.

    ``image_root`` defaults to the captions file's folder. Key = row number (``row-000000012``), stable
    as long as the file is; an image named by several rows (COCO's five captions) becomes several
    samples. Other columns are kept in meta. A missing/unreadable image or an empty caption raises
    ValueError naming the row, unless ``skip_bad_rows``, which logs and skips it instead. The file and
    its columns are checked when this function is called, not at the first sample.
    """
    captions_path = Path(captions_file).expanduser()
    if not captions_path.is_file():
        raise ValueError(f"captions file {captions_path} does not exist")
    root = Path(image_root).expanduser() if image_root is not None else captions_path.parent
    columns, rows = _read_caption_rows(captions_path)
    image_key = _pick_column("image", image_column, IMAGE_COLUMNS, columns, captions_path)
    caption_key = _pick_column("caption", caption_column, CAPTION_COLUMNS, columns, captions_path)
    return _folder_samples(captions_path, root, rows, image_key, caption_key, limit, skip_bad_rows)


def _folder_samples(captions_path, root, rows, image_key, caption_key, limit, skip_bad_rows) -> Iterator[Sample]:
    produced = 0
    for row_no, row in enumerate(rows):
        if limit is not None and produced >= limit:
            return
        where = f"{captions_path} row {row_no + 1}"
        caption = str(row.get(caption_key) or "").strip()
        rel_path = str(row.get(image_key) or "").strip()
        problem, image = None, None
        if not caption:
            problem = "empty caption"
        elif not rel_path:
            problem = "empty image path"
        else:
            image_path = root / rel_path
            try:
                with Image.open(image_path) as opened:
                    opened.load()
                    image = opened.copy()
            except FileNotFoundError:
                problem = f"image {image_path} does not exist"
            except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
                problem = f"image {image_path} cannot be decoded ({exc})"
        if problem is not None:
            if not skip_bad_rows:
                raise ValueError(f"{where}: {problem} (pass --skip-bad-rows to skip such rows)")
            logger.warning("skipping %s: %s", where, problem)
            continue
        extra = {k: v for k, v in row.items() if k not in (image_key, caption_key) and k is not None}
        meta = dict(extra, image_path=rel_path, row=row_no)
        produced += 1
        yield f"row-{row_no:09d}", image, caption, meta


# -- Fashion-MNIST ---------------------------------------------------------------------------------------

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "PRH_STITCH_FASHION_MNIST"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Names with their article, as they read inside a caption.
FASHION_MNIST_PHRASES = (
    "a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat",
    "a sandal", "a shirt", "a sneaker", "a bag", "an ankle boot",
)
FASHION_MNIST_TEMPLATES = (
    "a photo of {}",
    "a black and white photo of {}",
    "a low resolution photo of {}",
    "a grayscale picture of {}",
)
_IDX_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
              "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def fashion_mnist_dir(root: Optional[str | os.PathLike] = None) -> Path:
    """Where the IDX files are: ``root``, else ``$PRH_STITCH_FASHION_MNIST``, else the Debian location."""
    if root is not None:
        return Path(root).expanduser()
    return Path(os.environ.get(FASHION_MNIST_ENV, FASHION_MNIST_DIR))


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    magic, = struct.unpack(">I", data[:4])
    if magic != expected_magic:
        raise ValueError(f"{path} is not an IDX file of the expected kind (magic {magic}, expected {expected_magic})")
    ndim = magic & 0xFF
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@SOURCES.register("fashion_mnist")
def fashion_mnist(
    split: str = "train",
    limit: Optional[int] = None,
    templates: Sequence[str] = FASHION_MNIST_TEMPLATES,
    root: Optional[str | os.PathLike] = None,
) -> Iterator[Sample]:
    """Fashion-MNIST photos (28x28 grayscale) captioned from their class: "a photo of a sneaker".

    Template ``i % len(templates)`` captions image ``i``, so captions vary deterministically. Meta holds
    ``label`` (0-9), ``label_name`` (the official class name), ``index`` and ``split``. The files are
    read when this function is called, so a missing dataset is reported before anything is written.
    """
    if split not in _IDX_FILES:
        raise ValueError(f"fashion_mnist split must be 'train' or 'test', got {split!r}")
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"templates must be a non-empty list of strings with a '{{}}' slot, got {list(templates)}")
    folder = fashion_mnist_dir(root)
    image_file, label_file = (folder / name for name in _IDX_FILES[split])
    if not image_file.is_file() or not label_file.is_file():
        raise ValueError(
            f"Fashion-MNIST not found in {folder} (need {image_file.name} and {label_file.name}); "
            f"install it with `apt-get install dataset-fashion-mnist` or set ${FASHION_MNIST_ENV}"
        )
    try:
        images = _read_idx(image_file, 0x00000803)
        labels = _read_idx(label_file, 0x00000801)
    except (OSError, EOFError, struct.error) as exc:
        raise ValueError(f"cannot read Fashion-MNIST from {folder}: {exc}") from None
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    count = len(images) if limit is None else min(limit, len(images))
    return _fashion_samples(images, labels, count, list(templates), split)


def _fashion_samples(images, labels, count, templates, split) -> Iterator[Sample]:
    for index in range(count):
        label = int(labels[index])
        caption = templates[index % len(templates)].format(FASHION_MNIST_PHRASES[label])
        meta = {"label": label, "label_name": FASHION_MNIST_CLASSES[label], "index": index, "split": split}
        image = Image.fromarray(images[index])  # 2-D uint8 gives a mode "L" image
        yield f"{split}-{index:05d}", image, caption, meta
