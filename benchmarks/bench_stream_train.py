"""Benchmark: streaming training's step rate against the bare frozen-encoder forward, on the same batches.

``data.mode: stream`` runs both frozen encoders in every training step, so an epoch cannot be faster than
encoding its samples. What the rest costs -- the stitcher's forward and backward, the optimizer, Lightning's
loop and logging, copying the encoders' outputs out of inference mode -- is what this measures:

1. Raw batches are made once by the real stream (``StitchingDataModule(mode="stream")``: scenes decoded,
   each encoder's preprocessing done) and kept in memory, so reading and decoding cost neither side.
2. Bare: ``encoder.encode`` of the source and the target encoder on every batch, nothing else.
3. Training: Lightning ``Trainer.fit`` of ``StitchingModule`` on the same batches (gradient steps of the
   default linear stitcher, contrastive loss, AdamW, cosine schedule, logging).

The bare loop is timed before and after training and averaged, so drifting load on a shared machine hits
both sides alike. The first batch of each is a warm-up and not timed. Target: training >= 0.85 x bare.

    python benchmarks/bench_stream_train.py            # the default encoders (efficientnet_lite0 -> minilm_l6)
    python benchmarks/bench_stream_train.py --tiny     # tiny_vit -> tiny_bert: a smoke test in seconds
"""

from __future__ import annotations

import argparse
import tempfile
import time
from itertools import islice

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from prh_stitch.data.datamodule import SceneData, StitchingDataModule, StreamOptions
from prh_stitch.encoders import EncoderSpec
from prh_stitch.module import StitchingModule

TARGET = 0.85


class PremadeBatches(StitchingDataModule):
    """The stream-mode data module, with the training loader replaced by batches made in advance."""

    batches: list = []

    def train_dataloader(self):
        return DataLoader(self.batches, batch_size=None, collate_fn=as_is)


def as_is(batch):
    return batch


class StepTimes(pl.Callback):
    def __init__(self) -> None:
        self.start = self.end = None
        self.steps = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 1:  # batch 0 is the warm-up
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx >= 1:
            self.end = time.perf_counter()
            self.steps += 1


def bare_forward(module: StitchingModule, batches: list) -> float:
    """Seconds for both encoders' forward on batches[1:] (batch 0 warms up)."""
    source, target = module.source_encoder, module.target_encoder
    s, t = module.source_spec, module.target_spec
    start = None
    for i, batch in enumerate(batches):
        if i == 1:
            start = time.perf_counter()
        source.encode(batch["inputs"]["source"], [s.layer], s.pooling)
        target.encode(batch["inputs"]["target"], [t.layer], t.pooling)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny_vit -> tiny_bert instead of the default encoders")
    parser.add_argument("--batches", type=int, default=9, help="batches per pass (the first is a warm-up)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.tiny:
        source, target, image_size = EncoderSpec("tiny_vit"), EncoderSpec("tiny_bert"), 64
    else:
        source, target, image_size = EncoderSpec("efficientnet_lite0"), EncoderSpec("minilm_l6", pooling="mean"), 224
    n = args.batches * args.batch_size
    with tempfile.TemporaryDirectory() as cache:
        module = StitchingModule(source=source, target=target)
        dm = PremadeBatches(scenes=SceneData(n_train=n, n_val=args.batch_size, n_test=args.batch_size, image_size=image_size),
                            cache_dir=cache, batch_size=args.batch_size, mode="stream",
                            stream=StreamOptions(norm_samples=args.batch_size))
        dm.prepare_features(list(module.feature_requests()))
        module._setup_stream(dm)
        dm.setup_features(*module.feature_requests())
        batches = list(islice(dm._require_stream().train_dataloader(), args.batches))
        PremadeBatches.batches = batches
        print(f"encoders {source.name} -> {target.name}, {len(batches)} batches of {args.batch_size}, "
              f"{torch.get_num_threads()} threads, device cpu")

        bare_before = bare_forward(module, batches)
        times = StepTimes()
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                             num_sanity_val_steps=0, callbacks=[times])
        trainer.fit(module, datamodule=dm)
        bare_after = bare_forward(module, batches)

    timed = len(batches) - 1
    bare = (bare_before + bare_after) / 2
    train = times.end - times.start
    assert times.steps == timed, (times.steps, timed)
    ratio = bare / train
    print(f"  bare encoder forward   {timed * args.batch_size / bare:9.1f} samples/s  "
          f"({bare_before:.2f} s before, {bare_after:.2f} s after training, {timed} batches)")
    print(f"  streaming training     {timed * args.batch_size / train:9.1f} samples/s  ({train:.2f} s, {timed} steps)")
    print(f"  training / bare        {ratio:9.3f}       target >= {TARGET}: {'ok' if ratio >= TARGET else 'MISSED'}")


if __name__ == "__main__":
    main()
