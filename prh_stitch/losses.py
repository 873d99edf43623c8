"""Objectives for training a stitcher: ``loss(pred, target) -> scalar``.

``pred`` are stitched source features and ``target`` the target encoder's features for the same
samples, both ``[B, D]``. Regression losses (``mse``, ``cosine``) match each pair on its own;
``contrastive`` (symmetric InfoNCE) only asks that each prediction be closer to its own target than to
the other targets in the batch, which is what retrieval metrics measure.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
import warnings
from typing import Any, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UserError
from .registry import Registry

__all__ = ["LOSSES", "PairLoss", "MSELoss", "CosineLoss", "ContrastiveLoss", "Diverged", "build_loss",
           "check_stitched"]

LOSSES: Registry[type] = Registry("loss")


class PairLoss(nn.Module, ABC):
    """Base class: validates ``(pred, target)`` then calls :meth:`compute`.

    ``check_finite=False`` skips the NaN/Inf check, which costs one device->host sync per call on GPU.
    """

    def __init__(self, check_finite: bool = True) -> None:
        super().__init__()
        self.check_finite = check_finite

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        if pred.shape != target.shape:
            raise ValueError(
                f"{type(self).__name__}: pred and target shapes differ: pred {tuple(pred.shape)} "
                f"vs target {tuple(target.shape)}"
            )
        if pred.ndim < 1 or pred.numel() == 0:
            raise ValueError(f"{type(self).__name__}: expected non-empty [B, D] inputs, got {tuple(pred.shape)}")
        # One combined reduction -> a single sync; which side is bad is only worked out on failure.
        if self.check_finite and not bool(torch.isfinite(pred).all() & torch.isfinite(target).all()):
            bad = [n for n, t in (("pred", pred), ("target", target)) if not bool(torch.isfinite(t).all())]
            raise ValueError(f"{type(self).__name__}: NaN or Inf found in {' and '.join(bad)}")
        return self.compute(pred, target)

    @abstractmethod
    def compute(self, pred: Tensor, target: Tensor) -> Tensor:
        """The loss of already validated ``[B, D]`` inputs."""


class Diverged(UserError):
    """Training blew up: the stitcher's outputs stopped being usable although its inputs are fine."""


def check_stitched(pred: Tensor, source: Tensor, step: int, lr: float) -> None:
    """Raise :class:`Diverged` when the stitcher turned finite, nonzero input rows into non-finite or zero rows.

    Without this, a diverged run surfaces later as a complaint about the data (NaN in ``pred``, or "remove zero
    rows" from the retrieval metrics), although the data is fine and the learning rate is at fault. Bad input rows
    are left to the checks that name the data. One combined reduction: a single device->host sync.
    """
    source_ok = torch.isfinite(source).flatten(1).all(1) & (source.flatten(1) != 0).any(1)
    # Row norms in float32, as the metrics take them: a norm that overflows (outputs around 1e19 and up) or
    # vanishes makes a row unusable although every element is finite.
    norms = torch.linalg.vector_norm(pred.detach().flatten(1).float(), dim=1)
    bad = source_ok & (~torch.isfinite(norms) | (norms == 0))
    if not bool(bad.any()):
        return
    what = ("not finite" if not bool(torch.isfinite(pred[bad]).all()) else
            "so large that their norm overflows float32" if not bool(torch.isfinite(norms[bad]).all()) else "zero")
    raise Diverged(f"training diverged at step {step} (lr {lr:g}): the stitcher's outputs for {int(bad.sum())} of "
                   f"{len(pred)} rows are {what} although their inputs are fine; lower the learning rate "
                   "(--model.lr) or add warmup (--model.warmup_steps); the data is not at fault")


