"""Where the least-squares rank warning points: at the caller's line (``stacklevel``).

Kept apart from test_closed_form_mutants.py because it cannot run under mutmut: mutmut's trampolines add a frame
between every function and its caller, so under mutation testing the warning points into mutmut itself and the
test fails with or without a mutant. Its kills (``_solve_lstsq`` with ``stacklevel`` dropped or 4) were checked by
editing the source (tools/mutation_results.md).
"""

import pytest
import torch

from prh_stitch.closed_form import fit_closed_form
from test_closed_form import _features, _stitcher


def test_the_rank_deficiency_warning_points_at_the_callers_line():
    x = _features(100, 5, 33)
    x = torch.cat([x, x[:, :1]], 1)
    with pytest.warns(RuntimeWarning, match="rank-deficient") as caught:
        fit_closed_form(_stitcher("affine", x, x[:, :3]), (x, x[:, :3]), "lstsq")
    assert caught[0].filename == __file__  # the user's line to fix, not the library's
