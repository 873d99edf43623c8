"""Writing paired image-caption shards, expanding shard patterns, and the cached built-in scene shards.

Layout (the one img2dataset and open_clip use): each shard is a plain tar whose members are grouped by
key, ``KEY.jpg`` (or png/webp), ``KEY.txt`` (caption, UTF-8) and ``KEY.json`` (meta), named
``{prefix}-000000.tar``, ``{prefix}-000001.tar``, ... Next to them, ``{prefix}-manifest.json`` records
counts, per-shard sizes and hashes, the source, the seed and a hash of the sorted keys.

Completion is explicit: each shard is written under a hidden temporary name and renamed when complete,
and the manifest is written (atomically, by rename) only after the last shard, so a folder without a
manifest is by definition unfinished. Tars are written with fixed mtime/uid/gid/mode, so the same
samples give byte-identical shards and manifests.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import uuid
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import braceexpand
import webdataset as wds
from PIL import Image

from prh_stitch.atomic import atomic_write_text

logger = logging.getLogger("prh_stitch.data")

MANIFEST_FORMAT = "prh_stitch-shards-v1"
JPEG_QUALITY = 95  # high enough that re-encoding artefacts do not dominate small synthetic shapes
# PIL save options per format, fixed so that the same pixels always give the same bytes.
IMAGE_FORMATS = {"jpg": {"format": "JPEG", "quality": JPEG_QUALITY}, "png": {"format": "PNG"},
                 "webp": {"format": "WEBP", "lossless": True}}
# Keys become file names inside the tar and are split from the extension at the first dot (the
# webdataset grouping rule), so they must not contain dots or slashes.
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,80}$")
_TAR_BLOCK = 512
_TAR_RECORD = tarfile.RECORDSIZE  # tarfile pads the archive to a multiple of this on close
_TAR_END = 2 * _TAR_BLOCK  # two zero blocks mark the end of an archive
_CLI_HINT = "check the path / run python -m prh_stitch.data write --source scenes --out DIR"


def keys_digest(keys: Iterable[str]) -> str:
    """SHA-256 of the sorted keys, one per line: the identity of a dataset's sample set.

    Shared by the manifest and by ``stream.scan`` so that a scan can be compared with what was written.
    """
    digest = hashlib.sha256()
    for key in sorted(keys):
        digest.update(key.encode("utf-8") + b"\n")
    return digest.hexdigest()


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def manifest_path(out_dir: str | Path, prefix: str) -> Path:
    return Path(out_dir) / f"{prefix}-manifest.json"


def shard_pattern(prefix: str, num_shards: int) -> str:
    """Brace pattern naming exactly the shards ``0 .. num_shards - 1`` (a plain name for one shard)."""
    if num_shards == 1:
        return shard_name(prefix, 0)
    return f"{prefix}-{{{0:06d}..{num_shards - 1:06d}}}.tar"


def _tar_member_bytes(size: int) -> int:
    return _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK


def _tar_file_bytes(payload: int) -> int:
    """Final size of an archive whose members take ``payload`` bytes (end marker + record padding)."""
    return -(-(payload + _TAR_END) // _TAR_RECORD) * _TAR_RECORD


def encode_image(image: Image.Image, image_format: str) -> bytes:
    """Encode with fixed settings so the same pixels always give the same bytes."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}")
    if image_format == "jpg" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")  # JPEG has no alpha or palette
    buffer = io.BytesIO()
    image.save(buffer, **IMAGE_FORMATS[image_format])
    return buffer.getvalue()


