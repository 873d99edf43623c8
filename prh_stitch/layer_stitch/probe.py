"""A linear probe on B's pre-logits features: how ``target: labels`` scores a network on the data's own classes
(B's head classifies ImageNet, not the data's classes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def fit_probe(features: Tensor, labels: Tensor, num_classes: int, weight_decay: float = 1e-3, steps: int = 200
              ) -> nn.Linear:
    """Multinomial logistic regression on standardised features (full-batch L-BFGS: deterministic), returned as
    one frozen linear layer on the raw features."""
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    x = (features - mean) / std
    probe = nn.Linear(features.shape[1], num_classes)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(x), labels) + weight_decay * probe.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():  # fold the standardisation into the layer so it applies to raw features
        probe.weight.div_(std)
        probe.bias.sub_(probe.weight @ mean)
    return probe.requires_grad_(False)
