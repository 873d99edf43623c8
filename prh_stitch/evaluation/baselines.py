"""Training-free cross-modal baselines: compare two encoders through a shared set of anchor pairs.

No weights are learned. Each baseline is fitted on *anchor pairs* (row i of ``source_anchors`` and row i of
``target_anchors`` are the same item seen by the two encoders) and then maps either modality into one
comparison space whose coordinates are "similarity to anchor k", so the two sides become comparable even
though their encoders' feature spaces (and widths) differ.

Interface (what ``evaluate.py stitch --baseline NAME`` relies on)::

    baseline = BASELINES.get(name)(**options)          # e.g. num_anchors=1024, m=64, exponent=8
    baseline.fit(source_anchors, target_anchors)        # (N, Ds), (N, Dt) paired; returns self
    s = baseline.transform_source(source_features)      # (n, K) anchor space
    t = baseline.transform_target(target_features)      # (n, K) anchor space
    retrieval(s, t)                                     # compare by cosine, as for stitched features

Options common to every baseline:

- ``num_anchors`` (int or None): how many anchor pairs to use. ``None`` uses every pair given to ``fit``;
  an integer K picks K of them at random (the same rows on both sides, seeded by ``seed``, so runs repeat).
  The caller chooses the *pool* (normally the training split, never the evaluation items); the class
  chooses the subset. K larger than the pool is an error.
- ``seed`` (int): seed of that subset.

Baselines:

- ``relative`` — relative representations (Moschella et al., ICLR 2023): the vector of cosine similarities
  to the K anchors. ``center=True`` subtracts the anchors' mean from features and anchors first (a common
  variant that removes the shared "all images look alike" direction; off by default, as in the paper).
- ``asif`` — ASIF (Norelli et al., NeurIPS 2023): relative representations made sparse: keep the ``m``
  largest anchor similarities of each row (ties: lower anchor index), raise them to ``exponent`` (clamped at
  0 first, so the power is defined and monotone), zero the rest. Cosine between such sparse vectors rewards
  rows whose *closest* anchors agree, which is more robust than comparing all K similarities.

All computations run in float32 on the inputs' device; outputs are dense ``(n, K)`` tensors (ASIF's zeros
included), since K is at most a few thousand.
"""

from __future__ import annotations

import abc
import operator
from typing import Any, Optional

import torch
from torch import Tensor

from prh_stitch.registry import Registry

__all__ = ["BASELINES", "AnchorBaseline", "RelativeRepresentation", "ASIF"]

BASELINES: Registry[type] = Registry("baseline")


def _optional_count(what: str, value: Any) -> Optional[int]:
    if value is None:
        return None
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be a positive integer or None, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{what} must be a positive integer or None, got {number}")
    return int(number)


def _check_features(x: Tensor, name: str, dim: Optional[int] = None) -> None:
    if not isinstance(x, Tensor) or x.ndim != 2 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D floating-point (N × D) tensor, got {shape}")
    if x.shape[0] < 1:
        raise ValueError(f"{name} has no rows")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has {x.shape[1]} features but the anchors of that side have {dim}; "
                         "use features from the same encoder and layer as the anchors")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def _unit_rows(x: Tensor) -> Tensor:
    # A zero row has no direction; it stays zero (similarity 0 to every anchor) instead of becoming NaN.
    return torch.nn.functional.normalize(x.float(), dim=1, eps=1e-12)


