"""Sufficient statistics of paired features, accumulated in float64 in one streaming pass (mergeable, all-reducible).

The fit needs only these sums; see the package docstring (Statistics) for the precision trade-off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Tuple, Union

import torch
from torch import Tensor

PRECISIONS = ("float64", "mixed")

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

    def update(self, x: Tensor, y: Tensor) -> "NormalEquations":
        """Add a chunk of paired rows."""
        with torch.no_grad():  # a context, not a decorator: mutmut skips decorated functions
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
