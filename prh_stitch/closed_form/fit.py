"""Closed-form stitchers: least squares, ridge and orthogonal Procrustes, from one streaming pass.

A closed-form fit writes the ``core.weight`` (and ``core.bias``) of an ordinary ``linear`` or ``affine``
:class:`~prh_stitch.stitchers.Stitcher`, so checkpoints, ``load_stitcher``, evaluation and TensorBoard do not
know or care how the weights were obtained.

Statistics
    :class:`NormalEquations` accumulates, in float64, the sufficient statistics of paired features
    (row count, ``Σx``, ``Σy``, ``XᵀX``, ``XᵀY``, ``Σy²`` per feature, ``YᵀY``) chunk by chunk, so the feature store is
    read once and memory is ``O(Dx² + Dx·Dy)`` whatever N is. All statistics are plain sums: streaming over
    shards, merging and a DDP ``all_reduce`` (:meth:`NormalEquations.all_reduce`) give the one-shot answer.
    Centring happens after accumulation (``XᵀX − n·x̄x̄ᵀ``), which in float64 is exact enough unless feature
    means exceed their spread by ~10⁶. ``precision="mixed"`` computes each chunk's products in float32 on rows
    centred on the chunk's mean (then corrects them exactly to raw sums in float64): about twice as fast on a
    CPU, with moments accurate to ~1e-6 relative, plenty for ridge; ``float64`` (the default) is exact.

Where the fit happens
    In the stitcher's *normalised* space: with ``x' = input_norm(x)`` and ``y' = (y − shift)/scale`` of the
    output norm, the core is fitted to predict ``y'`` from ``x'``; the statistics above are transformed
    exactly (affine maps of sums), so the normalisations must be fitted first (``Stitcher.fit_normalization``,
    identical on every rank). The intercept is fitted iff the core has a bias (``affine``); a ``linear`` core
    is fitted without one (uncentred moments), its centring then comes from the feature norms.

Methods (``METHODS``)
    ``lstsq``      ``W = argmin ‖X'W − Y'‖²``. Rank-deficient ``X'ᵀX'`` (fewer rows than features, duplicated or
                   dead features) has no unique solution: a warning is issued and the fit falls back to ridge
                   with ``λ = RANK_FALLBACK_RIDGE`` (relative, see below), the minimum-norm-like regularised
                   answer.
    ``ridge``      ``W = (X'ᵀX'/n + λ·τ·I)⁻¹ X'ᵀY'/n`` with ``τ = tr(X'ᵀX'/n)/Dx`` (the mean feature variance),
                   so ``λ`` is *relative*: the same grid means the same thing for any feature scale. With a
                   grid, every ``λ`` is solved (one Cholesky factorisation each) and the best on held-out features is
                   kept (``select_by``: ``recall@1`` of stitched source → target retrieval, the metric
                   stitchers are judged by, ties broken by lower MSE; or ``mse``). The grid must be non-empty,
                   finite and positive (λ = 0 is ``lstsq``). Then, by default, the retrieval tuning below.
    ``procrustes`` ``W = s · U Vᵀ`` from the SVD ``X'ᵀY' = U Σ Vᵀ`` (centred when the intercept is fitted or
                   ``center=True``). ``scaling``: ``none`` (a pure rotation), ``isotropic`` (one optimal global
                   scale ``s = tr Σ / tr(Qᵀ X'ᵀX' Q)``) or ``standard`` (both sides z-scored per feature before the
                   rotation; the map is then ``D_x⁻¹ Q D_y``). Unequal widths: zero-pad the narrower side to the
                   wider width, solve the square orthogonal problem, crop back to ``Dx × Dy``. The cropped block is
                   ``U Vᵀ`` of the thin SVD (the padded zero directions add nothing to ``X'ᵀY'``), a semi-orthogonal
                   map maximising ``tr(Wᵀ X'ᵀY')``. For ``Dx ≤ Dy`` (orthonormal rows, ``‖X'W‖ = ‖X'‖``) it is also
                   the least-squares optimum among such maps; for ``Dx > Dy`` it is the padded problem's optimum,
                   which also asks the dropped source directions to map to zero, so it is *not* the minimum-error
                   semi-orthogonal projection (that one has no closed form). Use ``ridge`` when error matters more
                   than orthogonality.

Retrieval tuning of ridge (``gain``, ``whiten``; default ``"auto"``)
    Ridge predicts the conditional mean: MSE-optimal, not ranking-optimal for cosine retrieval. When target
    features share a mean much larger than their spread, every target cosine is near 1 and a candidate's score
    ``p·ŷ_j`` is decided by small deviations: the plain prediction's deviations are shrunk towards the mean (too
    timid next to the shared-mean term, whose contribution varies with each candidate's norm and carries no
    pairing information) and weighted by target variance, so a few high-variance target directions outvote the
    low-variance ones that carry as much pairing information. Two closed-form corrections of the solved ``W``
    (the stitcher then outputs ``ȳ' + g·(x' − x̄')·W_v``, written into the ordinary core weight and bias):

    * **deviation gain** ``g``: ``W ← g·W``, intercept ``ȳ' − g·x̄'W`` (the mean source still maps to the mean
      target; only deviations scale). What contrastive training does implicitly. A core without bias has no
      separate mean part: there ``g`` scales the whole core output (cosine-invariant when the input norm centres).
    * **target whitening** ``w``: ``W ← κ·W·(C' + w·τ_y·I)⁻¹`` with ``C'`` the target covariance (in the output
      norm's space), ``τ_y`` its mean eigenvalue and ``κ`` restoring the prediction's spread. The score becomes
      ``x'ᵀ Σx⁻¹ Σxy Σy⁻¹ y``, the CCA score (each canonical pair weighted by its correlation, not its variance);
      ``w`` regularises the inverse. It needs the full ``YᵀY``, which the pass accumulates (Dy², cheap for Dy < Dx).

    With ``"auto"``, held-out features and ``select_by="recall@1"``, the pairs ``WHITEN_GRID × GAIN_GRID`` are
    scored at the chosen ridge strength by recall@1 (ties: lower MSE) on ``SELECT_ROWS`` evenly strided held-out
    rows, one similarity matrix per whitening (see ``_tune``). Without held-out features or with ``select_by="mse"``
    ``"auto"`` means the plain ridge (``g = 1``, no whitening), bit for bit; fixed numbers apply without selection.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from prh_stitch.stitchers import Stitcher

__all__ = [
    "METHODS", "PRECISIONS", "SELECT_BY", "SCALINGS", "DEFAULT_RIDGE_GRID", "RANK_FALLBACK_RIDGE",
    "NormalEquations", "ClosedFormResult", "fit_closed_form", "check_ridge_grid", "GAIN_GRID", "WHITEN_GRID",
    "SELECT_ROWS", "check_gain", "check_whiten",
]

METHODS = ("lstsq", "ridge", "procrustes")
PRECISIONS = ("float64", "mixed")
SELECT_BY = ("recall@1", "mse")
SCALINGS = ("none", "isotropic", "standard")
DEFAULT_RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2)
# Relative ridge used when least squares is rank-deficient: small enough to leave well-determined directions
# untouched (relative to the mean variance), large enough to make the system solvable in float64.
RANK_FALLBACK_RIDGE = 1e-6
# Eigenvalues below this fraction of the largest count as zero (float64 round-off on an N x D Gram matrix).
RANK_RTOL = 1e-10
# Retrieval tuning of a ridge fit (gain="auto" / whiten="auto"): gains from slightly below the MSE fit's own
# spread (1) to the deviations exaggerated 8x; whitening strengths strong (1e-2 of the mean target variance added
# to every eigenvalue) and mild (1.0: directions below the mean variance are boosted, not equalised); None = none.
# Each whitening costs one SELECT_ROWS² similarity matrix, each gain only a pass over it.
GAIN_GRID = (0.5, 1.0, 2.0, 4.0, 8.0)
WHITEN_GRID = (None, 1e-2, 1.0)
# Held-out rows the tuning scores on (evenly strided): "a few thousand" keeps each candidate's similarity matrix
# cheap (4096² scores) while recall@1 among 4096 candidates still separates the variants.
SELECT_ROWS = 4096

Pairs = Union[Tuple[Tensor, Tensor], "NormalEquations", Iterable[Tuple[Tensor, Tensor]]]


class NormalEquations:
    """Float64 sums of paired features ``x`` (N × Dx) and ``y`` (N × Dy): enough for every linear fit here."""

    def __init__(self, in_dim: int, out_dim: int, device: Union[str, torch.device] = "cpu",
                 precision: str = "float64") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        self.precision = precision
        f64 = {"dtype": torch.float64, "device": device}
        # The count is a tensor too, so one all_reduce covers it like the other sums.
        self.count = torch.zeros((), **f64)
        self.sum_x = torch.zeros(self.in_dim, **f64)
        self.sum_y = torch.zeros(self.out_dim, **f64)
        self.xtx = torch.zeros(self.in_dim, self.in_dim, **f64)
        self.xty = torch.zeros(self.in_dim, self.out_dim, **f64)
        self.sum_yy = torch.zeros(self.out_dim, **f64)
        # The target Gram matrix: only Dy x Dy (a few % of the pass's work for Dy < Dx), it gives the target
        # covariance that the retrieval-aware whitening of a ridge fit needs (see ``whiten``).
        self.yty = torch.zeros(self.out_dim, self.out_dim, **f64)

    def _tensors(self) -> Tuple[Tensor, ...]:
        return (self.count, self.sum_x, self.sum_y, self.xtx, self.xty, self.sum_yy, self.yty)

    @property
    def n(self) -> int:
        return int(round(float(self.count)))

    @torch.no_grad()
    def update(self, x: Tensor, y: Tensor) -> "NormalEquations":
        """Add a chunk of paired rows."""
        if x.ndim != 2 or y.ndim != 2 or x.shape[1] != self.in_dim or y.shape[1] != self.out_dim:
            raise ValueError(f"expected paired chunks of shape (n, {self.in_dim}) and (n, {self.out_dim}), got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"paired chunks must have the same number of rows, got {x.shape[0]} and {y.shape[0]}")
        x = x.detach().to(self.xtx.device, torch.float64)
        y = y.detach().to(self.xtx.device, torch.float64)
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise ValueError("features contain NaN or Inf; a closed-form fit needs finite features")
        self.count += x.shape[0]
        self.sum_x += x.sum(0)
        self.sum_y += y.sum(0)
        self.sum_yy += y.square().sum(0)
        if self.precision == "float64":
            self.xtx.addmm_(x.T, x)
            self.xty.addmm_(x.T, y)
            self.yty.addmm_(y.T, y)
            return self
        # "mixed": the products of rows centred on the chunk's own (float32-rounded) mean run in float32, where
        # the entries are small and cancel little, and the exact corrections back to raw sums
        # (x = d + c  =>  Σxxᵀ = dᵀd + c(Σd)ᵀ + (Σd)cᵀ + n·ccᵀ) are added in float64.
        n = x.shape[0]
        cx, cy = x.mean(0).float().double(), y.mean(0).float().double()
        dx, dy = (x - cx).float(), (y - cy).float()
        sdx, sdy = dx.double().sum(0), dy.double().sum(0)
        self.xtx += (dx.T @ dx).double() + torch.outer(cx, sdx) + torch.outer(sdx, cx) + n * torch.outer(cx, cx)
        self.xty += (dx.T @ dy).double() + torch.outer(cx, sdy) + torch.outer(sdx, cy) + n * torch.outer(cx, cy)
        self.yty += (dy.T @ dy).double() + torch.outer(cy, sdy) + torch.outer(sdy, cy) + n * torch.outer(cy, cy)
        return self

    @classmethod
    def from_pairs(cls, pairs: Pairs, chunk_rows: int = 16384, precision: str = "float64") -> "NormalEquations":
        """From ``(x, y)`` tensors (processed in ``chunk_rows`` chunks) or an iterable of ``(x, y)`` chunks."""
        if isinstance(pairs, NormalEquations):
            return pairs
        if isinstance(pairs, tuple) and len(pairs) == 2 and all(isinstance(t, Tensor) for t in pairs):
            x, y = pairs
            pairs = zip(x.split(chunk_rows), y.split(chunk_rows))
        stats: Optional[NormalEquations] = None
        for x, y in pairs:
            if stats is None:
                stats = cls(x.shape[-1], y.shape[-1], precision=precision)
            stats.update(x, y)
        if stats is None or stats.n == 0:
            raise ValueError("no training pairs were given to the closed-form fit")
        return stats

    def merge(self, other: "NormalEquations") -> "NormalEquations":
        """Add another accumulator's sums (e.g. from another shard)."""
        if (other.in_dim, other.out_dim) != (self.in_dim, self.out_dim):
            raise ValueError(f"cannot merge {other.in_dim}->{other.out_dim} statistics into {self.in_dim}->{self.out_dim}")
        for mine, theirs in zip(self._tensors(), other._tensors()):
            mine += theirs.to(mine.device)
        return self

    def all_reduce(self, group=None) -> "NormalEquations":
        """Sum the statistics over all processes of ``group`` (no-op outside torch.distributed).

        NCCL reduces only GPU tensors, so the sums travel through the current CUDA device there and come back.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        via_cuda = dist.get_backend(group) == "nccl" and self.xtx.device.type != "cuda"
        for tensor in self._tensors():
            work = tensor.cuda() if via_cuda else tensor
            dist.all_reduce(work, op=dist.ReduceOp.SUM, group=group)
            if via_cuda:
                tensor.copy_(work)
        return self

    # ---- moments in a normalised space ---------------------------------------------------------
    def moments(self, shift_x: Tensor, scale_x: Tensor, shift_y: Tensor, scale_y: Tensor, center: bool
                ) -> "_Moments":
        """Per-sample second moments of ``x' = (x − shift_x)/scale_x``, ``y' = (y − shift_y)/scale_y``.

        ``center=True``: covariances around the means (for a fit with intercept); else raw moments about 0.
        """
        n = float(self.count)
        if n < 1:
            raise ValueError("no training pairs were accumulated")
        f64 = lambda t: t.detach().to(self.xtx.device, torch.float64)  # noqa: E731
        shift_x, scale_x, shift_y, scale_y = map(f64, (shift_x, scale_x, shift_y, scale_y))
        mean_x, mean_y = self.sum_x / n, self.sum_y / n
        cov_xx = self.xtx / n - torch.outer(mean_x, mean_x)
        cov_xy = self.xty / n - torch.outer(mean_x, mean_y)
        var_y = self.sum_yy / n - mean_y.square()
        cov_yy = self.yty / n - torch.outer(mean_y, mean_y)
        cov_yy = (cov_yy + cov_yy.T) / 2 / torch.outer(scale_y, scale_y)  # always about the mean: the spread
        if not center:  # raw moments about the normalisation's shift: covariance plus the offset's outer product
            dx, dy = mean_x - shift_x, mean_y - shift_y
            cov_xx = cov_xx + torch.outer(dx, dx)
            cov_xy = cov_xy + torch.outer(dx, dy)
            var_y = var_y + dy.square()
        cov_xx = (cov_xx + cov_xx.T) / 2  # exact symmetry for the factorisations
        return _Moments(
            n=n,
            mean_x=(mean_x - shift_x) / scale_x,
            mean_y=(mean_y - shift_y) / scale_y,
            xx=cov_xx / torch.outer(scale_x, scale_x),
            xy=cov_xy / torch.outer(scale_x, scale_y),
            yy=var_y / scale_y.square(),
            cov_yy=cov_yy,
        )


@dataclass
class _Moments:
    n: float
    mean_x: Tensor
    mean_y: Tensor
    xx: Tensor  # Dx x Dx, per sample
    xy: Tensor  # Dx x Dy, per sample
    yy: Tensor  # Dy, per-feature second moment
    cov_yy: Tensor  # Dy x Dy target covariance (about the mean whatever ``center``), per sample


@dataclass
class ClosedFormResult:
    """What a closed-form fit did: method, chosen ridge (relative), held-out scores per grid value."""

    method: str
    ridge: Optional[float] = None
    select_by: Optional[str] = None
    scores: Dict[str, float] = field(default_factory=dict)  # str(lambda) -> held-out score
    rank_deficient: bool = False
    n_train: int = 0
    scaling: Optional[str] = None
    gain: Optional[float] = None  # ridge only: the deviation gain written (1.0 = plain ridge)
    whiten: Optional[float] = None  # ridge only: relative target-whitening strength written (None = none)
    tuning_scores: Dict[str, float] = field(default_factory=dict)  # "whiten=..,gain=.." -> held-out recall@1

    def as_dict(self) -> dict:
        return asdict(self)


def check_ridge_grid(grid: Sequence[float]) -> Tuple[float, ...]:
    """A non-empty sequence of finite, positive relative ridge strengths (sorted, deduplicated)."""
    try:
        values = [float(v) for v in grid]
    except (TypeError, ValueError):
        raise ValueError(f"ridge_grid must be a list of numbers, e.g. [1e-4, 1e-2, 1.0], got {grid!r}") from None
    if not values:
        raise ValueError("ridge_grid is empty; give at least one positive ridge strength, e.g. [1e-4, 1e-2, 1.0]")
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if bad:
        raise ValueError(f"ridge_grid values must be finite and > 0 (use method 'lstsq' for no ridge), got {bad}; "
                         "e.g. [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]")
    return tuple(sorted(set(values)))


def check_gain(gain: Union[str, float, None]) -> Union[str, float]:
    """``"auto"``, or a finite gain > 0 (None = 1.0, the plain ridge)."""
    if gain is None:
        return 1.0
    if isinstance(gain, str) and gain == "auto":
        return gain
    value = _positive_number(gain)
    if value is None:
        raise ValueError(f"gain must be 'auto', a finite number > 0 (1.0 = plain ridge) or null, got {gain!r}")
    return value


def check_whiten(whiten: Union[str, float, None]) -> Union[str, float, None]:
    """``"auto"``, None (no whitening) or a finite relative whitening strength > 0."""
    if whiten is None or (isinstance(whiten, str) and whiten == "auto"):
        return whiten
    value = _positive_number(whiten)
    if value is None:
        raise ValueError(f"whiten must be 'auto', null (no whitening) or a finite relative strength > 0 "
                         f"(e.g. 1e-3), got {whiten!r}")
    return value


def _positive_number(value) -> Optional[float]:
    if isinstance(value, (bool, str)):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _linear_core(stitcher: Stitcher):
    core = stitcher.core
    if not isinstance(core, torch.nn.Linear):
        raise ValueError(f"closed-form fits write a single linear map: use stitcher 'linear' or 'affine', "
                         f"not {stitcher.name!r} (or train it with fit: gradient)")
    return core


def _check_norms(stitcher: Stitcher) -> None:
    for norm, side in ((stitcher.input_norm, "input"), (stitcher.output_norm, "output")):
        if not norm.is_fitted:
            raise ValueError(f"the stitcher's {side} normalization ({norm.kind!r}) is not fitted; call "
                             "stitcher.fit_normalization(source, target) on the training features first")


@torch.no_grad()
def _write(stitcher: Stitcher, weight: Tensor, bias: Optional[Tensor]) -> None:
    core = _linear_core(stitcher)
    core.weight.copy_(weight.T)  # ours is x @ W (Dx x Dy); nn.Linear stores W^T
    if core.bias is not None:
        core.bias.copy_(bias if bias is not None else torch.zeros(core.out_features, dtype=torch.float64))


def _intercept(m: _Moments, weight: Tensor, fit_bias: bool) -> Optional[Tensor]:
    return m.mean_y - m.mean_x @ weight if fit_bias else None


class _RidgePath:
    """``W(λ) = (A + λτI)⁻¹ B`` by one Cholesky factorisation per λ.

    A Cholesky factorisation costs ``D³/3`` and parallelises well; an eigendecomposition reused over the grid costs
    ~9·D³ up front, so the grid sizes used in practice (< 20 values) are cheaper this way.
    """

    def __init__(self, m: _Moments) -> None:
        self.a, self.b = m.xx, m.xy
        self.tau = float(m.xx.diagonal().mean()) or 1.0  # all-zero features: any scale works

    def rank_deficient(self) -> bool:
        """Whether ``A`` is numerically singular: a pivot of its Cholesky factorisation is (close to) zero.

        Without pivoting, a column that depends on earlier ones leaves a zero Schur complement, so its pivot
        vanishes (or goes negative by round-off, which cholesky_ex reports as a failure).
        """
        factor, info = torch.linalg.cholesky_ex(self.a)
        if int(info) != 0:
            return True
        pivots = factor.diagonal().square()
        return bool(pivots.min() <= RANK_RTOL * max(float(self.a.diagonal().max()), 1e-300))

    def solve(self, ridge: float) -> Tensor:
        eye = torch.eye(len(self.a), dtype=self.a.dtype, device=self.a.device)
        return torch.cholesky_solve(self.b, torch.linalg.cholesky(self.a + (ridge * self.tau) * eye))


class _RetrievalTransform:
    """A ridge map's centred part under target whitening and a gain: ``W_v = g · κ · W · (C' + w·τ_y·I)⁻¹``.

    ``C'`` is the target covariance in the output norm's space, ``τ_y = tr(C')/Dy`` makes ``w`` relative, and
    ``κ`` restores the ridge prediction's spread (``tr(W_vᵀ A W_v) = tr(Wᵀ A W)`` at g = 1), so gains mean the
    same with or without whitening. One eigendecomposition of the Dy × Dy ``C'`` serves every ``w``.
    """

    def __init__(self, m: _Moments, weight: Tensor) -> None:
        self.m, self.weight = m, weight
        evals, self.evecs = torch.linalg.eigh(m.cov_yy)
        self.evals = evals.clamp_min(0)  # round-off can leave tiny negative eigenvalues of a PSD matrix
        self.tau_y = float(self.evals.mean()) or 1.0
        self.spread = float(torch.einsum("ij,ik,kj->", weight, m.xx, weight))

    def target_map(self, whiten: Optional[float]) -> Optional[Tensor]:
        """The Dy × Dy map ``κ (C' + wτ_y I)⁻¹`` applied after ``W`` (None: no whitening)."""
        if whiten is None:
            return None
        q = self.evecs
        t = (q / (self.evals + whiten * self.tau_y)) @ q.T
        whitened = self.weight @ t
        spread = float(torch.einsum("ij,ik,kj->", whitened, self.m.xx, whitened))
        return t * math.sqrt(self.spread / spread) if spread > 0 and self.spread > 0 else t

    def weight_for(self, whiten: Optional[float], gain: float) -> Tensor:
        if whiten is None and gain == 1.0:
            return self.weight  # the plain ridge, bit for bit
        t = self.target_map(whiten)
        return gain * (self.weight if t is None else self.weight @ t)


@torch.no_grad()
def _tune(stitcher: Stitcher, transform: _RetrievalTransform, fit_bias: bool, val: Tuple[Tensor, Tensor],
          groups: Optional[Tensor], whitens: Sequence[Optional[float]], gains: Sequence[float]
          ) -> Tuple[Tuple[Optional[float], float], Dict[str, float]]:
    """Held-out recall@1 (ties: lower MSE) of every (whiten, gain) on ``SELECT_ROWS`` strided rows of ``val``.

    The stitched output is ``μ + g·e_i`` (``μ`` the output for the mean source, ``e_i`` row i's deviation), so the
    cosine score of candidate j is ``(μ·ŷ_j + g·e_i·ŷ_j) / ‖μ + g·e_i‖``; the denominator is the same for every
    candidate of a query, so one similarity matrix ``E Ŷᵀ`` per whitening ranks all gains. A query's recall@1 is
    1 iff its first best-scoring candidate (argmax, lowest index on ties) is correct: the metric's tie rule.
    """
    x, y = val
    rows = torch.linspace(0, len(x) - 1, min(len(x), SELECT_ROWS)).round().long()
    x, y = x[rows], y[rows]
    groups = None if groups is None else groups[rows]
    device = transform.weight.device
    f64 = {"dtype": torch.float64, "device": device}
    onorm = stitcher.output_norm
    xs = stitcher.input_norm(x.to(stitcher.input_norm.mean.device, torch.float32)).to(**f64)  # norm where its buffers are
    shift, scale = onorm.mean.to(**f64), onorm.scale.to(**f64)
    m = transform.m
    if fit_bias:  # core output = ȳ' + g·(x' − x̄')W_v; a core without bias has no separate mean part
        centred, mean_out = xs - m.mean_x, m.mean_y * scale + shift
    else:
        centred, mean_out = xs, shift
    base = centred @ transform.weight
    y64 = y.to(**f64)
    unit_y = torch.nn.functional.normalize(y64, dim=1).float()
    mean_score = unit_y @ mean_out.float()
    residual = mean_out - y64
    cells = len(y) * y.shape[1]
    cols = torch.arange(len(y), device=device)
    correct = (lambda top: top == cols) if groups is None else (lambda top: groups[top] == groups.to(device))
    scores, best_key, best = {}, None, None
    for whiten in whitens:
        t = transform.target_map(whiten)
        dev = (base if t is None else base @ t) * scale
        sim = dev.float() @ unit_y.T
        sq, cross, dd = float(residual.square().sum()), float((dev * residual).sum()), float(dev.square().sum())
        # No mean part (a core without bias, output norm without shift): a gain rescales whole outputs, which
        # cosine ignores, so one ranking serves every gain and only the MSE tells them apart.
        shared = None if bool(mean_score.any()) else float(correct(sim.argmax(1)).double().mean())
        for gain in gains:
            r1 = shared if shared is not None else float(correct((sim * gain + mean_score).argmax(1)).double().mean())
            mse = (sq + 2 * gain * cross + gain * gain * dd) / cells
            scores[f"whiten={whiten!r},gain={gain!r}"] = r1
            key = (-r1, mse)
            if best_key is None or key < best_key:
                best_key, best = key, (whiten, gain)
    return best, scores


def _procrustes(m: _Moments, scaling: str) -> Tensor:
    xy = m.xy
    if scaling == "standard":
        sx = m.xx.diagonal().clamp_min(1e-24).sqrt()
        # Root mean squares in the same frame as the moments (about the mean when centred, about 0 otherwise).
        sy = m.yy.clamp_min(1e-24).sqrt()
        xy = xy / torch.outer(sx, sy)
    u, s, vh = torch.linalg.svd(xy, full_matrices=False)
    q = u @ vh
    if scaling == "standard":
        return q / sx[:, None] * sy[None, :]
    if scaling == "isotropic":
        denominator = float(torch.einsum("ij,ik,kj->", q, m.xx, q))
        return q * (float(s.sum()) / denominator if denominator > 0 else 1.0)
    return q


@torch.no_grad()
def _score(stitcher: Stitcher, val: Tuple[Tensor, Tensor], groups: Optional[Tensor]) -> Tuple[float, float]:
    from prh_stitch.metrics.retrieval import ranks

    device = stitcher.core.weight.device
    x, y = (t.to(device, torch.float32) for t in val)
    was_training = stitcher.training
    pred = stitcher.eval()(x)
    stitcher.train(was_training)
    mse = float((pred.double() - y.double()).square().mean())
    # Source -> target only, as val/recall@1 is: the same ranks the retrieval metric computes, half the work.
    unit = lambda t: torch.nn.functional.normalize(t, dim=1)  # noqa: E731
    rank = ranks(unit(pred), unit(y), None if groups is None else groups.to(device))
    return float((rank <= 1).double().mean()), mse


def fit_closed_form(
    stitcher: Stitcher,
    train: Pairs,
    method: str = "ridge",
    *,
    val: Optional[Tuple[Tensor, Tensor]] = None,
    val_groups: Optional[Tensor] = None,
    ridge: Optional[float] = None,
    ridge_grid: Sequence[float] = DEFAULT_RIDGE_GRID,
    select_by: str = "recall@1",
    scaling: str = "none",
    center: Optional[bool] = None,
    chunk_rows: int = 16384,
    precision: str = "float64",
    distributed: bool = False,
    gain: Union[str, float, None] = "auto",
    whiten: Union[str, float, None] = "auto",
) -> ClosedFormResult:
    """Fit ``stitcher``'s linear core in closed form and write its weight (and bias) in place.

    Args:
        stitcher: a ``linear`` or ``affine`` :class:`Stitcher` whose normalisations are fitted.
        train: ``(source, target)`` tensors, an iterable of such chunks, or a :class:`NormalEquations`.
        method: ``lstsq``, ``ridge`` or ``procrustes`` (see the module docstring).
        val: held-out ``(source, target)`` features to choose the ridge strength from ``ridge_grid``
            (needed when the grid has more than one value and ``ridge`` is not given).
        val_groups: caption-group ids of ``val`` rows (same-caption items count as correct in recall@1).
        ridge: a fixed relative ridge strength (skips the grid).
        ridge_grid: candidate relative ridge strengths.
        select_by: ``recall@1`` (higher is better, ties -> lower MSE) or ``mse``.
        scaling: Procrustes scaling: ``none``, ``isotropic`` or ``standard``.
        center: Procrustes centring; None = centre iff the core has a bias. ``True`` without a bias requires
            an input normalisation that centres (``center``/``standard``), since the offset has nowhere to go.
        chunk_rows: rows per chunk when ``train`` is a pair of tensors.
        precision: ``float64`` (every product in float64) or ``mixed`` (products of chunk-centred rows in float32,
            sums in float64: ~2x faster on CPUs, relative error ~1e-6 on the moments; see NormalEquations).
        distributed: all-reduce the statistics over the default process group (each rank passed its shard).
        gain: ridge only: deviation gain ``g`` (the stitcher outputs ``ȳ + g·(x − x̄)W``); ``"auto"`` chooses it from
            ``GAIN_GRID`` by held-out recall@1 when ``val`` is given and ``select_by="recall@1"`` (else 1.0);
            a number fixes it; None or 1.0 is the plain ridge.
        whiten: ridge only: relative target-whitening strength (``W ← κ·W(C' + w·τ_y·I)⁻¹``); ``"auto"`` chooses it
            from ``WHITEN_GRID`` (None included) jointly with the gain, under the same conditions; None: none.
    """
    if method not in METHODS:
        raise ValueError(f"unknown closed-form method {method!r}; choose one of {', '.join(METHODS)}")
    if select_by not in SELECT_BY:
        raise ValueError(f"unknown select_by {select_by!r}; choose one of {', '.join(SELECT_BY)}")
    if scaling not in SCALINGS:
        raise ValueError(f"unknown Procrustes scaling {scaling!r}; choose one of {', '.join(SCALINGS)}")
    gain, whiten = check_gain(gain), check_whiten(whiten)
    if method != "ridge" and (gain not in ("auto", 1.0) or whiten not in ("auto", None)):
        raise ValueError(f"gain and whiten tune a ridge fit for retrieval; method {method!r} takes neither "
                         "(use method 'ridge', or leave them at 'auto')")
    core = _linear_core(stitcher)
    _check_norms(stitcher)
    fit_bias = core.bias is not None
    if method == "procrustes":
        if center is None:
            center = fit_bias
        elif center and not fit_bias and stitcher.input_norm.kind == "none":
            raise ValueError("Procrustes with center=True needs somewhere to put the offset: use the 'affine' "
                             "stitcher, or input_norm 'center'/'standard' with the 'linear' one")
    else:
        center = fit_bias
    stats = NormalEquations.from_pairs(train, chunk_rows, precision)
    if (stats.in_dim, stats.out_dim) != (stitcher.in_dim, stitcher.out_dim):
        raise ValueError(f"features are {stats.in_dim}-d -> {stats.out_dim}-d but the stitcher maps "
                         f"{stitcher.in_dim}-d -> {stitcher.out_dim}-d")
    if distributed:
        stats.all_reduce()
    inorm, onorm = stitcher.input_norm, stitcher.output_norm
    m = stats.moments(inorm.mean, inorm.scale, onorm.mean, onorm.scale, center=bool(center))
    result = ClosedFormResult(method=method, n_train=stats.n)

    if method == "procrustes":
        result.scaling = scaling
        weight = _procrustes(m, scaling)
        _write(stitcher, weight, _intercept(m, weight, fit_bias))
        return result

    path = _RidgePath(m)
    if method == "lstsq":
        lam = 0.0
        if path.rank_deficient():
            warnings.warn(
                f"least squares: the {stats.in_dim}x{stats.in_dim} source Gram matrix is rank-deficient "
                f"({stats.n} rows; duplicated or constant features?), so the solution is not unique; falling "
                f"back to ridge with relative strength {RANK_FALLBACK_RIDGE:g}",
                RuntimeWarning, stacklevel=2)
            lam = RANK_FALLBACK_RIDGE
            result.rank_deficient = True
        result.ridge = lam
        weight = path.solve(lam)
        _write(stitcher, weight, _intercept(m, weight, fit_bias))
        return result

    grid = check_ridge_grid([ridge] if ridge is not None else ridge_grid)
    if len(grid) == 1:
        result.ridge = grid[0]
        weight = path.solve(grid[0])
    else:
        weight = _select_ridge(stitcher, path, m, grid, fit_bias, val, val_groups, select_by, result)
    # Retrieval tuning of the chosen ridge: only with held-out features and a retrieval criterion to judge by.
    tune = val is not None and select_by == "recall@1"
    gains = GAIN_GRID if gain == "auto" and tune else ((1.0,) if gain == "auto" else (gain,))
    whitens = WHITEN_GRID if whiten == "auto" and tune else ((None,) if whiten == "auto" else (whiten,))
    transform = _RetrievalTransform(m, weight)
    if len(gains) * len(whitens) > 1:
        (result.whiten, result.gain), result.tuning_scores = _tune(
            stitcher, transform, fit_bias, val, val_groups, whitens, gains)
        result.select_by = select_by
    else:
        result.whiten, result.gain = whitens[0], gains[0]
    weight = transform.weight_for(result.whiten, result.gain)
    _write(stitcher, weight, _intercept(m, weight, fit_bias))
    return result


def _select_ridge(stitcher: Stitcher, path: _RidgePath, m: _Moments, grid: Sequence[float], fit_bias: bool,
                  val: Optional[Tuple[Tensor, Tensor]], val_groups: Optional[Tensor], select_by: str,
                  result: ClosedFormResult) -> Tensor:
    """The plain ridge weight of the grid value scoring best on ``val`` (recorded in ``result``)."""
    if val is None:
        raise ValueError(f"choosing the ridge strength from a grid of {len(grid)} values needs held-out features "
                         "(val=(source, target)); or give one value with ridge=...")
    result.select_by = select_by
    best_key, best_weight = None, None
    for lam in grid:
        weight = path.solve(lam)
        _write(stitcher, weight, _intercept(m, weight, fit_bias))
        r1, mse = _score(stitcher, val, val_groups)
        result.scores[repr(lam)] = r1 if select_by == "recall@1" else mse
        key = (-r1, mse) if select_by == "recall@1" else (mse,)
        if best_key is None or key < best_key:
            best_key, best_weight, result.ridge = key, weight, lam
    return best_weight
