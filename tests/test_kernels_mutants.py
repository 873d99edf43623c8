"""Kernel-metric behaviour that the mutation run of metrics/kernels.py showed no test pinned down.

Both routes of linear (unbiased) CKA are exact, so a wrong route choice leaves every score unchanged and only
costs time or memory: O(N·D²) in feature space against O(N²·D) over kernel rows. The ``method`` option names the
route, so the prepared side is checked for it: a feature-space side carries ‖AᵀA‖²_F (``gram2``), a kernel-rows
side does not.
"""

import numpy as np
import pytest
import torch

from prh_stitch.metrics import cka, unbiased_cka
from prh_stitch.metrics._spec import spec_of


def _centred_gram2(x):
    x = x.double().numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    x = x - x.mean(0)
    return float(np.linalg.norm(x.T @ x) ** 2)


@pytest.mark.parametrize("fn", [cka, unbiased_cka])
@pytest.mark.parametrize("n,d", [(10, 4), (7, 7), (6, 9)])
def test_the_method_option_picks_the_route_it_names(fn, n, d):
    spec = spec_of(fn)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(n * d))
    for method, feature_space in (("features", True), ("samples", False), ("auto", d <= n)):
        opts = {**spec.defaults, "method": method}
        side = spec.prepare(x, "a", opts)
        assert (side.gram2 is not None) == feature_space, (method, n, d)
        if feature_space:
            assert side.gram2 == pytest.approx(_centred_gram2(x), rel=1e-5)
        # a permuted side keeps its route (‖AᵀA‖_F does not depend on the row order, so it is not recomputed)
        permuted = spec.permute(side, torch.randperm(n, generator=torch.Generator().manual_seed(1)), opts)
        assert permuted.gram2 == side.gram2


def test_the_rbf_kernel_always_takes_the_kernel_rows():
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(2))
    spec = spec_of(cka)
    for method in ("auto", "samples"):
        side = spec.prepare(x, "a", {**spec.defaults, "kernel": "rbf", "method": method})
        assert side.gram2 is None and side.sigma > 0
