"""Features for scoring: every layer of an encoder from the feature store, rows paired across models by key."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from prh_stitch.errors import UserError


@dataclass
class Extraction:
    """How to run encoders over shards (batching, workers, device, progress)."""

    store: Any
    device: torch.device
    batch_size: int = 64
    num_workers: int = 0
    progress: bool = True


def extraction_layers(encoder, pooling: Optional[str], layer: Optional[int] = None) -> List[int]:
    """The layers extracted together in one pass: every layer ``pooling`` applies to (an explicit pooling leaves out
    the layer the model pools itself, e.g. ``pre_logits`` or a CLIP tower's ``projection``; see
    :meth:`~prh_stitch.encoders.base.FrozenEncoder.pooled_layers`). A requested ``layer`` outside them comes alone
    (the encoder then refuses the pooling with the fix)."""
    fits = encoder.pooled_layers(pooling)
    if layer is None:
        return fits
    index = encoder.resolve_layer(layer)
    return fits if index in fits else [index]


def load_features(ex: Extraction, encoder, urls: Sequence[str], pooling: Optional[str] = None,
                  layers: Optional[List[int]] = None):
    """Features of ``encoder`` on ``urls`` from the store (extracted on ``ex.device`` when absent)."""
    from prh_stitch.data.features import BadFeatures, data_fingerprint

    layers = extraction_layers(encoder, pooling) if layers is None else layers
    encoder.to(ex.device)
    try:
        feature_set = ex.store.get(encoder, list(urls), layers=layers, pooling=pooling, batch_size=ex.batch_size,
                                   num_workers=ex.num_workers, progress=ex.progress)
    except BadFeatures as exc:
        if exc.skipped is None:  # the shards have good samples: the store's own error (NaN features, duplicate keys)
            raise
        raise UserError(no_samples_problem(urls, exc.skipped)) from None
    finally:
        encoder.to("cpu")
    # Recorded here, from the encoder itself, so reports and the score cache do not depend on which identity
    # fields a given version of the store keeps in ``info``.
    feature_set.info = dict(feature_set.info or {}, encoder_fingerprint=encoder.fingerprint(layers, pooling),
                            data_fingerprint=data_fingerprint(list(urls)))
    return feature_set


def no_samples_problem(urls: Sequence[str], counts: Dict[str, int]) -> str:
    """Why the shards give no usable sample, from the store's skip counts ({reason: count}) carried by its error."""
    text = json.dumps(counts)
    if counts.get("missing_caption") or counts.get("empty_caption"):
        return (f"the data has no captions: no sample of {len(urls)} shard(s) ({urls[0]} ...) has a non-empty .txt "
                f"caption (skips: {text}). evaluate.py needs image–caption pairs; write shards with "
                "python -m prh_stitch.data write")
    return f"no usable samples in {len(urls)} shard(s) ({urls[0]} ...); skips: {text}"


def layer_names(feature_set) -> List[str]:
    """Layer names shallow to deep (the stored dict's order is not guaranteed to be the model's)."""
    names = feature_set.info.get("layers") if isinstance(feature_set.info, dict) else None
    return list(names) if names else list(feature_set.features)


def paired(fa, fb, device: torch.device) -> Tuple[List[Tensor], List[Tensor], Tensor, Tensor]:
    """Every layer of both sides, rows joined by sample key, as float32 on ``device``."""
    from prh_stitch.data.features import align_by_key

    ia, ib = align_by_key(fa, fb)
    a = [fa.features[n][ia].float().to(device) for n in layer_names(fa)]
    b = [fb.features[n][ib].float().to(device) for n in layer_names(fb)]
    return a, b, ia, ib


def encoder_record(feature_set) -> Dict[str, Any]:
    """Identity of a feature set (reports, cache keys); ``transform`` only when one was applied (--protocol paper),
    so the keys of untransformed features stay what they were."""
    info = feature_set.info or {}
    record = {k: info.get(k) for k in ("encoder", "encoder_fingerprint", "data_fingerprint", "pooling", "layers",
                                       "num_samples", "dtype")}
    if info.get("transform"):
        record["transform"] = info["transform"]
    return record
