"""SVCCA, exactly, on small inputs against a NumPy reference (SVD + whitened cross-covariance), both Gram routes.

The implementation takes the eigenvectors of the smaller Gram matrix (features × features when D ≤ N, samples ×
samples otherwise); both routes are checked, with constant columns, unnormalised rows and permuted prepared sides.
"""

import numpy as np
import pytest
import torch

from prh_stitch.metrics import svcca
from prh_stitch.metrics._spec import spec_of
from prh_stitch.metrics.cca import top_directions
from test_metrics_reference import ref_svcca


def _np(x, normalize=True):
    x = x.double().numpy()
    return x / np.linalg.norm(x, axis=1, keepdims=True) if normalize else x


def _data(n, da, db, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, da, generator=g) * torch.linspace(0.3, 3.0, da) + 1.0
    b = a[:, :db] @ torch.randn(db, db, generator=g) + 0.8 * torch.randn(n, db, generator=g)
    return a, b


@pytest.mark.parametrize("n,da,db,dim", [(30, 6, 5, 1), (30, 6, 5, 3), (25, 7, 7, 5), (9, 12, 10, 4)])
@pytest.mark.parametrize("normalize", [True, False])
def test_svcca_equals_the_reference(n, da, db, dim, normalize):
    a, b = _data(n, da, db, seed=n + dim)
    want = ref_svcca(_np(a, normalize), _np(b, normalize), dim)
    assert 0.02 < want < 0.999  # informative data: neither unrelated nor identical subspaces
    assert svcca(a, b, dim=dim, normalize=normalize) == pytest.approx(want, abs=1e-6)


def test_constant_columns_count_as_absent():
    a, b = _data(20, 5, 5, seed=3)
    a_const = torch.cat([a, torch.full((20, 2), 4.0)], 1)  # two constant columns: z-scored to zero
    assert svcca(a_const, b, dim=3, normalize=False) == pytest.approx(svcca(a, b, dim=3, normalize=False), abs=1e-9)
    with pytest.raises(ValueError, match="fewer than dim=6 independent directions"):
        svcca(a_const, torch.cat([b, b[:, :2] * 2], 1), dim=6, normalize=False)


def test_top_directions_are_an_orthonormal_basis_of_the_top_singular_subspace():
    a, _ = _data(15, 6, 5, seed=1)
    z = a.double() - a.double().mean(0)
    z = z / z.std(0)
    for x in (a, a.T.contiguous()[:, :15][:6]):  # D ≤ N and, for a 6 × 6 slice, the square case
        u = top_directions(x, 3, "x")
        assert u.dtype == torch.float64 and u.shape == (x.shape[0], 3)
        assert torch.allclose(u.T @ u, torch.eye(3, dtype=torch.float64), atol=1e-10)
    u = top_directions(a, 3, "a")
    left = torch.linalg.svd(z, full_matrices=False).U[:, :3]
    # same subspace: the projections onto it agree
    assert torch.allclose(u @ u.T, left @ left.T, atol=1e-5)  # float32 z-scoring


def test_wide_features_take_the_sample_gram_route():
    a, b = _data(8, 20, 15, seed=5)
    for dim in (2, 7):
        assert svcca(a, b, dim=dim) == pytest.approx(ref_svcca(_np(a), _np(b), dim), abs=1e-6)


def test_identical_and_rotated_inputs_score_one_and_permuted_side_matches():
    a, b = _data(16, 5, 5, seed=8)
    assert svcca(a, a.clone(), dim=4, normalize=False) == pytest.approx(1.0, abs=1e-9)
    spec = spec_of(svcca)
    opts = {**spec.defaults, "dim": 3}
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    sa, sb = spec.prepare(a, "a", opts), spec.prepare(b, "b", opts)
    got = spec.pair(sa, spec.permute(sb, perm, opts), opts)
    assert got == pytest.approx(svcca(a, b[perm], dim=3), abs=1e-6)
    assert abs(got - svcca(a, b, dim=3)) > 1e-3
