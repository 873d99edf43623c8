"""Closed-form stitchers (least squares, ridge, orthogonal Procrustes); see :mod:`prh_stitch.closed_form.fit`."""

from prh_stitch.closed_form.fit import *  # noqa: F401,F403
from prh_stitch.closed_form.fit import __all__  # noqa: F401
