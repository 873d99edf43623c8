"""Benchmark: the data path against bare loops doing the same work, on the same shards, in the same run.

1. Decoding: a bare loop (``tarfile`` + ``PIL``: decode, resize, uint8 array) against the webdataset pipeline
   (``StreamingDataModule``: the same work plus batching into one uint8 tensor) with 0, 1 and 2 DataLoader workers.
   Target: the pipeline with 2 workers >= 0.9 x the bare loop.
2. Extraction: ``FeatureStore.get`` (what training and ``python -m prh_stitch.data extract`` run) against the
   encoder's forward alone on pre-made batches, and against a bare end-to-end loop (read, decode, the encoder's
   preprocessing, ``model``). Target: extraction >= 0.95 x the bare forward. The features must agree.
3. Training from the store: a linear stitcher trained by the real thing (Lightning ``Trainer.fit`` of
   ``StitchingModule`` on ``StitchingDataModule``, features memory-mapped from the store) and by a plain
   torch loop over the same store tensors (same stitcher, loss, optimiser, batch size), in samples/s.
   Target: >= 20,000 samples/s. The store entries hold synthetic features of the real encoders' widths
   (1280 -> 384): extracting 16k real images would take most of an hour on this CPU, and training reads
   the rows the same way whatever is in them.

    python benchmarks/bench_data.py            # 4096 scenes for decoding, efficientnet_lite0 on 512 more

Sizes: a pass over the data pays a few constants that do not grow with it (starting or resuming workers,
filling the pipeline before the first batch, ~0.1 s here, printed on their own); the default sizes keep them
to a few percent, as they are in real epochs and extractions, which are far longer.
    python benchmarks/bench_data.py --quick    # fewer images, tiny_vit: a smoke test in well under a minute

Timings on a shared CPU are noisy; each line compares against a baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from prh_stitch.data.datamodule import StitchingDataModule, StreamingDataModule
from prh_stitch.data.features import DEFAULT_CHUNK_SIZE, FeatureStore, UnitDone
from prh_stitch.data.shards import expand_urls, write_shards
from prh_stitch.data.stream import PairedShards
from prh_stitch.data.sources import scenes
from prh_stitch.data.store_entry import commit_entry, entry_name, open_entry, write_part
from prh_stitch.encoders import build_encoder

TARGETS = {"pipeline_2_workers": 0.9, "extraction_vs_forward": 0.95, "training_samples_per_s": 20_000}
IMAGE_SIZE = 224  # the pipeline and the bare loop both resize to this square


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def line(name: str, value: str, note: str = "") -> None:
    print(f"  {name:<44} {value:>16}  {note}")


# ----------------------------------------------------------------------------------------------- 1. decoding


def bare_samples(urls):
    """The simplest correct reader: members grouped by key, image decoded to RGB, caption to str."""
    for url in urls:
        with tarfile.open(url, "r|") as tar:
            key, files = None, {}
            for info in tar:
                if not info.isreg():
                    continue
                member_key, ext = info.name.split(".", 1)
                if member_key != key and files:
                    yield key, files
                    files = {}
                key = member_key
                files[ext] = tar.extractfile(info).read()
            if files:
                yield key, files


def bare_decode(urls, pixels: bool = True) -> int:
    """Image to RGB, caption and meta decoded, as the pipeline delivers them; ``pixels``: also resized, as an array."""
    count = 0
    for _, files in bare_samples(urls):
        image = Image.open(io.BytesIO(files["jpg"])).convert("RGB")
        if pixels:
            if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
            np.asarray(image)  # the pipeline hands over pixels (uint8 tensors), not PIL objects
        files["txt"].decode("utf-8")
        json.loads(files["json"])
        count += 1
    return count


def reader(urls) -> int:
    """The shard reader the pipeline is built on (``stream.PairedShards``), pixels taken out as above."""
    count = 0
    for sample in PairedShards(urls):
        np.asarray(sample["image"])
        count += 1
    return count


class Pipeline:
    """One StreamingDataModule loader (the webdataset pipeline: decode, resize to uint8, batch), passed over again
    and again, as a training run does epoch after epoch.

    Its workers persist between passes, so the first pass also pays for starting them (``first_pass``, in
    seconds) and later passes measure the pipeline itself.
    """

    def __init__(self, pattern: str, workers: int) -> None:
        self.dm = StreamingDataModule(train=pattern, batch_size=64, num_workers=workers, shuffle_buffer=0,
                                      image_size=IMAGE_SIZE)
        self.loader = self.dm.train_dataloader()
        self.first_pass = None

    def __call__(self) -> int:
        start = time.perf_counter()
        count = sum(len(batch["key"]) for batch in self.loader)
        if self.first_pass is None:
            self.first_pass = time.perf_counter() - start
        return count


def pipeline(pattern: str, workers: int) -> int:
    return Pipeline(pattern, workers)()


def best_rates(runs: dict, n: int, rounds: int) -> dict:
    """Samples/s of each run, best of ``rounds`` interleaved rounds (other users' load comes and goes)."""
    best = {name: 0.0 for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            count, seconds = timed(fn)
            assert count == n, (name, count, n)
            best[name] = max(best[name], count / seconds)
    return best


def bench_decoding(pattern: str, urls, rounds: int, worker_counts=(0, 1, 2)) -> dict:
    print(f"\n1. decoding (samples/s, best of {rounds} passes; the pipeline's loaders keep their workers "
          "between passes, as over a training run's epochs)")
    n = pipeline(pattern, 0)  # also warms the page cache and the imports
    runs = {"bare_pil": lambda: bare_decode(urls, pixels=False), "bare": lambda: bare_decode(urls),
            "reader": lambda: reader(urls)}
    pipelines = {w: Pipeline(pattern, w) for w in worker_counts}
    runs.update({f"pipeline_{w}": pipelines[w] for w in worker_counts})
    rates = best_rates(runs, n, rounds)
    line("bare loop: tarfile + PIL, PIL images out", f"{rates['bare_pil']:,.0f}")
    line("bare loop: ... + resize, uint8 arrays (baseline)", f"{rates['bare']:,.0f}")
    line("PairedShards alone (the reader under it all)", f"{rates['reader']:,.0f}",
         f"{rates['reader'] / rates['bare']:.2f}x baseline")
    cores = os.cpu_count() or 1
    for workers in worker_counts:
        rate = rates[f"pipeline_{workers}"]
        note = f"{rate / rates['bare']:.2f}x baseline"
        if workers == 2:
            note += f" (target >= {TARGETS['pipeline_2_workers']})"
        if workers + 1 > cores:
            # The main process needs CPU too (it receives and hands out the batches): with more processes than
            # cores, the workers cannot all run flat out, so the per-worker figure also measures the core count.
            note += f"; {workers} workers + the main process on {cores} cores"
        line(f"webdataset pipeline, {workers} worker(s)", f"{rate:,.0f}", note)
        rates[f"pipeline_{workers}_first_pass_s"] = pipelines[workers].first_pass
    starts = ", ".join(f"{w} worker(s) {pipelines[w].first_pass - n / rates[f'pipeline_{w}']:+.3f} s"
                       for w in worker_counts if w > 0)
    print(f"  first pass (workers starting) against a later one: {starts}")
    for p in pipelines.values():
        del p.loader  # stops the persistent workers
    return rates


# --------------------------------------------------------------------------------------------- 2. extraction


def timm_transform(encoder):
    """timm's own eval transform for the model (PIL -> normalised float tensor), as a user's loop would use it."""
    import timm

    return timm.data.create_transform(**timm.data.resolve_data_config({}, model=encoder.model), is_training=False)


def bare_extraction(encoder, urls, batch_size: int):
    """Read, decode, preprocess, run the model: the same work as the store, written out by hand."""
    model, transform = encoder.model, timm_transform(encoder)
    keys, rows, batch = [], [], []

    def run(images):
        x = torch.stack(images).to(memory_format=torch.channels_last)
        with torch.inference_mode():
            return model.forward_head(model.forward_features(x), pre_logits=True)

    for key, files in bare_samples(urls):
        batch.append(transform(Image.open(io.BytesIO(files["jpg"])).convert("RGB")))
        keys.append(key)
        if len(batch) == batch_size:
            rows.append(run(batch))
            batch = []
    if batch:
        rows.append(run(batch))
    return keys, torch.cat(rows)


def model_only(encoder, urls, batch_size: int):
    """A function timing the model alone on pre-made batches (the floor no pipeline can beat)."""
    transform = timm_transform(encoder)
    images = [transform(Image.open(io.BytesIO(files["jpg"])).convert("RGB")) for _, files in bare_samples(urls)]
    batches = [torch.stack(images[i:i + batch_size]).to(memory_format=torch.channels_last)
               for i in range(0, len(images), batch_size)]
    model = encoder.model

    def run():
        with torch.inference_mode():
            for x in batches:
                model.forward_head(model.forward_features(x), pre_logits=True)
        return len(images)

    return run


def bench_extraction(encoder, limit: int, batch_size: int, root: Path, rounds: int) -> dict:
    # One compute thread: a two-thread op runs at the pace of its slower thread, so on two shared cores one
    # busy neighbour made the same call swing between 13 and 44 images/s; one thread measures the overhead,
    # which is what is compared here, far more steadily (and leaves a core to a DataLoader worker).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _bench_extraction(encoder, limit, batch_size, root, rounds)
    finally:
        torch.set_num_threads(threads)


def _bench_extraction(encoder, limit: int, batch_size: int, root: Path, rounds: int) -> dict:
    print(f"\n2. extraction: {encoder.name}, {limit} images, batch {batch_size}, 1 compute thread "
          f"(images/s, best of {rounds})")
    per_shard = max(batch_size, limit // 2)  # two or more shards, each a whole number of batches
    manifest = write_shards(scenes(limit, seed=1, size=224), root / "extract", prefix="x",
                            samples_per_shard=per_shard, image_format="jpg")
    subset = expand_urls(str(root / "extract" / manifest["pattern"]))
    keys, bare_rows = bare_extraction(encoder, subset, batch_size)  # also the warm-up (first-call kernel choice)
    stores = iter(range(1_000_000))
    stored = {}

    def store_run(workers: int):
        store = FeatureStore(root / f"store-{next(stores)}", chunk_size=DEFAULT_CHUNK_SIZE)
        features = store.get(encoder, subset, batch_size=batch_size, num_workers=workers, progress=False)
        stored[workers] = features
        return len(features)

    runs = {"model_only": model_only(encoder, subset, batch_size),
            "bare": lambda: len(bare_extraction(encoder, subset, batch_size)[0]),
            "store_0": lambda: store_run(0), "store_1": lambda: store_run(1)}
    rates = best_rates(runs, limit, rounds)
    line("model alone on pre-made batches", f"{rates['model_only']:,.1f}")
    line("bare loop: read + decode + preprocess + model", f"{rates['bare']:,.1f}",
         f"(decoding and preprocessing: {1 - rates['bare'] / rates['model_only']:.0%} of its time)")
    for workers in (0, 1):
        features = stored[workers]
        order = {k: i for i, k in enumerate(features.keys)}
        diff = float((features.features["pre_logits"][[order[k] for k in keys]] - bare_rows).abs().max())
        rate = rates[f"store_{workers}"]
        line(f"FeatureStore.get, {workers} worker(s)", f"{rate:,.1f}",
             f"{rate / rates['model_only']:.2f}x the forward alone (target >= {TARGETS['extraction_vs_forward']}), "
             f"{rate / rates['bare']:.2f}x the bare loop; max |diff| {diff:.1e}")
    return rates


# ---------------------------------------------------------------------------------------------- 3. training


def synthetic_entry(store: FeatureStore, encoder, layer: int, pooling, urls, n: int, dim: int, seed: int) -> None:
    """A store entry under the identity ``store.get`` looks up, holding synthetic rows of the real width."""
    identity = store.identity(encoder, [layer], pooling, urls)
    entry = store.root / entry_name(identity)
    open_entry(entry, identity, store.chunk_size)
    (entry / "parts").mkdir(exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, 64, generator=generator)  # both sides see this signal, so the stitcher can learn
    mix = torch.randn(64, dim, generator=torch.Generator().manual_seed(seed + 1))
    rows = shared @ mix + 0.5 * torch.randn(n, dim, generator=generator)
    name = identity["layers"][0]
    for block, start in enumerate(range(0, n, DEFAULT_CHUNK_SIZE)):
        stop = min(n, start + DEFAULT_CHUNK_SIZE)
        samples = [{"key": f"{i:08d}", "caption": f"pair {i}", "label": -1} for i in range(start, stop)]
        done = UnitDone(0, block, urls[0], stop - start, stop == n, stop - start, {})
        write_part(entry, done, samples, [[r] for r in rows[start:stop]], [name], encoder.name, store.dtype)
    commit_entry(entry)


def bench_training(root: Path, n_train: int, batch_size: int, epochs: int) -> dict:
    import pytorch_lightning as pl

    from prh_stitch.encoders import EncoderSpec
    from prh_stitch.module import StitchingModule

    print(f"\n3. training a linear stitcher from the store: {n_train} pairs, 1280 -> 384, batch {batch_size} (samples/s)")
    shards = {}
    for split in ("train", "val"):  # the entries are keyed by these (placeholder) shards' identity
        shards[split] = root / f"{split}.tar"
        with tarfile.open(shards[split], "w"):
            pass
    module = StitchingModule(source=EncoderSpec("efficientnet_lite0"), target=EncoderSpec("minilm_l6", pooling="mean"))
    dm = StitchingDataModule(train=str(shards["train"]), val=str(shards["val"]), cache_dir=str(root), batch_size=batch_size)
    for split, n in (("train", n_train), ("val", 1024)):
        urls = [str(shards[split])]
        synthetic_entry(dm.store, module.source_encoder, -1, None, urls, n, 1280, seed=1)
        synthetic_entry(dm.store, module.target_encoder, -1, "mean", urls, n, 384, seed=1)

    class EpochTimer(pl.Callback):
        def __init__(self):
            self.seconds = []

        def on_train_epoch_start(self, trainer, pl_module):
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            self.seconds.append(time.perf_counter() - self.start)

    loader = dm.train_dataloader
    out = {}
    default_threads = torch.get_num_threads()
    # Both thread counts: on two cores shared with other work, a two-thread matmul runs at the pace of its
    # slower thread, and one thread was measured 2-3x faster under a busy neighbour (and ~20% slower without).
    for threads in sorted({default_threads, 1}, reverse=True):
        torch.set_num_threads(threads)
        try:
            timer = EpochTimer()
            trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                                 enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                 limit_val_batches=0, callbacks=[timer], log_every_n_steps=50)
            trainer.fit(module, datamodule=dm)
            assert dm.store.extractions == 0, "the synthetic entries were not found"
            lightning = n_train / min(timer.seconds[1:] or timer.seconds)  # best epoch after the first (warm-up)
            plain = n_train / plain_epoch(module, loader(), epochs)
        finally:
            torch.set_num_threads(default_threads)
        line(f"Lightning Trainer.fit (StitchingModule), {threads} thr", f"{lightning:,.0f}",
             f"(target >= {TARGETS['training_samples_per_s']:,})")
        line(f"plain torch loop, same tensors/batches, {threads} thr", f"{plain:,.0f}",
             f"(Lightning runs at {lightning / plain:.0%} of it)")
        out[f"lightning_{threads}"], out[f"plain_{threads}"] = lightning, plain

    def read_only():
        for _ in loader():
            pass

    seconds = min(timed(read_only)[1] for _ in range(3))
    line("reading the batches alone (store -> batch)", f"{n_train / seconds:,.0f}")
    out["read_only"] = n_train / seconds
    return out


def plain_epoch(module, loader, epochs: int) -> float:
    """Best epoch time of the same work as ``training_step`` in a plain loop (same stitcher, loss, batches)."""
    from prh_stitch.losses import build_loss

    stitcher = module.stitcher
    loss = build_loss("contrastive")
    optimizer = torch.optim.AdamW(list(stitcher.parameters()) + list(loss.parameters()), lr=1e-3)
    best = float("inf")
    for _ in range(epochs):
        start = time.perf_counter()
        for source, target, _, _ in loader:
            value = loss(stitcher(source), target)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
        best = min(best, time.perf_counter() - start)
    return best


# -------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: fewer images, tiny_vit")
    parser.add_argument("--images", type=int, default=None, help="scenes written for decoding (default 4096, quick 256)")
    parser.add_argument("--extract", type=int, default=None, help="images encoded (default 512, quick 64)")
    parser.add_argument("--encoder", default=None, help="default efficientnet_lite0, quick tiny_vit")
    parser.add_argument("--train-pairs", type=int, default=None, help="default 16384, quick 8192")
    parser.add_argument("--batch-size", type=int, default=256, help="stitcher training batch size")
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--workers", default="0,1,2", help="DataLoader worker counts of the decoding part (default 0,1,2)")
    parser.add_argument("--parts", default="decoding,extraction,training", help="which parts to run (comma-separated)")
    args = parser.parse_args(argv)
    quick = args.quick
    images = args.images or (256 if quick else 4096)
    limit = args.extract or (64 if quick else 512)
    encoder_name = args.encoder or ("tiny_vit" if quick else "efficientnet_lite0")
    train_pairs = args.train_pairs or (8192 if quick else 16384)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f} at start")
    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_data-") as tmp:
        root = Path(tmp)
        manifest = write_shards(scenes(images, seed=0, size=224), root / "shards", prefix="train",
                                samples_per_shard=256, image_format="jpg")
        pattern = str(root / "shards" / manifest["pattern"])
        urls = expand_urls(pattern)
        print(f"shards: {images} scenes at 224 px, JPEG, {len(urls)} shards")
        parts = set(args.parts.split(","))
        if "decoding" in parts:
            workers = tuple(int(w) for w in args.workers.split(","))
            results["decoding"] = bench_decoding(pattern, urls, rounds=2 if quick else 3, worker_counts=workers)
        if "extraction" in parts:
            results["extraction"] = bench_extraction(build_encoder(encoder_name), limit, 32, root, rounds=3)
        if "training" in parts:
            results["training"] = bench_training(root, train_pairs, args.batch_size, epochs=3)
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
