"""The raw data layer: built-in scenes, shard writing, robust shard streaming, sample sources.

``python -m prh_stitch.data write|check`` is the command-line entry point (see :mod:`prh_stitch.cli.data`).
"""

from prh_stitch.data.scenes import generate_scene
from prh_stitch.data.shards import ShardWriter, ensure_scene_shards, expand_urls, keys_digest, write_shards
from prh_stitch.data.sources import SOURCES
from prh_stitch.data.stream import PairedShards, SkipStats, scan

__all__ = [
    "SOURCES",
    "PairedShards",
    "ShardWriter",
    "SkipStats",
    "ensure_scene_shards",
    "expand_urls",
    "generate_scene",
    "keys_digest",
    "scan",
    "write_shards",
]
