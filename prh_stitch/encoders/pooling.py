"""Poolers: turn one layer's output (a token sequence or a spatial map) into one vector per sample.

Every pooler has the same signature ``pool(hidden, mask=None, prefix_tokens=0) -> (B, D)``:
- ``hidden`` is ``(B, T, D)`` (tokens) or ``(B, C, H, W)`` (a convolutional map);
- ``mask`` is the ``(B, T)`` attention mask of a padded text batch (1 = real token), or None;
- ``prefix_tokens`` is how many leading tokens are not patches (a ViT's CLS and register tokens).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from prh_stitch.registry import Registry

Pooler = Callable[..., Tensor]
POOLERS: Registry[Pooler] = Registry("pooling")


def _needs_tokens(hidden: Tensor, pooling: str) -> None:
    if hidden.ndim != 3:
        raise ValueError(
            f"pooling {pooling!r} needs a token sequence (B, T, D), but this layer gives a tensor of shape "
            f"{tuple(hidden.shape)}; use pooling 'mean' for spatial maps"
        )


@POOLERS.register("mean")
def mean_pool(hidden: Tensor, mask: Optional[Tensor] = None, prefix_tokens: int = 0) -> Tensor:
    """Mean over real tokens (padding excluded, prefix tokens excluded), or global average of a map."""
    if hidden.ndim == 4:  # (B, C, H, W) convolutional map: global average pool
        return hidden.mean(dim=(2, 3))
    _needs_tokens(hidden, "mean")
    tokens = hidden[:, prefix_tokens:]
    if mask is None:
        return tokens.mean(dim=1)
    weights = mask[:, prefix_tokens:].to(tokens.dtype).unsqueeze(-1)
    # clamp: a row with no real token would divide by zero; it gets a zero vector, which later checks reject.
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


@POOLERS.register("cls")
def cls_pool(hidden: Tensor, mask: Optional[Tensor] = None, prefix_tokens: int = 0) -> Tensor:
    """The first token: BERT's [CLS], a ViT's class token."""
    _needs_tokens(hidden, "cls")
    return hidden[:, 0]


@POOLERS.register("last")
def last_token_pool(hidden: Tensor, mask: Optional[Tensor] = None, prefix_tokens: int = 0) -> Tensor:
    """The last real token of each row: what a causal language model has read everything up to.

    Works with right and left padding alike, because the position comes from the mask itself.
    """
    _needs_tokens(hidden, "last")
    if mask is None:
        return hidden[:, -1]
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, torch.full_like(positions, -1)).amax(dim=1).clamp_min(0)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def get_pooler(name: str) -> Pooler:
    return POOLERS.get(name)
