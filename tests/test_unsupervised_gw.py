"""The Gromov-Wasserstein init and the mutual-nearest-neighbour criterion on planted problems with known answers.

POT is part of the ``test`` extra (through ``unsupervised``), so these run wherever the suite runs."""

import sys

import pytest
import torch

from prh_stitch.closed_form.unsupervised import UnsupervisedOptions, fit_unsupervised
from prh_stitch.closed_form.unsupervised_gw import gw_coupling, mutual_nn_consistency, require_pot
from prh_stitch.metrics.retrieval import retrieval


def _cloud(n: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    """12 anisotropic Gaussian clusters: a shape without a symmetry a rotation could hide in."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(12, d, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(12, (n,), generator=g)
    return centres[labels] + torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(1.2, 0.4, d)


def _rotation(d: int, seed: int = 1) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_gw_coupling_of_a_permuted_copy_puts_its_mass_on_the_permutation():
    u = torch.nn.functional.normalize(_cloud(60, seed=3), dim=1)
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(4))
    coupling, loss = gw_coupling(u, (u @ _rotation(8))[perm], epsilon=5e-3)
    # A's row i is B's row j with perm[j] == i: the coupling's mass sits there, and the marginals are uniform.
    assert torch.allclose(coupling.sum(1), torch.full((60,), 1 / 60, dtype=torch.float64), atol=1e-6)
    assert (perm[coupling.argmax(1)] == torch.arange(60)).double().mean() > 0.9
    # A rotation keeps every cosine, so the true coupling's GW loss is 0; a random permutation's is far above.
    import ot

    ca, cb = (u @ u.T).numpy(), (u[perm] @ u[perm].T).numpy()
    uniform = torch.full((60,), 1 / 60, dtype=torch.float64).numpy()
    shuffled = torch.eye(60, dtype=torch.float64)[torch.randperm(60, generator=torch.Generator().manual_seed(8))] / 60
    random_loss = ot.gromov.gwloss(*ot.gromov.init_matrix(ca, cb, uniform, uniform, "square_loss"), shuffled.numpy())
    assert loss < 0.1 * random_loss


def test_gw_init_recovers_a_rotated_permuted_noisy_copy_without_pairs():
    # The coupling sample covers every point, so a correspondence exists for GW to find (as on real data, a smaller
    # sample of two disjoint sets only has a distribution to match).
    x = _cloud(150)
    q = _rotation(8)
    perm = torch.randperm(150, generator=torch.Generator().manual_seed(2))
    y = (x @ q)[perm] + 0.02 * torch.randn(150, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    opts = UnsupervisedOptions(dim=8, coarse=8, whiten=False, init="gw", sample=150, restarts=1, iterations=10,
                               select="mutual_nn")
    fitted = fit_unsupervised(x, y, opts)
    assert torch.linalg.matrix_norm(fitted.weight - q) / torch.linalg.matrix_norm(q) < 0.05
    held_out = _cloud(200, seed=9)
    assert retrieval(fitted(held_out).float(), (held_out @ q).float(), ks=(1,))["a2b/recall@1"] > 0.95
    assert fitted.info["restarts"][0]["mutual_nn"] > 0.9


def test_mutual_nn_consistency_matches_a_brute_force_count():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randn(25, 4, generator=g, dtype=torch.float64)
    cos = lambda u, v: float(u @ v / (u.norm() * v.norm()))  # noqa: E731
    mutual = 0
    for i in range(30):
        j = max(range(25), key=lambda j: cos(a[i], b[j]))
        mutual += max(range(30), key=lambda k: cos(a[k], b[j])) == i
    assert mutual_nn_consistency(a, b) == pytest.approx(mutual / 30)
    assert mutual_nn_consistency(a, a[torch.randperm(30, generator=g)] * 3.0) == 1.0


def test_missing_pot_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ot", None)  # import ot now raises ImportError
    with pytest.raises(ImportError, match="pip install pot"):
        require_pot()
    with pytest.raises(ValueError, match="select must be one of"):
        UnsupervisedOptions(select="best")
    with pytest.raises(ValueError, match="epsilon must be a number > 0"):
        UnsupervisedOptions(epsilon=0)
