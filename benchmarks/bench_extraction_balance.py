"""Benchmark: how evenly feature extraction spreads its units over the consumers (ranks x DataLoader workers).

An extraction ends when its busiest consumer does, so the figure that matters is the busy fraction: mean work /
largest work (1.0: nobody idles). Two rules are compared on the same layouts:

* round robin: units of ``chunk_size`` (1,024) dealt round robin, whole shards when there are at least as many
  as consumers (what shards without manifests get);
* before: round robin with the manifests' counts, units shrunk only until every consumer had one (the store's
  rule until this benchmark was written: it left e.g. 5 of 12 workers with two units and 7 with one);
* contiguous: the manifests' counts give units of at most an eighth of a share, dealt in contiguous runs of
  equal work (``split.contiguous_owner``; what the store does when the manifests give the counts).

1. The busy fraction of both rules, computed for typical layouts (exact, no timing).
2. Timed: ``FeatureStore.get`` with 2 workers on 3 equal shards of 224-px scenes, the same shards with and
   without their manifest, the encoder's forward replaced by zeros so that the data path is what is timed
   (best of 3 each, alternating). Round robin gives one worker two shards and the other one.

    python benchmarks/bench_extraction_balance.py
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

from prh_stitch.data.features import FeatureStore
from prh_stitch.data.shards import expand_urls, write_shards
from prh_stitch.data.sources import scenes
from prh_stitch.data.split import contiguous_owner, owner, split_mode, unit_size
from prh_stitch.encoders import build_encoder

CHUNK = 1024


def before_size(counts, consumers):
    """The unit size of the rule this replaced: the chunk, unless that gave fewer units than consumers."""
    if sum(-(-n // CHUNK) for n in counts) >= consumers:
        return CHUNK
    return max(1, min(CHUNK, sum(counts) // consumers))


def round_robin_loads(counts, consumers, size=CHUNK):
    by_shard = split_mode("auto", len(counts), consumers) == "shard"
    load, unit = [0] * consumers, 0
    for shard, n in enumerate(counts):
        for block in range(max(1, -(-n // size))):
            load[owner(shard if by_shard else unit, consumers)] += min(size, n - block * size)
            unit += 1
    return load


def contiguous_loads(counts, consumers, batch_size=64):
    size = unit_size(CHUNK, counts, consumers, batch_size)
    units = [min(size, n - b * size) for n in counts for b in range(max(1, -(-n // size)))]
    load, start, total = [0] * consumers, 0, sum(units)
    for n in units:
        load[contiguous_owner(start, n, total, consumers)] += n
        start += n
    return load


def busy(load) -> float:
    return sum(load) / len(load) / max(load)


def layouts():
    scenes_4096 = [500] * 8 + [96]
    return {"4,096 scenes, shards of 500": scenes_4096, "6,144 scenes, shards of 500": [500] * 12 + [144],
            "20,000 pairs, shards of 1,000": [1000] * 20, "100,000 pairs, shards of 10,000": [10000] * 10,
            "3 shards of 200": [200] * 3}


def main() -> None:
    print("1. busy fraction (mean work / largest work) of the consumers, round robin / before / contiguous; batch 64")
    consumers = (2, 8, 12, 16, 32)
    print(f"   {'layout':<34}" + "".join(f"{c:>19}" for c in consumers))
    for name, counts in layouts().items():
        cells = [f"{busy(round_robin_loads(counts, c)):.2f} / {busy(round_robin_loads(counts, c, before_size(counts, c))):.2f}"
                 f" / {busy(contiguous_loads(counts, c)):.2f}" for c in consumers]
        print(f"   {name:<34}" + "".join(f"{cell:>19}" for cell in cells))

    print("\n2. FeatureStore.get, 2 workers, 3 shards of 200 scenes (224 px), forward replaced by zeros, best of 3")
    torch.set_num_threads(1)
    encoder = build_encoder("efficientnet_lite0")
    encoder.encode = lambda inputs, layers, pooling=None: [torch.zeros(len(inputs), 1280) for _ in layers]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_shards(scenes(600, seed=1, size=224), root / "with", prefix="x", samples_per_shard=200)
        shutil.copytree(root / "with", root / "without")
        (root / "without" / "x-manifest.json").unlink()
        best = {"without": float("inf"), "with": float("inf")}
        units = {}
        for round_ in range(3):
            for name in best:
                urls = expand_urls(str(root / name / "x-*.tar"))
                store = FeatureStore(root / f"store-{name}-{round_}")
                start = time.perf_counter()
                features = store.get(encoder, urls, batch_size=32, num_workers=2, progress=False)
                best[name] = min(best[name], time.perf_counter() - start)
                units[name] = features.info["chunks"]
                assert len(features) == 600
    for name, label in (("without", "round robin (no manifest)"), ("with", "contiguous (manifest)")):
        print(f"   {label:<28} {600 / best[name]:7.0f} images/s  ({best[name]:.2f} s, {units[name]} units)")
    print(f"   contiguous / round robin: {best['without'] / best['with']:.2f}x "
          f"(the busy fractions above predict {1 / busy(round_robin_loads([200] * 3, 2)):.2f}x with 2 free cores)")


if __name__ == "__main__":
    main()
