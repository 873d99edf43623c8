"""Benchmark: closed-form ridge stitcher vs the gradient-trained linear stitcher, same data, same run.

Data: 100,000 training pairs of 1280-d "image" features -> 384-d "text" features (the widths of the default
run: EfficientNet-Lite0 pre_logits -> MiniLM-L6), plus 5,000 validation pairs (ridge grid / best epoch) and
5,000 held-out test pairs. They are synthetic but structured like real encoder features: a shared latent
(256-d, power-law spectrum) seen through a different random linear map per side, a nonzero mean, per-feature
scales spread over two orders of magnitude, and independent noise on each side, so neither side determines
the other exactly and ridge strength matters.

Both stitchers are the project's own code: the closed form is ``fit_closed_form(method="ridge")`` with the
default grid chosen on validation recall@1 and, by default, the retrieval tuning on top (target whitening and
deviation gain chosen on validation recall@1; see ``prh_stitch.closed_form``); the plain ridge at the same
strength (``gain=None, whiten=None``, the MSE fit) is reported beside it. The gradient one is ``StitchingModule`` (linear core, standard
input norm, contrastive loss, AdamW 1e-3, cosine) under a Lightning ``Trainer`` for the default schedule
(``train.py``'s 40 epochs at batch 256), fed these features through a StitchingDataModule that serves tensors.
Reported: fit time (statistics pass + grid + tuning), and held-out test recall@1 (source -> target, cosine) of
plain ridge, tuned ridge and the gradient stitcher.

    python benchmarks/bench_stitch.py              # the issue's setting (the gradient run takes minutes)
    python benchmarks/bench_stitch.py --quick      # 20,000 pairs, 3 epochs: a smoke test
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import warnings

import torch

from prh_stitch.closed_form import NormalEquations, fit_closed_form
from prh_stitch.metrics import retrieval
from prh_stitch.stitchers import Stitcher

FIT_SECONDS_TARGET = 10.0


def structured_pairs(n: int, dx: int = 1280, dy: int = 384, latent: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.arange(1, latent + 1, dtype=torch.float32) ** -0.5  # power-law variance of the shared latent
    maps = (torch.randn(latent, dx, generator=g) / latent ** 0.5, torch.randn(latent, dy, generator=g) / latent ** 0.5)
    scales = (torch.logspace(0, -2, dx)[torch.randperm(dx, generator=g)], torch.logspace(0, -1, dy))
    means = (torch.randn(dx, generator=g), torch.randn(dy, generator=g))

    def draw(rows: int, stream: int):
        h = torch.Generator().manual_seed(seed * 1000 + stream)
        z = torch.randn(rows, latent, generator=h) * spectrum
        x = (z @ maps[0] + 0.05 * torch.randn(rows, dx, generator=h)) * scales[0] * 10 + means[0]
        y = (z @ maps[1] + 0.05 * torch.randn(rows, dy, generator=h)) * scales[1] + means[1]
        return x, y

    return draw(n, 1), draw(5000, 2), draw(5000, 3)


def test_recall(stitcher: Stitcher, test) -> float:
    with torch.no_grad():
        return retrieval(stitcher.eval()(test[0]), test[1], ks=(1,))["a2b/recall@1"]


def closed_form(train, val, test, precision: str):
    start = time.perf_counter()
    s = Stitcher("linear", train[0].shape[1], train[1].shape[1], "standard")
    s.fit_normalization(*train)
    stats = NormalEquations.from_pairs(train, precision=precision)  # the one streaming pass
    accumulated = time.perf_counter() - start
    result = fit_closed_form(s, stats, "ridge", val=val)  # normal equations per grid value + val recall@1
    seconds = time.perf_counter() - start
    # Untimed reference: the plain (MSE) ridge at the chosen strength, from the same statistics.
    plain = Stitcher("linear", train[0].shape[1], train[1].shape[1], "standard")
    plain.load_state_dict(s.state_dict())
    fit_closed_form(plain, stats, "ridge", ridge=result.ridge, gain=None, whiten=None)
    return seconds, accumulated, test_recall(s, test), test_recall(plain, test), result


def matmul_gflops() -> float:
    """This machine's float32 matmul rate right now (the CPU is shared, so it varies run to run)."""
    a = torch.randn(2048, 2048)
    a @ a
    start = time.perf_counter()
    for _ in range(3):
        a @ a
    return 3 * 2 * 2048 ** 3 / (time.perf_counter() - start) / 1e9


