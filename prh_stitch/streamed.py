"""Streaming training's encoder side: frozen-encoder features of raw batches, computed in the training loop.

In ``data.mode: stream`` (see ``data/datamodule.py``) the ``StitchingModule`` gets raw batches -- each encoder's
preprocessed inputs under ``batch["inputs"]["source"|"target"]`` -- and turns them into the pooled features the
feature store would hold for the same samples: the same call (``FrozenEncoder.encode`` at the configured layer
and pooling) that extraction makes, on the training device. ``encode`` runs in inference mode, so no graph is
built for the encoders; under a mixed-precision trainer the call sits inside Lightning's autocast region of the
training step and runs in the lower precision, as the encoder's own forward would.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Tuple

import torch
from torch import Tensor

from prh_stitch.encoders.base import FrozenEncoder, Layer
from prh_stitch.stitchers import Stitcher


def encode_streamed(encoder: FrozenEncoder, inputs: Any, layer: Layer, pooling: Optional[str]) -> Tensor:
    """``(B, D)`` float32 features of one encoder for a streamed batch, usable as the stitcher's input.

    ``encode`` returns inference-mode tensors, which autograd refuses to save for backward (the stitcher's
    first layer would); the copy made here outside inference mode is an ordinary tensor without gradient.
    """
    features = encoder.encode(inputs, [layer], pooling)[0]
    return features.to(torch.float32, copy=True)


def fit_normalization_on_stream(
    stitcher: Stitcher,
    batches: Iterable[Tuple[dict, int]],
    encode: Callable[[dict], Tuple[Tensor, Tensor]],
    gather: Callable[[Tensor], Tensor],
) -> int:
    """Fit the stitcher's input/output normalisation on streamed training features; returns the rows used.

    ``batches``: ``(raw batch, rows to use)`` of this rank; ``encode``: raw batch -> (source, target) features;
    ``gather``: all-gather of equal-sized per-rank tensors, stacked along a new first dimension (Lightning's
    ``all_gather``). Every rank then fits from the same rows in the same order: identical statistics everywhere.
    """
    needs_source = stitcher.input_norm.kind != "none"
    needs_target = stitcher.output_norm.kind != "none"
    if not (needs_source or needs_target):
        return 0
    sources, targets = [], []
    for batch, rows in batches:
        source, target = encode(batch)
        sources.append(source[:rows])
        targets.append(target[:rows])
    if not sources:
        raise ValueError("the training stream gave no samples to fit the stitcher's normalisation on")
    source = gather(torch.cat(sources)).reshape(-1, sources[0].shape[-1]) if needs_source else None
    target = gather(torch.cat(targets)).reshape(-1, targets[0].shape[-1]) if needs_target else None
    stitcher.fit_normalization(source, target)
    return len(source if source is not None else target)
