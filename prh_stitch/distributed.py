"""The one rank lookup: which process this is, of how many (torch.distributed when initialised, else one)."""

from __future__ import annotations

from typing import Tuple

import torch.distributed as dist


def is_distributed() -> bool:
    """True when torch.distributed is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_world() -> Tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` outside an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
