"""Transitional: ``evaluate.py layer-sweep`` as jsonargparse's mapping of :func:`layer_sweep`'s signature.

The command line is being moved into one jsonargparse-based package; when it maps ``layer_sweep`` itself, this file
goes. No parser is written here: every option is a parameter of ``layer_sweep``.
"""

from __future__ import annotations

import sys
from typing import List, Optional


def main_sweep(argv: Optional[List[str]] = None) -> int:
    from jsonargparse import CLI

    from prh_stitch.layer_stitch.sweep import layer_sweep

    try:
        report = CLI(layer_sweep, args=argv, as_positional=False, prog="evaluate.py layer-sweep")
    except (ValueError, FileNotFoundError) as exc:
        print(f"evaluate.py layer-sweep: error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"B alone ({report.metric}): {report.b_score:.4f}; penalty matrix (rows {report.model_a}, columns "
          f"{report.model_b}) written ({report.seconds:.0f} s)")
    return 0