class AnchorBaseline(abc.ABC):
    """Shared anchor handling: subset selection, per-side anchor matrices, optional centering."""

    def __init__(self, num_anchors: Optional[int] = None, seed: int = 0, center: bool = False) -> None:
        self.num_anchors = _optional_count(f"{type(self).__name__}: num_anchors", num_anchors)
        self.seed = int(seed)
        self.center = bool(center)
        self._anchors: dict = {}
        self._means: dict = {}
        self.anchor_indices: Optional[Tensor] = None

    def fit(self, source_anchors: Tensor, target_anchors: Tensor) -> "AnchorBaseline":
        """Store the (subset of) paired anchors of both sides; returns ``self``."""
        _check_features(source_anchors, "source_anchors")
        _check_features(target_anchors, "target_anchors")
        n = source_anchors.shape[0]
        if target_anchors.shape[0] != n:
            raise ValueError(f"anchor pairs must be paired row by row: {n} source anchors but "
                             f"{target_anchors.shape[0]} target anchors")
        k = n if self.num_anchors is None else self.num_anchors
        if k > n:
            raise ValueError(f"num_anchors={k} but only {n} anchor pairs were given; lower num_anchors or pass more")
        self._check_anchor_count(k)
        if k == n:
            index = torch.arange(n)
        else:
            generator = torch.Generator().manual_seed(self.seed)
            index = torch.randperm(n, generator=generator)[:k].sort().values
        self.anchor_indices = index
        for side, anchors in (("source", source_anchors), ("target", target_anchors)):
            chosen = anchors.detach()[index.to(anchors.device)].float()
            mean = chosen.mean(0) if self.center else torch.zeros_like(chosen[0])
            self._means[side] = mean
            self._anchors[side] = _unit_rows(chosen - mean)
        return self

    def _check_anchor_count(self, k: int) -> None:
        """Hook for options that depend on the number of anchors (e.g. ASIF's m <= K)."""

    def _relative(self, x: Tensor, side: str) -> Tensor:
        if side not in self._anchors:
            raise RuntimeError(f"{type(self).__name__} is used before fit(source_anchors, target_anchors)")
        anchors = self._anchors[side]
        _check_features(x, f"{side} features", anchors.shape[1])
        x = x.detach().to(device=anchors.device, dtype=torch.float32)
        return _unit_rows(x - self._means[side]) @ anchors.T

    @abc.abstractmethod
    def _sparsify(self, similarities: Tensor) -> Tensor:
        """Turn (n, K) cosine similarities into the comparison-space vectors."""

    def transform_source(self, x: Tensor) -> Tensor:
        """Source-encoder features ``(n, Ds)`` -> anchor space ``(n, K)``."""
        return self._sparsify(self._relative(x, "source"))

    def transform_target(self, y: Tensor) -> Tensor:
        """Target-encoder features ``(n, Dt)`` -> anchor space ``(n, K)``."""
        return self._sparsify(self._relative(y, "target"))

    def config(self) -> dict:
        return {"num_anchors": self.num_anchors, "seed": self.seed, "center": self.center}


@BASELINES.register("relative")
class RelativeRepresentation(AnchorBaseline):
    """Relative representations: cosine similarity to each of K anchors (Moschella et al., 2023)."""

    def _sparsify(self, similarities: Tensor) -> Tensor:
        return similarities


@BASELINES.register("asif")
class ASIF(AnchorBaseline):
    """ASIF-style sparse relative representations: top-``m`` similarities per row, raised to ``exponent``.

    Defaults follow the ASIF paper's scale (m in the tens to hundreds, exponent around 8) for K in the
    thousands; ``m`` must not exceed the number of anchors.
    """

    def __init__(self, num_anchors: Optional[int] = None, m: int = 64, exponent: float = 8.0, seed: int = 0,
                 center: bool = False) -> None:
        super().__init__(num_anchors=num_anchors, seed=seed, center=center)
        m_checked = _optional_count("ASIF: m", m)
        if m_checked is None:
            raise ValueError("ASIF: m (how many anchor similarities to keep per row) must be a positive integer")
        self.m = m_checked
        exponent = float(exponent)
        if not exponent > 0:
            raise ValueError(f"ASIF: exponent must be > 0, got {exponent}")
        self.exponent = exponent

    def _check_anchor_count(self, k: int) -> None:
        if self.m > k:
            raise ValueError(f"ASIF: m={self.m} exceeds the number of anchors ({k}); choose m <= num_anchors")

    def _sparsify(self, similarities: Tensor) -> Tensor:
        # torch.topk's order among equal values is unspecified; a stable descending sort keeps the lower index.
        order = torch.sort(similarities, dim=1, descending=True, stable=True).indices[:, : self.m]
        kept = similarities.gather(1, order).clamp_min(0).pow(self.exponent)
        return torch.zeros_like(similarities).scatter_(1, order, kept)

    def config(self) -> dict:
        return {**super().config(), "m": self.m, "exponent": self.exponent}
