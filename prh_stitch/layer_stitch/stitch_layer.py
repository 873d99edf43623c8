"""The stitching layer: the only trained part of a stitched network A[:i] -> layer -> B[j:].

Maps take a 1×1 convolution (no bias) and a BatchNorm, after a bilinear resize when A's and B's spatial sizes
differ; token sequences and pooled vectors take a linear map with bias. The usual start is least squares
(Csiszárik et al. 2021): regress B's layer-j activations on A's layer-i ones, one row per pixel or token.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INITS = ("lstsq", "identity", "default")
LSTSQ_RIDGE = 1e-4  # relative to the mean feature variance: solvable when pixels repeat, negligible otherwise


def activation_kind(shape: Sequence[int]) -> str:
    """``map`` (C, H, W), ``tokens`` (T, D) or ``vector`` (D,): the per-sample shape of a cut's output."""
    return {3: "map", 2: "tokens", 1: "vector"}.get(len(shape), "unknown")


def _check_shapes(in_shape: Tuple[int, ...], out_shape: Tuple[int, ...]) -> str:
    kind_in, kind_out = activation_kind(in_shape), activation_kind(out_shape)
    if kind_in != kind_out or kind_in == "unknown":
        raise ValueError(f"cannot stitch a {kind_in} of shape {in_shape} into a {kind_out} of shape {out_shape}: "
                         "both cuts must give spatial maps, both token sequences, or both pooled vectors "
                         "(pick layers of the same kind)")
    if kind_in == "tokens" and in_shape[0] != out_shape[0]:
        raise ValueError(f"cannot stitch {in_shape[0]} tokens into {out_shape[0]}: token sequences must have the "
                         "same length (same patch grid and prefix tokens)")
    return kind_in


