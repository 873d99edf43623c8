"""The stitcher side of a closed-form fit: which stitchers qualify, and writing the solved map into the core."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from prh_stitch.closed_form.normal_equations import _Moments
from prh_stitch.stitchers import Stitcher


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


def _write(stitcher: Stitcher, weight: Tensor, bias: Optional[Tensor]) -> None:
    with torch.no_grad():  # a context, not a decorator: mutmut skips decorated functions
        core = _linear_core(stitcher)
        core.weight.copy_(weight.T)  # ours is x @ W (Dx x Dy); nn.Linear stores W^T
        if core.bias is not None:
            core.bias.copy_(bias if bias is not None else torch.zeros(core.out_features, dtype=torch.float64))


def _intercept(m: _Moments, weight: Tensor, fit_bias: bool) -> Optional[Tensor]:
    return m.mean_y - m.mean_x @ weight if fit_bias else None
