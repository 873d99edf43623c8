"""The two-stage shape every alignment metric shares, so layers and calibration can reuse per-side work.

A metric is ``pair(prepare(a), prepare(b))``: ``prepare`` does the per-side work (normalisation, neighbour
search, Gram norms, SVD) and ``pair`` combines two prepared sides. ``layer_alignment`` prepares each layer once
and pairs every combination; ``calibrate`` prepares once and pairs against permuted copies of side b
(``permute``), and recomputes the metric on half-samples of the rows for its interval.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

from torch import Tensor

from prh_stitch.registry import Registry

from ._checks import check_pair


@dataclass(frozen=True)
class MetricSpec:
    name: str
    prepare: Callable[..., Any]  # prepare(x, name, opts, origin=None) -> side state; x already validated
    pair: Callable[..., float]  # pair(state_a, state_b, opts) -> score
    permute: Callable[..., Any]  # permute(state, perm, opts) -> state of x[perm]
    check: Callable[[int, Dict[str, Any]], None]  # check(n, opts): validate options against N
    per_item: Optional[Callable[..., Tensor]] = None  # per_item(sa, sb, opts) -> N scores whose mean is the score
    chance: Optional[Callable[[int, Dict[str, Any]], Optional[float]]] = None  # analytic chance level
    defaults: Dict[str, Any] = field(default_factory=dict)


# The one registry of alignment metrics: name -> functional metric, each carrying its spec as ``fn.spec``.
METRICS: Registry = Registry("metric")


def defaults_of(fn: Callable) -> Dict[str, Any]:
    """Keyword defaults of a functional metric (everything after ``a, b``)."""
    params = list(inspect.signature(fn).parameters.values())[2:]
    return {p.name: p.default for p in params}


def attach(fn: Callable, **parts: Any) -> MetricSpec:
    spec = MetricSpec(name=fn.__name__, defaults=defaults_of(fn), **parts)
    fn.spec = spec  # type: ignore[attr-defined]
    METRICS.register(spec.name)(fn)
    return spec


def spec_of(metric: Any) -> MetricSpec:
    """The spec of a metric given by name or as the functional metric itself."""
    if isinstance(metric, str):
        return METRICS.get(metric).spec
    spec = getattr(metric, "spec", None)
    if not isinstance(spec, MetricSpec):
        raise ValueError(f"{metric!r} is not a prh_stitch metric (pass a name or a function from prh_stitch.metrics)")
    return spec


def options(spec: MetricSpec, kw: Dict[str, Any]) -> Dict[str, Any]:
    unknown = set(kw) - set(spec.defaults)
    if unknown:
        raise ValueError(f"{spec.name} got unknown option(s) {sorted(unknown)}; it takes {sorted(spec.defaults)}")
    return {**spec.defaults, **kw}


def run(spec: MetricSpec, a: Tensor, b: Tensor, opts: Dict[str, Any]) -> float:
    """Validate, prepare both sides, pair: the body of every functional metric."""
    n = check_pair(a, b)
    spec.check(n, opts)
    return float(spec.pair(spec.prepare(a, "a", opts), spec.prepare(b, "b", opts), opts))
