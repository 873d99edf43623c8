"""Scores between every pair of layers of two models, with per-layer work done once."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import fields, is_dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch
from torch import Tensor

from ._checks import check_pair
from ._spec import options, spec_of


class PreparedLayers:
    """Prepared layers (neighbour lists, Gram norms, ...) by content, shared between calls of
    :func:`layer_alignment`.

    Scoring every vision model against every text model prepares each model's layers once per partner, and again
    on every half-sample and permutation; the neighbour search is most of that work. Keyed by the metric, its
    options and a SHA-1 of the features' bytes, so an entry is reused only for identical rows; at most
    ``max_bytes`` of prepared tensors are kept, least recently used dropped first.
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.max_bytes = int(max_bytes)
        self.entries: "OrderedDict[Any, Any]" = OrderedDict()
        self.sizes: Dict[Any, int] = {}
        self.hits = 0

    def get(self, spec, feats: Tensor, name: str, opts: Dict[str, Any]):
        data = feats.detach().contiguous().cpu()
        key = (spec.name, repr(sorted(opts.items())), tuple(data.shape), str(data.dtype),
               hashlib.sha1(data.reshape(-1).view(torch.uint8).numpy()).hexdigest())
        if key in self.entries:
            self.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key]
        prepared = spec.prepare(feats, name, opts)
        size = _nbytes(prepared)
        if size <= self.max_bytes:
            self.entries[key], self.sizes[key] = prepared, size
            while sum(self.sizes.values()) > self.max_bytes:
                oldest, _ = self.entries.popitem(last=False)
                del self.sizes[oldest]
        return prepared


def _nbytes(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if is_dataclass(value):
        return sum(_nbytes(getattr(value, f.name)) for f in fields(value))
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 64


def layer_alignment(feats_a: Sequence[Tensor], feats_b: Sequence[Tensor], metric: Union[str, Callable],
                    concat: bool = False, prepared: Optional[PreparedLayers] = None, **kw: Any) -> Dict[str, Any]:
    """Score every (layer of A, layer of B) pair with one metric; widths may differ per layer.

    Each layer is prepared once (normalisation, neighbour lists, Gram norms, SVD) and reused for all pairs, so a
    kNN metric does La + Lb neighbour searches instead of 2·La·Lb.

    Args:
        feats_a, feats_b: lists of N × D_l tensors (same N everywhere).
        metric: a name from ``METRICS`` (e.g. ``"mutual_knn"``) or the functional metric itself.
        concat: also score all layers concatenated along the feature axis (each side as one N × ΣD_l matrix,
            normalised as a whole when ``normalize=True``).
        prepared: a :class:`PreparedLayers` to reuse and fill (None: prepare every layer here).
        **kw: the metric's options (e.g. ``k=10``).

    Returns:
        ``scores`` (La × Lb float64 tensor), ``best`` (the maximum — the paper's headline number; it is inflated
        by the max over La·Lb pairs, so also report ``last`` or a calibrated score), ``best_index`` (i, j),
        ``last`` (the last-layer pair) with ``last_index``, ``concat`` (float or None) and ``metric``.
    """
    spec = spec_of(metric)
    opts = options(spec, kw)
    feats_a, feats_b = list(feats_a), list(feats_b)
    if not feats_a or not feats_b:
        raise ValueError("feats_a and feats_b must each hold at least one layer")
    n = check_pair(feats_a[0], feats_b[0])
    for side, feats in (("a", feats_a), ("b", feats_b)):
        for i, f in enumerate(feats):
            check_pair(f, feats_b[0] if side == "a" else feats_a[0])
    spec.check(n, opts)
    prepare = spec.prepare if prepared is None else (lambda f, name, o: prepared.get(spec, f, name, o))
    prep_a = [prepare(f, f"feats_a[{i}]", opts) for i, f in enumerate(feats_a)]
    prep_b = [prepare(f, f"feats_b[{j}]", opts) for j, f in enumerate(feats_b)]
    scores = torch.tensor([[float(spec.pair(pa, pb, opts)) for pb in prep_b] for pa in prep_a],
                          dtype=torch.float64)
    flat = int(scores.argmax())
    best_index = (flat // scores.shape[1], flat % scores.shape[1])
    out: Dict[str, Any] = {
        "metric": spec.name,
        "scores": scores,
        "best": float(scores.max()),
        "best_index": best_index,
        "last": float(scores[-1, -1]),
        "last_index": (len(feats_a) - 1, len(feats_b) - 1),
        "concat": None,
    }
    if concat:
        ca, cb = torch.cat(feats_a, dim=1), torch.cat(feats_b, dim=1)
        out["concat"] = float(spec.pair(spec.prepare(ca, "concat(feats_a)", opts),
                                        spec.prepare(cb, "concat(feats_b)", opts), opts))
    return out
