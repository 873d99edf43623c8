"""The zero-competence control: any encoder with its weights replaced by seeded random ones.

Same architecture, same preprocessing, same layers; only the learned weights are gone. Each module is re-initialised
by its own ``reset_parameters`` (PyTorch's default initialisation for that layer type, batch-norm statistics
included); parameters that no module resets (RMSNorm scales, class tokens, position tables) get 1 for norm scales,
0 for biases and N(0, 0.02) otherwise, the common transformer initialisation.
"""

from __future__ import annotations

from typing import Set

import torch
from torch import nn


def randomise_weights(module: nn.Module, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        covered: Set[int] = set()
        for sub in module.modules():
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()
                covered.update(id(p) for p in sub.parameters(recurse=False))
        for name, param in module.named_parameters():
            if id(param) in covered:
                continue
            leaf = name.rsplit(".", 1)[-1]
            if param.ndim == 1 and leaf.endswith("bias"):
                param.zero_()
            elif param.ndim == 1 and "norm" in name.lower():
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
    return module
