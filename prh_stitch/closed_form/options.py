"""The closed-form fit's option vocabularies and checks, and :class:`ClosedFormResult`, what a fit reports."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple, Union

METHODS = ("lstsq", "ridge", "procrustes", "unsupervised")  # unsupervised: see closed_form/unsupervised.py
SELECT_BY = ("recall@1", "mse")
SCALINGS = ("none", "isotropic", "standard")
DEFAULT_RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2)


@dataclass
class ClosedFormResult:
    """What a closed-form fit did: method, chosen ridge (relative), held-out scores per grid value."""

    method: str
    ridge: Optional[float] = None
    select_by: Optional[str] = None
    scores: Dict[str, float] = field(default_factory=dict)  # str(lambda) -> held-out score
    rank_deficient: bool = False
    n_train: int = 0
    scaling: Optional[str] = None
    gain: Optional[float] = None  # ridge only: the deviation gain written (1.0 = plain ridge)
    whiten: Optional[float] = None  # ridge only: relative target-whitening strength written (None = none)
    tuning_scores: Dict[str, float] = field(default_factory=dict)  # "whiten=..,gain=.." -> held-out recall@1
    unsupervised: Dict[str, Any] = field(default_factory=dict)  # method "unsupervised" only: how the map was found

    def as_dict(self) -> dict:
        return asdict(self)


def check_ridge_grid(grid: Sequence[float]) -> Tuple[float, ...]:
    """A non-empty sequence of finite, positive relative ridge strengths (sorted, deduplicated)."""
    try:
        values = [float(v) for v in grid]
    except (TypeError, ValueError):
        raise ValueError(f"ridge_grid must be a list of numbers, e.g. [1e-4, 1e-2, 1.0], got {grid!r}") from None
    if not values:
        raise ValueError("ridge_grid is empty; give at least one positive ridge strength, e.g. [1e-4, 1e-2, 1.0]")
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if bad:
        raise ValueError(f"ridge_grid values must be finite and > 0 (use method 'lstsq' for no ridge), got {bad}; "
                         "e.g. [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]")
    return tuple(sorted(set(values)))


def check_gain(gain: Union[str, float, None]) -> Union[str, float]:
    """``"auto"``, or a finite gain > 0 (None = 1.0, the plain ridge)."""
    if gain is None:
        return 1.0
    if isinstance(gain, str) and gain == "auto":
        return gain
    value = _positive_number(gain)
    if value is None:
        raise ValueError(f"gain must be 'auto', a finite number > 0 (1.0 = plain ridge) or null, got {gain!r}")
    return value


def check_whiten(whiten: Union[str, float, None]) -> Union[str, float, None]:
    """``"auto"``, None (no whitening) or a finite relative whitening strength > 0."""
    if whiten is None or (isinstance(whiten, str) and whiten == "auto"):
        return whiten
    value = _positive_number(whiten)
    if value is None:
        raise ValueError(f"whiten must be 'auto', null (no whitening) or a finite relative strength > 0 "
                         f"(e.g. 1e-3), got {whiten!r}")
    return value


def _positive_number(value) -> Optional[float]:
    if isinstance(value, (bool, str)):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None