class ShardWriter:
    """Incremental writer of one shard series; ``write_shards`` is a loop around it.

    Use as a context manager: leaving the block normally finishes (``close``), leaving it with an
    exception removes everything this writer wrote (``abort``), so a failed run leaves nothing that
    could be mistaken for data. A single sample larger than ``max_shard_bytes`` gets a shard of its own
    (with a warning) rather than being dropped.
    """

    def __init__(
        self,
        out_dir: str | Path,
        prefix: str = "shard",
        samples_per_shard: int = 1000,
        max_shard_bytes: Optional[int] = None,
        source: str = "unknown",
        seed: Optional[int] = None,
        image_format: str = "jpg",
        overwrite: bool = False,
        info: Optional[Mapping[str, Any]] = None,
    ) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        if max_shard_bytes is not None and max_shard_bytes < _TAR_RECORD:
            raise ValueError(f"max_shard_bytes must be at least {_TAR_RECORD} (one tar record), got {max_shard_bytes}")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}")
        if not KEY_PATTERN.match(prefix):
            raise ValueError(f"prefix must match {KEY_PATTERN.pattern}, got {prefix!r}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.max_shard_bytes = max_shard_bytes
        self.source = source
        self.seed = seed
        self.image_format = image_format
        self.info = dict(info or {})

        existing = sorted(glob.glob(str(self.out_dir / f"{glob.escape(prefix)}-*.tar")))
        manifest = manifest_path(self.out_dir, prefix)
        if (existing or manifest.exists()) and not overwrite:
            raise ValueError(
                f"{self.out_dir} already holds '{prefix}' shards ({len(existing)} tar files"
                f"{', a manifest' if manifest.exists() else ''}); choose another folder or replace them (overwrite=True, --overwrite)"
            )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if manifest.exists():
            # Unmark the old series first: from here on the folder is "unfinished" until we write ours.
            manifest.unlink()
        self._stale = existing  # old shards, removed once the new series is complete

        self._keys: set = set()
        self._shards: List[dict] = []
        self._written: List[Path] = []
        self._tar: Optional[wds.TarWriter] = None
        self._tmp_path: Optional[Path] = None
        self._count = 0
        self._payload = 0
        self._closed = False
        self.manifest: Optional[dict] = None

    @property
    def num_samples(self) -> int:
        return len(self._keys)

    # -- writing ---------------------------------------------------------------------------------
    def add(self, key: str, image: Image.Image, caption: str, meta: Optional[Mapping[str, Any]] = None) -> None:
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if not isinstance(key, str) or not KEY_PATTERN.match(key):
            raise ValueError(f"sample key {key!r} must match {KEY_PATTERN.pattern} (it becomes a tar member name)")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}: keys must be unique within a shard series")
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"sample {key!r} has an empty caption")
        if not isinstance(image, Image.Image):
            raise ValueError(f"sample {key!r}: image must be a PIL image, got {type(image).__name__}")
        try:
            meta_bytes = json.dumps(dict(meta or {}), sort_keys=True, ensure_ascii=False).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"sample {key!r}: meta is not JSON-serialisable ({exc})") from None
        members = [
            (f"{key}.{self.image_format}", encode_image(image, self.image_format)),
            (f"{key}.txt", caption.encode("utf-8")),
            (f"{key}.json", meta_bytes),
        ]
        sample_bytes = sum(_tar_member_bytes(len(data)) for _, data in members)

        if self._tar is not None and (
            self._count >= self.samples_per_shard
            or (
                self.max_shard_bytes is not None
                and _tar_file_bytes(self._payload + sample_bytes) > self.max_shard_bytes
            )
        ):
            self._finish_shard()
        if self._tar is None:
            self._open_shard()
        if self.max_shard_bytes is not None and _tar_file_bytes(sample_bytes) > self.max_shard_bytes:
            logger.warning(
                "sample %s alone takes %d bytes > max_shard_bytes=%d; it gets a shard of its own",
                key, _tar_file_bytes(sample_bytes), self.max_shard_bytes,
            )
        self._tar.write({"__key__": key, **{name.split(".", 1)[1]: data for name, data in members}})
        self._keys.add(key)
        self._count += 1
        self._payload += sample_bytes

    def _open_shard(self) -> None:
        name = shard_name(self.prefix, len(self._shards))
        # Hidden temporary name: globs like "train-*.tar" never pick up a shard that is being written.
        self._tmp_path = self.out_dir / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        self._file = open(self._tmp_path, "wb")
        # Fixed metadata (mtime, owner, mode): the same samples give byte-identical shards.
        self._tar = wds.TarWriter(self._file, user="", group="", mode=0o644, mtime=0, encoder=False)
        self._count = 0
        self._payload = 0

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._tmp_path is not None
        self._tar.close()
        self._file.close()
        name = shard_name(self.prefix, len(self._shards))
        final = self.out_dir / name
        os.replace(self._tmp_path, final)
        self._written.append(final)
        self._tar, self._tmp_path = None, None
        digest = hashlib.sha256()
        with open(final, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        self._shards.append(
            {"name": name, "num_samples": self._count, "bytes": final.stat().st_size, "sha256": digest.hexdigest()}
        )

    def close(self) -> dict:
        """Finish the last shard, remove stale shards of an overwritten series, write the manifest."""
        if self._closed:
            assert self.manifest is not None
            return self.manifest
        if not self._keys:
            self.abort()
            raise ValueError(f"no samples to write for '{self.prefix}' (the source produced nothing)")
        if self._tar is not None:
            self._finish_shard()
        written = {p.name for p in self._written}
        for old in self._stale:
            if Path(old).name not in written:
                Path(old).unlink(missing_ok=True)
        self.manifest = {
            "format": MANIFEST_FORMAT,
            "prefix": self.prefix,
            "source": self.source,
            "seed": self.seed,
            "image_format": self.image_format,
            "num_samples": len(self._keys),
            "num_shards": len(self._shards),
            "samples_per_shard": self.samples_per_shard,
            "max_shard_bytes": self.max_shard_bytes,
            "pattern": shard_pattern(self.prefix, len(self._shards)),
            "shards": self._shards,
            # The wids index of the series (webdataset's indexed reader opens the manifest as it is).
            "wids_version": 1,
            "shardlist": [{"url": shard["name"], "nsamples": shard["num_samples"]} for shard in self._shards],
            "keys_sha256": keys_digest(self._keys),
            "info": self.info,
        }
        atomic_write_text(manifest_path(self.out_dir, self.prefix), json.dumps(self.manifest, indent=2, sort_keys=True) + "\n")
        self._closed = True
        return self.manifest

    def abort(self) -> None:
        """Remove the shard in progress and every shard this writer completed; write no manifest."""
        if self._tar is not None:
            with contextlib.suppress(Exception):  # else tarfile's __del__ writes into the closed file later
                self._tar.close()
            self._file.close()
        if self._tmp_path is not None:
            self._tmp_path.unlink(missing_ok=True)
        for path in self._written:
            path.unlink(missing_ok=True)
        self._tar, self._tmp_path, self._written = None, None, []
        self._closed = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


def write_shards(samples: Iterable[Tuple[str, Image.Image, str, Mapping[str, Any]]], out_dir: str | Path,
                 **options: Any) -> dict:
    """Write ``(key, image, caption, meta)`` samples as shards under ``out_dir``; return the manifest.

    ``options`` are ``ShardWriter``'s (prefix, samples_per_shard, max_shard_bytes, source, seed, image_format,
    overwrite, info). Raises ValueError on a duplicate or malformed key, an empty caption, an existing series with
    the same prefix (unless ``overwrite``), or no samples; on any error nothing of this call remains on disk.
    """
    with ShardWriter(out_dir, **options) as writer:
        for key, image, caption, meta in samples:
            writer.add(key, image, caption, meta)
        return writer.close()


# -- reading side: which shards does a pattern name ---------------------------------------------------

def _split_top_level(text: str) -> List[str]:
    """Split on commas outside braces, so "a-{0,1}.tar,b.tar" is two patterns, not three."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth = depth + 1 if char == "{" else max(0, depth - 1) if char == "}" else depth
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def _split_patterns(pattern: str | Sequence[str]) -> List[str]:
    if not isinstance(pattern, (str, os.PathLike)):
        return [piece for item in pattern for piece in _split_patterns(item)]
    pieces = [piece.strip() for chunk in str(pattern).split("::") for piece in _split_top_level(chunk)]
    return [piece for piece in pieces if piece]


def expand_urls(pattern: str | Sequence[str]) -> List[str]:
    """Shard URLs named by ``pattern``, in order.

    Accepts brace ranges (``shards/train-{000000..000123}.tar``), globs (``shards/*.tar``), a folder
    (all ``*.tar`` in it), ``file:`` paths, ``pipe:COMMAND`` and remote URLs (``https://...``, anything
    ``webdataset.gopen`` opens; brace-expanded, then passed through), and several patterns in a list or
    joined by ``,`` or ``::``. Local paths are checked: a pattern that names nothing, or names files that
    do not exist, raises ValueError saying so.
    """
    pieces = _split_patterns(pattern)
    if not pieces:
        raise ValueError(f"no shards match {pattern!r}: the pattern is empty ({_CLI_HINT})")
    urls: List[str] = []
    for piece in pieces:
        if piece.startswith("file:"):
            piece = piece[len("file:"):]
            if piece.startswith("//"):
                piece = piece[2:]
        elif piece.startswith("pipe:") or re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", piece):
            urls.extend(braceexpand.braceexpand(piece))  # read through gopen; nothing to check here
            continue
        matched, missing = [], []
        for path in braceexpand.braceexpand(os.path.expanduser(piece)):
            if glob.has_magic(path):
                matched.extend(sorted(p for p in glob.glob(path) if os.path.isfile(p)))
            elif os.path.isdir(path):
                matched.extend(sorted(glob.glob(os.path.join(glob.escape(path), "*.tar"))))
            elif os.path.isfile(path):
                matched.append(path)
            else:
                missing.append(path)
        if missing and matched:
            raise ValueError(
                f"{len(missing)} shard(s) named by {piece!r} do not exist, e.g. {missing[0]!r} ({_CLI_HINT})"
            )
        if not matched:
            raise ValueError(f"no shards match {piece!r} ({_CLI_HINT})")
        urls.extend(matched)
    unique = list(dict.fromkeys(urls))
    if len(unique) != len(urls):
        # Overlapping patterns would deliver those samples twice per epoch.
        logger.warning("%d shard(s) named more than once in %r; each is read once", len(urls) - len(unique), pattern)
    return unique


def manifest_records(urls: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """``{url: its shard record}`` (samples, bytes, SHA-256) of the local shards a manifest next to them lists."""
    records: Dict[str, Dict[str, Any]] = {}
    for folder in {os.path.dirname(url) for url in urls if "://" not in url and not url.startswith("pipe:")}:
        for path in glob.glob(os.path.join(glob.escape(folder or "."), "*-manifest.json")):
            for shard in (_read_manifest(Path(path)) or {}).get("shards", []):
                records[os.path.join(folder, shard["name"])] = shard
    return records


def samples_per_shard(urls: Sequence[str]) -> Optional[List[int]]:
    """Samples in each shard, from the manifests next to them; None unless every shard is in one."""
    records = manifest_records(urls)
    return [records[url]["num_samples"] for url in urls] if all(url in records for url in urls) else None


# -- the cached built-in scene dataset ----------------------------------------------------------------

def _read_manifest(path: Path) -> Optional[dict]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else None


def ensure_scene_shards(
    root: str | Path,
    n_train: int,
    n_val: int,
    seed: int = 0,
    size: int = 224,
    samples_per_shard: int = 500,
) -> Tuple[str, str]:
    """``(train_pattern, val_pattern)`` of :func:`ensure_scene_splits` with a train and a val series only."""
    patterns = ensure_scene_splits(root, {"train": n_train, "val": n_val}, seed, size, samples_per_shard)
    return patterns["train"], patterns["val"]


def ensure_scene_splits(
    root: str | Path,
    counts: Dict[str, int],
    seed: int = 0,
    size: int = 224,
    samples_per_shard: int = 500,
) -> Dict[str, str]:
    """Write the built-in scenes once under ``root``; return ``{split: pattern}`` for ``counts`` (split -> n).

    The folder ``root/scenes-v{version}-{n_train}-{n_val}[-{n_test}]-s{seed}-{size}px/`` (other choices of splits:
    ``...-train{n}-test{n}-...``, each count tagged with its split) is built in a hidden
    temporary sibling and renamed into place only when every series and its manifest is written, so a crash
    never leaves a folder that looks complete; a later call simply starts again. The splits come from disjoint
    seed streams, and the training split holds out some combinations (see ``sources.scenes``). When two
    processes race, the first rename wins and the other discards its copy.
    """
    from prh_stitch.data.scenes import SCENES_VERSION
    from prh_stitch.data.sources import SCENE_SPLITS, scenes  # sources imports this module

    splits = [split for split in SCENE_SPLITS if split in counts]
    if set(counts) != set(splits) or any(counts[split] < 1 for split in splits):
        raise ValueError(f"scene counts must be >= 1 and name splits of {sorted(SCENE_SPLITS)}, got {dict(counts)}")
    root = Path(root).expanduser()
    # train+val(+test) keep their historical count-only names; any other choice of splits names each count's
    # split, so e.g. {train, test} and {train, val} of equal sizes never share (and rebuild) one folder.
    tagged = splits[:2] != ["train", "val"]
    name = "-".join(f"{s}{counts[s]}" if tagged else str(counts[s]) for s in splits)
    folder = root / f"scenes-v{SCENES_VERSION}-{name}-s{seed}-{size}px"

    def patterns() -> Optional[Dict[str, str]]:
        found = {}
        for prefix in splits:
            manifest = _read_manifest(manifest_path(folder, prefix))
            if manifest is None:
                return None
            found[prefix] = str(folder / manifest["pattern"])
        return found

    if folder.exists():
        ready = patterns()
        if ready is not None:
            return ready
        # Only a rename of a finished temp folder creates this path, so an unfinished one was made by
        # something else (a manual copy, an older version); rebuild rather than trust it.
        logger.warning("%s exists without complete manifests; rebuilding it", folder)
        shutil.rmtree(folder)

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        for split in splits:
            write_shards(
                scenes(counts[split], seed=seed, size=size, split=split), tmp, prefix=split,
                samples_per_shard=samples_per_shard, source="scenes", seed=seed,
                info={"n": counts[split], "size": size, "split": split},
            )
        try:
            os.rename(tmp, folder)
        except OSError:
            if patterns() is None:  # not a lost race: a real failure
                raise
            logger.info("another process finished %s first; using its copy", folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    ready = patterns()
    assert ready is not None, f"{folder} lacks manifests right after writing it"
    return ready
