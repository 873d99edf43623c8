"""Outlier clamp: every feature element limited to ±(a quantile of |x|), as the paper's code does before scoring.

A few huge activations (a handful of "massive" channels are common in transformers) dominate inner products after
L2 normalisation, so neighbour lists and kernels then mostly reflect those channels. The paper's code limits every
element to [−t, t] with t the 95th percentile of |x| before normalising. Here that is :func:`clamp_outliers`, one
pure function, applied per layer and per side by ``evaluate.py`` (``--outlier-quantile``), study configs
(``outlier_quantile``) and the torchmetrics wrappers (``outlier_quantile=``). Default everywhere: off.

:func:`clamp_outliers_paper` is the paper's own rule, for ``--protocol paper``: one threshold per model, the mean
over samples of each sample's (interpolated) q quantile of |x| over all its layers at once.
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from ._checks import check_matrix

# Same-width integer types: for finite non-negative floats (|x|, with -0.0 turned into +0.0 by abs) the bit patterns
# read as signed integers sort exactly like the values, so an integer selection picks the same element.
_SAME_WIDTH_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
                   torch.float64: torch.int64}


def check_quantile(quantile: object, name: str = "quantile") -> Optional[float]:
    """``None`` (no clamp) or a number in (0, 1]; returns it as a float. ``name`` is used in the error."""
    if quantile is None:
        return None
    if isinstance(quantile, bool) or not isinstance(quantile, numbers.Real):
        raise ValueError(f"{name} must be a number in (0, 1] (e.g. 0.95, the paper's setting) or None for no "
                         f"clamp, got {quantile!r}")
    value = float(quantile)
    if not 0.0 < value <= 1.0:  # also false for NaN
        raise ValueError(f"{name} must lie in (0, 1] (e.g. 0.95, the paper's setting; 1 or None = no clamp), "
                         f"got {value!r}")
    return value


def quantile_rank(quantile: float, n: int) -> int:
    """r = ⌈q·n⌉ (1-based rank of the threshold among the n sorted values), with q read as the decimal it prints as.

    ``0.07 * 100`` is 7.000000000000001 in floating point and would give rank 8; reading q as ``Fraction("0.07")``
    gives exactly 7, the rank a user who wrote 0.07 means.
    """
    return max(1, math.ceil(Fraction(repr(float(quantile))) * n))


def outlier_threshold(x: Tensor, quantile: float, name: str = "x") -> Tensor:
    """t = the ⌈q·n⌉-th smallest of the n = N·D values |x_ij| (a 0-d tensor of x's dtype, on x's device).

    Exact (one of the values of |x|, no interpolation). Memory: one buffer the size of x. On CPU the selection
    is done in place on that buffer (NumPy introselect, O(n); ``torch.kthvalue`` there would add a clone and an
    int64 index buffer, 3 more copies); elsewhere ``torch.kthvalue`` (on CUDA it allocates nothing of that size).
    ``torch.quantile`` is not used: it refuses more than 2^24 elements (65536 × 1024 features are 2^26) and
    interpolates.
    """
    q = check_quantile(quantile)
    check_matrix(x, name, hint=_NAN_HINT)
    if q is None:
        raise ValueError("outlier_threshold needs a quantile in (0, 1], got None")
    return _threshold(x, q)


def _threshold(x: Tensor, q: float) -> Tensor:
    rank = quantile_rank(q, x.numel())
    with torch.no_grad():
        buf = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        torch.abs(x.detach(), out=buf)  # any strides in, contiguous out: no second copy for a transposed x
        flat = buf.view(-1)
        if x.device.type == "cpu" and x.dtype in _SAME_WIDTH_INT:
            ints = flat.view(_SAME_WIDTH_INT[x.dtype]).numpy()
            ints.partition(rank - 1)  # in place: element rank-1 is now the rank-th smallest
            t = flat[rank - 1].clone()
        else:
            t = torch.kthvalue(flat, rank).values
        del buf, flat
    return t


def clamp_outliers(x: Tensor, quantile: Optional[float], name: str = "x") -> Tensor:
    """``x`` with every element clamped to [−t, t], t = the ``quantile`` quantile of |x| over all N·D elements.

    The quantile definition: t is the r-th smallest of the n = N·D values |x_ij| with r = ⌈q·n⌉ (1-based; q read
    as the decimal it prints as, so 0.95 is exactly 95/100), i.e. the smallest value with at least a fraction q of
    the elements at or below it (NumPy's ``method="inverted_cdf"``). At most n − r = ⌊(1 − q)·n⌋ elements change
    (exactly that many when the |x_ij| are distinct; fewer with ties at t). The threshold is one number for the
    whole matrix, so call this once per layer and per side, on all rows (not per batch).

    Relation to the paper's code (platonic-rep ``metrics.remove_outliers``, q = 0.95 in ``measure_alignment.py``),
    which applies it to each model's N × L × D tensor of *all layers stacked*:
    - its ``exact=True`` branch takes the sorted |x| at 0-based index ⌊q·n⌋, the (⌊q·n⌋ + 1)-th smallest: the
      same element as here when q·n is not an integer, the next one up when it is;
    - its default (``exact=False``, what ``measure_alignment.py`` runs without ``--precise``) is the *mean over
      samples* of each sample's linearly interpolated ``torch.quantile`` of |x| over its L·D elements;
    - there one threshold serves all layers of a model; here each layer gets its own (layers differ in scale by
      orders of magnitude, and one shared threshold would clamp whole deep layers while leaving shallow ones alone).
    Numbers therefore differ slightly from the paper's; the purpose (cut the few extreme activations) is the same.

    Args:
        x: N × D features (float16/bfloat16/float32/float64, any device); must be finite.
        quantile: q in (0, 1]; ``None`` or 1 leave x unchanged (x itself is returned: no copy, no checks).
        name: how x is named in errors (e.g. ``"tiny_vit layer blocks.3"``).

    Returns:
        A new tensor of x's dtype, shape and device (differentiable w.r.t. x: the gradient passes where
        |x| < t). Memory: one buffer the size of x for the threshold, freed before the output is made.

    Raises:
        ValueError: q outside (0, 1]; x not a finite floating 2-D tensor (NaN/Inf features); or t = 0 while some
        element is not (more than a fraction q of the elements are exactly 0, as in sparse ReLU features), which
        would zero every feature.
    """
    q = check_quantile(quantile)
    if q is None or q == 1.0:
        return x  # off: no work and no checks here (the metrics validate their own input)
    check_matrix(x, name, hint=_NAN_HINT)
    t = _threshold(x, q)
    if float(t) == 0.0 and bool((x != 0).any()):
        raise ValueError(f"{name}: the {q:g} quantile of |x| is 0 (more than a fraction {q:g} of its elements are "
                         "exactly 0, e.g. sparse ReLU features), so clamping would set every feature to 0; use a "
                         "higher quantile or no clamp for this layer")
    return torch.clamp(x, -t, t)


# torch.quantile refuses inputs of more than 2^24 elements: the per-sample quantiles are taken in row blocks below it.
_QUANTILE_LIMIT = 1 << 24


def paper_outlier_threshold(layers: Sequence[Tensor], quantile: float, name: str = "x") -> Tensor:
    """The paper's threshold for one model: mean over samples of each sample's q quantile of |x| (float32).

    Transcribes what platonic-rep's ``metrics.remove_outliers(feats, q)`` computes by default (``exact=False``,
    as ``measure_alignment.py`` runs it): ``feats`` is the model's N × L × D stack of *all* its layers, each
    sample's |x| is flattened over its L·D values, ``torch.quantile`` (linear interpolation) gives one value per
    sample, and their mean is the threshold for every element of every layer. Layers of different widths cannot
    be stacked; the paper's code then clamps each layer on its own (its list branch), and so does
    :func:`clamp_outliers_paper`, which calls this once per layer in that case.
    """
    q = check_quantile(quantile)
    if q is None:
        raise ValueError("paper_outlier_threshold needs a quantile in (0, 1], got None")
    for i, x in enumerate(layers):
        check_matrix(x, f"{name} layer {i}", hint=_NAN_HINT)
    n = layers[0].shape[0]
    if any(x.shape[0] != n for x in layers):
        raise ValueError(f"{name}: every layer needs the same number of rows, got {[x.shape[0] for x in layers]}")
    width = sum(x.shape[1] for x in layers)
    rows = max(1, _QUANTILE_LIMIT // max(1, width))
    per_sample = []
    with torch.no_grad():
        for i0 in range(0, n, rows):
            block = torch.cat([x[i0:i0 + rows].detach().float().abs() for x in layers], dim=1)
            per_sample.append(torch.quantile(block, q, dim=1))
    return torch.cat(per_sample).mean()


def clamp_outliers_paper(layers: Sequence[Tensor], quantile: Optional[float], name: str = "x") -> List[Tensor]:
    """Every layer of one model clamped to ±t with the paper's threshold t (see :func:`paper_outlier_threshold`).

    Layers of one width share one t computed over all of them, as the paper's N × L × D tensor does; layers of
    mixed widths (CNN stages) each get their own t, as the paper's code does for a list of layers. Returns
    float32 tensors (the paper's code casts to float before clamping). ``None`` or 1 leave the layers as they are.
    """
    q = check_quantile(quantile)
    if q is None or q == 1.0:
        return list(layers)
    groups = [list(layers)] if len({x.shape[1] for x in layers}) == 1 else [[x] for x in layers]
    out = []
    for group in groups:
        t = paper_outlier_threshold(group, q, name)
        if float(t) == 0.0 and any(bool((x != 0).any()) for x in group):
            raise ValueError(f"{name}: the paper's {q:g} quantile threshold of |x| is 0 (most elements are exactly 0), "
                             "so clamping would set every feature to 0; use a higher quantile")
        out += [torch.clamp(x.float(), -t, t) for x in group]
    return out


_NAN_HINT = ("; the outlier clamp's threshold is a quantile of |x| and is undefined with them: drop or repair those "
             "samples (re-extract the features; in float16, look for overflow) before scoring")
