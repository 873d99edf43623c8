"""Benchmark: streaming training's step rate against the bare frozen-encoder forward, on the same batches.

``data.mode: stream`` runs both frozen encoders in every training step, so an epoch cannot be faster than
encoding its samples. What the rest costs -- the stitcher's forward and backward, the optimizer, Lightning's
loop and logging, the batch's copy to the device, copying the encoders' outputs out of inference mode -- is what
this measures:

1. Raw batches are made once by the real stream (``StitchingDataModule(mode="stream")``: scenes decoded,
   each encoder's preprocessing done) and kept in memory, so reading and decoding cost neither side.
2. Bare: ``encoder.encode`` of the source and the target encoder on every batch, nothing else (the batches
   already on the device; under ``torch.autocast`` when the trainer's precision is mixed, as training runs them).
3. Training: Lightning ``Trainer.fit`` of ``StitchingModule`` on the same batches, handed over on the CPU as
   the stream hands them (gradient steps of the default linear stitcher, contrastive loss, AdamW, logging).

The bare loop is timed before and after training and averaged, so drifting load on a shared machine hits
both sides alike. The first batch of each is a warm-up and not timed. Target: training >= 0.85 x bare.
With ``--workers N`` the real stream's own rate is measured too (reading, decoding and preprocessing in N
DataLoader workers, no encoder): an epoch runs at the slower of that and the training rate.

    python benchmarks/bench_stream_train.py            # the default encoders (efficientnet_lite0 -> minilm_l6)
    python benchmarks/bench_stream_train.py --tiny     # tiny_vit -> tiny_bert: a smoke test in seconds

``benchmarks/gpu_check.py`` calls :func:`measure` on the GPU (its ``stream`` part).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import nullcontext
from itertools import islice
from typing import Any, Dict

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from prh_stitch.data.datamodule import SceneData, StitchingDataModule, StreamOptions
from prh_stitch.encoders import EncoderSpec
from prh_stitch.module import StitchingModule

TARGET = 0.85
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


class PremadeBatches(StitchingDataModule):
    """The stream-mode data module, with the training loader replaced by batches made in advance."""

    batches: list = []

    def train_dataloader(self):
        return DataLoader(self.batches, batch_size=None, collate_fn=as_is)


def as_is(batch):
    return batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimes(pl.Callback):
    def __init__(self, device: torch.device) -> None:
        self.device, self.start, self.end, self.steps = device, None, None, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 1:  # batch 0 is the warm-up
            _sync(self.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx >= 1:
            _sync(self.device)
            self.end = time.perf_counter()
            self.steps += 1


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def bare_forward(module: StitchingModule, batches: list, device: torch.device, precision: str) -> float:
    """Seconds for both encoders' forward on batches[1:] (batch 0 warms up), inputs already on ``device``."""
    source, target = module.source_encoder, module.target_encoder
    s, t = module.source_spec, module.target_spec
    inputs = [_to(batch["inputs"], device) for batch in batches]
    autocast = (torch.autocast(device.type, dtype=AUTOCAST[precision]) if precision in AUTOCAST else nullcontext())
    start = None
    with autocast:
        for i, batch in enumerate(inputs):
            if i == 1:
                _sync(device)
                start = time.perf_counter()
            source.encode(batch["source"], [s.layer], s.pooling)
            target.encode(batch["target"], [t.layer], t.pooling)
    _sync(device)
    return time.perf_counter() - start


def stream_rate(dm: StitchingDataModule, n_batches: int) -> float:
    """Samples/s of the real stream alone (its workers read, decode and preprocess); batch 0 not timed."""
    loader = dm._require_stream().train_dataloader()
    start, samples = None, 0
    for i, batch in enumerate(islice(loader, n_batches)):
        if i == 1:  # the clock starts when batch 1 has arrived: batches 2.. are what it measures
            start = time.perf_counter()
        elif i > 1:
            samples += len(batch["key"])
    elapsed = time.perf_counter() - start
    return samples / elapsed if elapsed > 0 else float("nan")