def gradient(train, val, test, epochs: int):
    import pytorch_lightning as pl
    from torch.utils.data import TensorDataset

    from prh_stitch.data import datamodule
    from prh_stitch.data.datamodule import StitchingDataModule
    from prh_stitch.module import StitchingModule

    # The dataset class the DataModule's own loaders expect (batched __getitems__ where it has one).
    dataset_type = getattr(datamodule, "PairDataset", TensorDataset)

    class TensorPairs(StitchingDataModule):
        """The real DataModule's loaders, serving the synthetic features instead of the feature store's."""

        def prepare_features(self, requests, device="cpu"):
            pass

        def setup_features(self, source, target):
            for split, (x, y) in (("train", train), ("val", val)):
                self.datasets[split] = dataset_type(x, y, torch.arange(len(x)), torch.arange(len(x)))

    # The default run's encoders, only for their widths (1280 -> 384); they never see an input here.
    model = StitchingModule()
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(model, datamodule=TensorPairs())
    seconds = time.perf_counter() - start
    return seconds, test_recall(model.stitcher, test)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="training pairs")
    parser.add_argument("--epochs", type=int, default=40, help="gradient epochs (train.py default: 40)")
    parser.add_argument("--quick", action="store_true", help="20,000 pairs and 3 epochs")
    parser.add_argument("--skip-gradient", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.epochs = 20_000, 3
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    train, val, test = structured_pairs(args.n)
    print(f"data: {args.n} train / {len(val[0])} val / {len(test[0])} test pairs, "
          f"{train[0].shape[1]}-d -> {train[1].shape[1]}-d")

    print(f"float32 matmul rate now: {matmul_gflops():.0f} GFLOP/s")
    fits = {}
    for precision in ("float64", "mixed"):
        fits[precision] = seconds, accumulated, r1, plain_r1, result = closed_form(train, val, test, precision)
        print(f"closed-form ridge ({precision} products): fit {seconds:.2f} s (one pass over the pairs "
              f"{accumulated:.2f} s, grid + tuning {seconds - accumulated:.2f} s; target < {FIT_SECONDS_TARGET:.0f} s: "
              f"{'met' if seconds < FIT_SECONDS_TARGET else 'MISSED'}), ridge {result.ridge:g} chosen by val "
              f"recall@1 over {len(result.scores)} values, then whiten {result.whiten} gain {result.gain:g} over "
              f"{len(result.tuning_scores)} pairs; test recall@1 plain ridge {plain_r1:.4f}, tuned ridge {r1:.4f}")
    print("  val recall@1 per ridge (plain): " + ", ".join(f"{k}: {v:.4f}" for k, v in result.scores.items()))
    print("  val recall@1 per tuning (at the chosen ridge): "
          + ", ".join(f"{k}: {v:.4f}" for k, v in result.tuning_scores.items()))
    seconds, _, r1, plain_r1, _ = fits["float64"]  # the default precision is the one compared below
    if args.skip_gradient:
        return 0
    g_seconds, g_r1 = gradient(train, val, test, args.epochs)
    print(f"gradient linear stitcher ({args.epochs} epochs, batch 256, contrastive, AdamW 1e-3 cosine): "
          f"fit {g_seconds:.1f} s, test recall@1 {g_r1:.4f}")
    verdict = "met" if r1 >= g_r1 else "MISSED"
    print(f"tuned ridge recall@1 {r1:.4f} (plain ridge {plain_r1:.4f}) vs gradient {g_r1:.4f} "
          f"(target tuned ridge >= gradient: {verdict}); ridge is {g_seconds / seconds:.0f}x faster")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