class StitchLayer(nn.Module):
    """Maps A's activation (per-sample shape ``in_shape``) to B's (``out_shape``).

    ``init="identity"`` (equal widths only) makes the layer the identity in eval mode, exactly: the BatchNorm's
    weight is ``sqrt(1 + eps)`` against its initial running variance 1. ``init="lstsq"`` starts like ``default``
    (PyTorch's random init); :meth:`init_from_data` then sets it from activations.
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], init: str = "lstsq") -> None:
        super().__init__()
        self.in_shape, self.out_shape = tuple(int(s) for s in in_shape), tuple(int(s) for s in out_shape)
        self.kind = _check_shapes(self.in_shape, self.out_shape)
        if init not in INITS:
            raise ValueError(f"unknown stitch init {init!r}; choose one of {', '.join(INITS)}")
        c_in, c_out = self.widths
        if self.kind == "map":
            self.conv = nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)
            self.bn = nn.BatchNorm2d(c_out)
        else:
            self.linear = nn.Linear(c_in, c_out)
        if init == "identity":
            self._set_identity()

    @property
    def widths(self) -> Tuple[int, int]:
        """Channels (maps) or feature widths (tokens, vectors) in and out."""
        if self.kind == "map":
            return self.in_shape[0], self.out_shape[0]
        return self.in_shape[-1], self.out_shape[-1]

    @torch.no_grad()
    def _set_identity(self) -> None:
        c_in, c_out = self.widths
        if c_in != c_out:
            raise ValueError(f"identity init needs equal widths, got {c_in} -> {c_out}; use init 'default'")
        if self.kind == "map":
            self.conv.weight.copy_(torch.eye(c_in)[:, :, None, None])
            self.bn.weight.fill_((1 + self.bn.eps) ** 0.5)
        else:
            self.linear.weight.copy_(torch.eye(c_in))
            self.linear.bias.zero_()

    def resized(self, x: Tensor) -> Tensor:
        """A map resized (bilinear) to B's spatial size; anything else unchanged."""
        if self.kind == "map" and tuple(x.shape[-2:]) != self.out_shape[1:]:
            x = F.interpolate(x, size=self.out_shape[1:], mode="bilinear", align_corners=False)
        return x

    def forward(self, x: Tensor) -> Tensor:
        if self.kind != "map":
            return self.linear(x)
        return self.bn(self.conv(self.resized(x)))

    def rows(self, x: Tensor) -> Tensor:
        """Activations as rows of features: one row per pixel (maps, after the resize), per token, or per sample."""
        x = self.resized(x.float())
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) if self.kind == "map" else x.reshape(-1, x.shape[-1])

    @torch.no_grad()
    def init_from_data(self, source: Tensor, target: Optional[Tensor], method: str, chunk: int = 64) -> None:
        """Data-dependent start: ``lstsq`` regresses ``target`` activations on ``source`` ones (ridge
        ``LSTSQ_RIDGE``, relative; float64 sums); ``identity`` keeps the identity map.

        For maps, the BatchNorm is then calibrated so that the layer computes that affine map in *both* modes (see
        :meth:`_calibrate_batchnorm`). Without this, training-mode BatchNorm would first normalise the carefully
        initialised map away, and short training would start from scratch.
        """
        bias = torch.zeros(self.widths[1], dtype=torch.float64)
        if method == "lstsq":
            weight, bias = self._least_squares(source, target, chunk)
            if self.kind == "map":
                self.conv.weight.copy_(weight[:, :, None, None])
            else:
                self.linear.weight.copy_(weight)
                self.linear.bias.copy_(bias)
        elif method != "identity":
            raise ValueError(f"unknown data-dependent init {method!r}; choose 'lstsq' or 'identity'")
        if self.kind == "map":
            self._calibrate_batchnorm(source, bias.double(), chunk)

    def _least_squares(self, source: Tensor, target: Tensor, chunk: int) -> Tuple[Tensor, Tensor]:
        """``(weight (out, in), bias (out,))`` of the ridge regression of target rows on source rows."""
        from prh_stitch.closed_form import fit_closed_form
        from prh_stitch.stitchers import Stitcher

        vehicle = Stitcher("affine", *self.widths)
        pairs = ((self.rows(x), self.rows(y)) for x, y in zip(source.split(chunk), target.split(chunk)))
        fit_closed_form(vehicle, pairs, "ridge", ridge=LSTSQ_RIDGE, gain=None, whiten=None)
        return vehicle.core.weight, vehicle.core.bias

    def _conv_moments(self, source: Tensor, chunk: int) -> Tuple[Tensor, Tensor]:
        """Per-channel mean and (biased) variance of ``conv(x)`` over every pixel of ``source``, in float64."""
        width = self.widths[1]
        count, total, squares = 0, torch.zeros(width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64)
        device = self.conv.weight.device
        for x in source.split(chunk):
            z = self.conv(self.resized(x.to(device).float())).double().cpu()
            count += z.shape[0] * z.shape[2] * z.shape[3]
            total += z.sum((0, 2, 3))
            squares += z.square().sum((0, 2, 3))
        mean = total / count
        return mean, (squares / count - mean.square()).clamp_min(0)

    def _calibrate_batchnorm(self, source: Tensor, bias: Tensor, chunk: int) -> None:
        """Running statistics = those of ``conv(x)`` over ``source``; affine parameters undo them
        (``γ = sqrt(var + eps)``, ``β = mean + bias``), so eval and training mode both give ``conv(x) + bias``."""
        mean, var = self._conv_moments(source, chunk)
        self.bn.running_mean.copy_(mean)
        self.bn.running_var.copy_(var)
        self.bn.weight.copy_((var + self.bn.eps).sqrt())
        self.bn.bias.copy_(mean + bias)

    @torch.no_grad()
    def precise_batchnorm(self, source: Tensor, chunk: int = 64) -> None:
        """Set the BatchNorm's running statistics to the exact ones of the current ``conv`` over ``source``.

        During training the running averages trail the moving weights (momentum 0.1: the last ~10 steps, each with
        other weights), so eval mode would score a different function from the one trained; recomputing them over
        the training activations ("precise BN", Wu & Johnson 2021) removes the lag. A no-op for non-map layers.
        """
        if self.kind != "map":
            return
        mean, var = self._conv_moments(source, chunk)
        self.bn.running_mean.copy_(mean)
        self.bn.running_var.copy_(var)