def measure(source: EncoderSpec, target: EncoderSpec, image_size: int, n_batches: int = 9, batch_size: int = 32,
            device: str = "cpu", precision: str = "32-true", workers: int = 0, cache: str | None = None,
            ) -> Dict[str, Any]:
    """Streaming training against the bare forward on the same batches (see the module docstring)."""
    dev = torch.device(device)
    n = n_batches * batch_size
    with tempfile.TemporaryDirectory(dir=cache) as folder:
        module = StitchingModule(source=source, target=target)
        dm = PremadeBatches(scenes=SceneData(n_train=n, n_val=batch_size, n_test=batch_size, image_size=image_size),
                            cache_dir=folder, batch_size=batch_size, mode="stream", num_workers=workers,
                            stream=StreamOptions(norm_samples=batch_size))
        dm.prepare_features(list(module.feature_requests()))
        module._setup_stream(dm)
        dm.setup_features(*module.feature_requests())
        batches = list(islice(dm._require_stream().train_dataloader(), n_batches))
        data_rate = stream_rate(dm, n_batches) if workers else None
        PremadeBatches.batches = batches
        module.source_encoder.to(dev)
        module.target_encoder.to(dev)
        bare_before = bare_forward(module, batches, dev, precision)
        times = StepTimes(dev)
        accelerator = "gpu" if dev.type == "cuda" else "cpu"
        devices = [dev.index or 0] if dev.type == "cuda" else 1
        trainer = pl.Trainer(max_epochs=1, accelerator=accelerator, devices=devices, precision=precision,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                             callbacks=[times])
        trainer.fit(module, datamodule=dm)
        bare_after = bare_forward(module, batches, dev, precision)
    timed = len(batches) - 1
    if times.steps != timed:
        raise RuntimeError(f"training took {times.steps} timed steps, expected {timed}")
    bare = (bare_before + bare_after) / 2
    train = times.end - times.start
    return {"source": source.name, "target": target.name, "device": str(dev), "precision": precision,
            "batch_size": batch_size, "timed_batches": timed, "bare_samples_per_s": timed * batch_size / bare,
            "bare_before_s": bare_before, "bare_after_s": bare_after, "train_samples_per_s": timed * batch_size / train,
            "train_s": train, "train_vs_bare": bare / train, "target_ratio": TARGET, "stream_workers": workers,
            "stream_samples_per_s": data_rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny_vit -> tiny_bert instead of the default encoders")
    parser.add_argument("--batches", type=int, default=9, help="batches per pass (the first is a warm-up)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true", help="the trainer's precision, e.g. bf16-mixed on a GPU")
    parser.add_argument("--workers", type=int, default=0, help="also time the real stream with this many workers")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.tiny:
        source, target, image_size = EncoderSpec("tiny_vit"), EncoderSpec("tiny_bert"), 64
    else:
        source, target, image_size = EncoderSpec("efficientnet_lite0"), EncoderSpec("minilm_l6", pooling="mean"), 224
    print(f"encoders {source.name} -> {target.name}, {args.batches} batches of {args.batch_size}, "
          f"{torch.get_num_threads()} threads, device {args.device}, precision {args.precision}")
    r = measure(source, target, image_size, args.batches, args.batch_size, args.device, args.precision, args.workers)
    print(f"  bare encoder forward   {r['bare_samples_per_s']:9.1f} samples/s  ({r['bare_before_s']:.2f} s before, "
          f"{r['bare_after_s']:.2f} s after training, {r['timed_batches']} batches)")
    print(f"  streaming training     {r['train_samples_per_s']:9.1f} samples/s  ({r['train_s']:.2f} s, "
          f"{r['timed_batches']} steps)")
    print(f"  training / bare        {r['train_vs_bare']:9.3f}       target >= {TARGET}: "
          f"{'ok' if r['train_vs_bare'] >= TARGET else 'MISSED'}")
    if r["stream_samples_per_s"] is not None:
        print(f"  the stream alone       {r['stream_samples_per_s']:9.1f} samples/s  ({args.workers} workers: reading, "
              "decoding, preprocessing; an epoch runs at the slower of this and training)")


if __name__ == "__main__":
    main()
