"""Input validation shared by every metric: one place, one wording for each problem.

Every public metric calls these before doing any work, so bad input fails fast with a ``ValueError`` that names
the problem (which argument, which row, which sizes) instead of producing a silent NaN later on.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_matrix(x: Tensor, name: str, hint: str = "") -> None:
    """``x`` must be a finite, floating, non-empty 2-D tensor (N × D); ``hint`` is appended to the NaN/Inf error."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N × D) tensor of features, got a {x.ndim}-D tensor of shape "
                         f"{tuple(x.shape)}; use x.unsqueeze(1) for 1-D features")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    # A finite float32 sum proves every element finite (NaN and ±Inf propagate); only a non-finite sum, which
    # can also come from overflow, needs the elementwise check.
    if not bool(torch.isfinite(x.sum(dtype=torch.float32))) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf features{hint}")


def check_pair(a: Tensor, b: Tensor) -> int:
    """Both sides valid, same number of rows and same device; returns N."""
    check_matrix(a, "a")
    check_matrix(b, "b")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must have the same number of rows (paired samples): a has {a.shape[0]}, "
                         f"b has {b.shape[0]}")
    if a.device != b.device:
        raise ValueError(f"a and b are on different devices ({a.device} and {b.device})")
    return int(a.shape[0])


def check_k(k: object, n: int, need: int = 1) -> int:
    """k is an integer ≥ 1 and the N − ``need`` other rows can supply k neighbours (N > k)."""
    if k is None:
        raise ValueError("k must be given (number of nearest neighbours); it has no default here")
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an integer, got {k!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got k={k}")
    if n - need < k:
        raise ValueError(f"N must exceed k: k={k} neighbours need at least {k + need} rows, got N={n}")
    return k


def to_float32(x: Tensor, normalize: bool, name: str) -> Tensor:
    """float32 copy of ``x`` (L2-normalised rows when ``normalize``); a zero row cannot be normalised."""
    x = x.detach().to(torch.float32)
    if not normalize:
        return x
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    zero = (norms[:, 0] == 0).nonzero()
    if len(zero):
        rows = zero[:5, 0].tolist()
        raise ValueError(f"{name} has {len(zero)} zero row(s) (first: {rows}); cannot L2-normalise with "
                         f"normalize=True")
    return x / norms


def check_block_size(block_size: object) -> None:
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                   or block_size < 1):
        raise ValueError(f"block_size must be a positive integer or None, got {block_size!r}")