@LOSSES.register("mse")
class MSELoss(PairLoss):
    """Mean over all elements of ``(pred - target)^2``."""

    def compute(self, pred: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(pred, target)


@LOSSES.register("cosine")
class CosineLoss(PairLoss):
    """Mean over rows of ``1 - cos(pred_i, target_i)``; ignores feature norms, as cosine retrieval does."""

    def compute(self, pred: Tensor, target: Tensor) -> Tensor:
        return (1.0 - F.cosine_similarity(pred, target, dim=-1)).mean()


def _gather_rows(x: Tensor, sizes: list[int]) -> Tensor:
    """All-gather ``x`` ([n_rank, D], n_rank may differ per rank) into [sum(sizes), D], with gradients.

    The autograd all_gather needs equal shapes, so every rank pads to the largest batch and the
    padding is sliced away again. Its backward sums every rank's gradient into the local rows.
    """
    # Imported here: only the distributed path needs it, and builds without distributed lack it.
    from torch.distributed.nn.functional import all_gather

    longest = max(sizes)
    padded = F.pad(x, (0, 0, 0, longest - x.shape[0]))
    with warnings.catch_warnings():
        # Deprecated in favour of a private API (_functional_collectives) in recent torch; this one
        # is public and available across the torch versions the package supports.
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
        parts = all_gather(padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


@LOSSES.register("contrastive")
class ContrastiveLoss(PairLoss):
    """Symmetric InfoNCE (CLIP-style) on L2-normalised ``pred``/``target`` with a learned temperature.

    Row ``i`` of ``pred`` must pick target ``i`` out of all targets in the batch, and vice versa; the
    loss is the mean of both cross-entropies. The logit scale (1 / temperature) is learned as
    ``log_logit_scale`` and kept ``<= max_logit_scale``; remember to give this module's parameters to
    the optimiser.

    ``gather_across_ranks=True``: under torch.distributed with world size > 1, both sides are
    all-gathered with gradients so negatives come from the global batch; each rank scores its own
    rows against all global columns. Per-rank batch sizes may differ: each rank returns
    ``world_size / global_batch * sum(its row losses)``, so the mean over ranks (what DDP's gradient
    averaging computes) equals the full-batch loss. With equal batches that is the local mean. The
    per-rank sizes are exchanged each call, which costs one small collective and a host sync.
    """

    def __init__(
        self,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        learn_temperature: bool = True,
        gather_across_ranks: bool = False,
        check_finite: bool = True,
    ) -> None:
        super().__init__(check_finite=check_finite)
        if not init_temperature > 0:
            raise ValueError(f"init_temperature must be > 0, got {init_temperature!r}")
        if not max_logit_scale > 0:
            raise ValueError(f"max_logit_scale must be > 0, got {max_logit_scale!r}")
        self.max_log_scale = math.log(max_logit_scale)
        start = min(math.log(1.0 / init_temperature), self.max_log_scale)
        self.log_logit_scale = nn.Parameter(torch.tensor(start), requires_grad=learn_temperature)
        self.gather_across_ranks = gather_across_ranks

    @property
    def logit_scale(self) -> Tensor:
        return self.log_logit_scale.detach().exp()

    @property
    def temperature(self) -> Tensor:
        """Current temperature as a detached 0-d tensor (loggable without a host sync)."""
        return 1.0 / self.logit_scale

    def compute(self, pred: Tensor, target: Tensor) -> Tensor:
        if pred.ndim != 2:
            raise ValueError(f"contrastive loss expects [B, D] inputs, got {tuple(pred.shape)}")
        # Clamp the parameter itself (as CLIP does after each optimiser step) rather than its use:
        # a clamp inside the graph has zero gradient above the bound, so a parameter that momentum
        # pushed past it would stay stuck there.
        with torch.no_grad():
            self.log_logit_scale.clamp_(max=self.max_log_scale)
        scale = self.log_logit_scale.exp()
        pred = F.normalize(pred, dim=-1)
        target = F.normalize(target, dim=-1)

        all_pred, all_target, offset, weight = pred, target, 0, 1.0 / pred.shape[0]
        if self.gather_across_ranks and dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            if world > 1:
                all_pred, all_target, offset, weight = self._gather(pred, target, world)

        labels = torch.arange(pred.shape[0], device=pred.device) + offset
        row_losses = F.cross_entropy(scale * pred @ all_target.T, labels, reduction="sum")
        col_losses = F.cross_entropy(scale * target @ all_pred.T, labels, reduction="sum")
        return 0.5 * weight * (row_losses + col_losses)

    @staticmethod
    def _gather(pred: Tensor, target: Tensor, world: int) -> Tuple[Tensor, Tensor, int, float]:
        """Global pred/target, this rank's first global row, and the per-row weight world/N."""
        local = torch.tensor([pred.shape[0]], device=pred.device)
        sizes_t = [torch.zeros_like(local) for _ in range(world)]
        dist.all_gather(sizes_t, local)
        sizes = [int(s) for s in torch.cat(sizes_t).tolist()]
        offset = sum(sizes[: dist.get_rank()])
        # Both sides travel in one collective.
        both = _gather_rows(torch.cat([pred, target], dim=-1), sizes)
        all_pred, all_target = both.split(pred.shape[-1], dim=-1)
        return all_pred, all_target, offset, world / sum(sizes)


def build_loss(name: str, **kwargs: Any) -> PairLoss:
    """Instantiate a registered loss; ``None`` kwargs are dropped so the loss's default applies."""
    return LOSSES.get(name)(**{k: v for k, v in kwargs.items() if v is not None})
