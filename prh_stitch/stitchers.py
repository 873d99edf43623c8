"""Stitchers: trainable maps from a frozen source encoder's feature space into a frozen target's.

A :class:`Stitcher` is three stages::

    source features --FeatureNorm--> core --FeatureNorm.inverse--> target features

The *core* is the learned part and comes from the ``STITCHERS`` registry (``linear``, ``affine``,
``lowrank``, ``mlp``). The two :class:`FeatureNorm` stages are fitted once from training features
(statistics, not gradients) so that the core sees well-conditioned inputs and predicts a normalised
target, while the stitcher's output still lives in the target encoder's own feature space; losses and
metrics therefore never need to know which normalisation was used.

``Stitcher.config()`` holds every construction argument, defaults included, so a checkpoint made of
``{"config": ..., "state_dict": ...}`` (see :meth:`Stitcher.checkpoint`) is enough to rebuild it.
"""

from __future__ import annotations

import inspect
import json
import operator
from typing import Any, Callable, Dict, Iterable, Tuple

import torch
from torch import Tensor, nn

from .registry import Registry

__all__ = [
    "STITCHERS",
    "NORMALIZATIONS",
    "FeatureNorm",
    "Stitcher",
    "build_stitcher",
]

STITCHERS: Registry[Callable[..., nn.Module]] = Registry("stitcher")
NORMALIZATIONS: Registry[Callable[[Tensor, Tensor, float], Tuple[Tensor, Tensor]]] = Registry(
    "normalization"
)


def _positive_int(what: str, value: Any) -> int:
    # operator.index accepts ints (and numpy ints) but not floats, so 1280.0 from a config is caught
    # here; the result is a plain int, which keeps config() JSON-serialisable.
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {number}")
    return int(number)


# --------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------
# Each entry turns float64 per-feature (mean, variance) into the (shift, scale) that FeatureNorm
# applies as (x - shift) / scale.


@NORMALIZATIONS.register("none")
def _identity_stats(mean: Tensor, var: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    return torch.zeros_like(mean), torch.ones_like(mean)


@NORMALIZATIONS.register("center")
def _center_stats(mean: Tensor, var: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    return mean, torch.ones_like(mean)


@NORMALIZATIONS.register("standard")
def _standard_stats(mean: Tensor, var: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    # Clamp rather than add eps: ordinary features then get exactly unit variance, and a constant
    # (dead) feature maps to 0 instead of blowing up.
    return mean, var.sqrt().clamp_min(eps)


class FeatureNorm(nn.Module):
    """Per-feature ``(x - mean) / scale`` with statistics fitted from training features.

    ``kind`` is a name in ``NORMALIZATIONS``. ``mean``, ``scale`` (shape ``[dim]``) and ``fitted``
    are buffers, so they travel in the state dict and follow ``.to(device/dtype)``. Variance is the
    population variance (divide by N), so fitted training features come out with std exactly 1.

    ``"none"`` starts fitted (it is the identity); any other kind raises in ``forward``/``inverse``
    until :meth:`fit`, :meth:`fit_stream` or a state dict has set it: silently using the identity
    would train a model whose checkpoint later behaves differently once someone fits it.
    """

    # Rows per float64 chunk in fit(): bounds the extra memory to ~chunk*dim*8 bytes whatever N is.
    fit_chunk_rows = 65536

    mean: Tensor
    scale: Tensor
    fitted: Tensor

    def __init__(self, dim: int, kind: str = "none", eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = _positive_int("feature dim", dim)
        self._stats_fn = NORMALIZATIONS.get(kind)
        self.kind = kind
        self.eps = float(eps)
        self.register_buffer("mean", torch.zeros(self.dim))
        self.register_buffer("scale", torch.ones(self.dim))
        self.register_buffer("fitted", torch.tensor(kind == "none"))
        # Python-side copy of `fitted`: reading the buffer on every forward would force a
        # device->host sync per step on GPU. None = unknown, look at the buffer once.
        self._fitted_cache: bool | None = kind == "none"

    @property
    def is_fitted(self) -> bool:
        if self._fitted_cache is None:
            self._fitted_cache = bool(self.fitted)
        return self._fitted_cache

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._fitted_cache = None  # the loaded `fitted` may differ from what we had

    @torch.no_grad()
    def fit(self, x: Tensor) -> "FeatureNorm":
        """Fit from one tensor of features ``[..., dim]`` (processed in float64 chunks)."""
        self._check_dim(x, "fit")
        return self.fit_stream(x.reshape(-1, self.dim).split(self.fit_chunk_rows))

    @torch.no_grad()
    def fit_stream(self, chunks: Iterable[Tensor]) -> "FeatureNorm":
        """Fit from an iterable of feature tensors ``[..., dim]``, e.g. batches from a loader.

        Chunks are merged with the pairwise (Chan et al.) update in float64, which stays accurate
        where a running sum of squares would cancel catastrophically for large-mean features.
        """
        count = 0
        mean = m2 = None
        for chunk in chunks:
            self._check_dim(chunk, "fit_stream")
            chunk = chunk.detach().reshape(-1, self.dim)
            n = chunk.shape[0]
            if n == 0:
                continue
            if mean is None:
                mean = torch.zeros(self.dim, dtype=torch.float64, device=chunk.device)
                m2 = torch.zeros_like(mean)
            chunk = chunk.to(device=mean.device, dtype=torch.float64)
            chunk_mean = chunk.mean(0)
            chunk_m2 = (chunk - chunk_mean).square().sum(0)
            delta = chunk_mean - mean
            total = count + n
            mean += delta * (n / total)
            m2 += chunk_m2 + delta.square() * (count * n / total)
            count = total
        if mean is None:
            raise ValueError(f"cannot fit {self.kind!r} normalization: no feature rows were given")
        var = m2 / count
        if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
            raise ValueError(f"cannot fit {self.kind!r} normalization: features contain NaN or Inf")
        shift, scale = self._stats_fn(mean, var, self.eps)
        self.mean.copy_(shift)  # copy_ casts back to the buffer's dtype/device
        self.scale.copy_(scale)
        self.fitted.fill_(True)
        self._fitted_cache = True
        return self

    def forward(self, x: Tensor) -> Tensor:
        self._require_fitted()
        return (x - self.mean) / self.scale

    def inverse(self, y: Tensor) -> Tensor:
        self._require_fitted()
        return y * self.scale + self.mean

    def _check_dim(self, x: Tensor, where: str) -> None:
        if x.ndim == 0 or x.shape[-1] != self.dim:
            raise ValueError(
                f"FeatureNorm.{where} expects features of last dim {self.dim}, got shape {tuple(x.shape)}"
            )

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError(
                f"{self.kind!r} normalization (dim {self.dim}) is used before being fitted; call "
                "Stitcher.fit_normalization(source_feats, target_feats) on training features "
                "(or load a checkpoint) first"
            )

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kind={self.kind!r}"


# --------------------------------------------------------------------------------------------------
# Cores: registered factories (in_dim, out_dim, **kwargs) -> nn.Module
# --------------------------------------------------------------------------------------------------
# linear/affine are plain nn.Linear so that closed-form fits (ridge, Procrustes) can assign
# `core.weight` (out x in) and `core.bias` directly.


@STITCHERS.register("linear")
def linear(in_dim: int, out_dim: int) -> nn.Module:
    """``y = x W^T``; no bias, so orthogonal-Procrustes style maps stay exactly representable."""
    return nn.Linear(in_dim, out_dim, bias=False)


@STITCHERS.register("affine")
def affine(in_dim: int, out_dim: int) -> nn.Module:
    """``y = x W^T + b``."""
    return nn.Linear(in_dim, out_dim, bias=True)


class LowRankCore(nn.Module):
    """``y = up(down(x))``: a linear map of rank <= ``rank`` with ``rank*(in+out)`` weights."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, bias: bool) -> None:
        super().__init__()
        self.down = nn.Linear(in_dim, rank, bias=False)
        self.up = nn.Linear(rank, out_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))


@STITCHERS.register("lowrank")
def lowrank(in_dim: int, out_dim: int, *, rank: int, bias: bool = True) -> nn.Module:
    """Factorised ``in_dim -> rank -> out_dim`` with no nonlinearity (a rank-limited affine map)."""
    try:
        rank = operator.index(rank)
    except TypeError:
        raise ValueError(f"lowrank stitcher: rank must be an integer, got {rank!r}") from None
    if not 1 <= rank <= min(in_dim, out_dim):
        raise ValueError(
            f"lowrank stitcher: rank must be in [1, min(in_dim, out_dim)] = [1, {min(in_dim, out_dim)}] "
            f"for a {in_dim}->{out_dim} map, got {rank}"
        )
    return LowRankCore(in_dim, out_dim, rank, bias)


class MLPCore(nn.Module):
    """``fc2(dropout(gelu(fc1(x))))``; named layers keep state-dict keys stable whatever dropout is."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


@STITCHERS.register("mlp")
def mlp(in_dim: int, out_dim: int, *, hidden_dim: int = 1024, dropout: float = 0.0) -> nn.Module:
    """One hidden layer with GELU; ``dropout`` (after the activation) in [0, 1)."""
    hidden_dim = _positive_int("mlp stitcher: hidden_dim", hidden_dim)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"mlp stitcher: dropout must be in [0, 1), got {dropout!r}")
    return MLPCore(in_dim, out_dim, hidden_dim, float(dropout))


# --------------------------------------------------------------------------------------------------
# Stitcher
# --------------------------------------------------------------------------------------------------


def _resolve_core_kwargs(name: str, factory: Callable[..., nn.Module], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Check kwargs against the factory's signature and fill in its defaults.

    Recording defaults makes a saved config independent of later changes to those defaults, and
    binding up front turns a typo (``hiden_dim``) into an error that lists what the core accepts.
    """
    params = list(inspect.signature(factory).parameters.values())[2:]  # after in_dim, out_dim
    accepted = {p.name: p for p in params}
    unknown = sorted(set(kwargs) - set(accepted))
    missing = sorted(k for k, p in accepted.items() if p.default is p.empty and k not in kwargs)
    if unknown or missing:
        problems = []
        if unknown:
            problems.append(f"unexpected {unknown}")
        if missing:
            problems.append(f"missing required {missing}")
        raise ValueError(
            f"{name!r} stitcher: {'; '.join(problems)}; it accepts {sorted(accepted) or 'no options'}"
        )
    resolved = {k: kwargs.get(k, p.default) for k, p in accepted.items()}
    for key, value in resolved.items():
        try:
            json.dumps(value)
        except TypeError:
            raise ValueError(
                f"{name!r} stitcher: option {key}={value!r} is not a plain JSON value, so it could "
                "not be stored in the stitcher's config"
            ) from None
    return resolved


class Stitcher(nn.Module):
    """Input FeatureNorm -> registered core -> output FeatureNorm.inverse.

    ``Stitcher(**s.config())`` rebuilds the same architecture and ``load_state_dict(strict=True)``
    restores it exactly (normalisation statistics are buffers). Core options passed as ``None`` are
    dropped so the core's default applies, as with values left unset in a config file.
    """

    def __init__(
        self,
        name: str,
        in_dim: int,
        out_dim: int,
        input_norm: str = "none",
        output_norm: str = "none",
        **core_kwargs: Any,
    ) -> None:
        super().__init__()
        factory = STITCHERS.get(name)
        self.name = name
        self.in_dim = _positive_int("in_dim", in_dim)
        self.out_dim = _positive_int("out_dim", out_dim)
        given = {k: v for k, v in core_kwargs.items() if v is not None}
        self.core_kwargs = _resolve_core_kwargs(name, factory, given)
        self.input_norm = FeatureNorm(self.in_dim, input_norm)
        self.core = factory(self.in_dim, self.out_dim, **self.core_kwargs)
        self.output_norm = FeatureNorm(self.out_dim, output_norm)

    def forward(self, x: Tensor) -> Tensor:
        """Map source features ``[..., in_dim]`` to target-space features ``[..., out_dim]``."""
        if x.ndim == 0 or x.shape[-1] != self.in_dim:
            got = f"{x.shape[-1]}-d" if x.ndim else "a scalar"
            raise ValueError(
                f"stitcher expects {self.in_dim}-d source features, got {got} "
                f"(shape {tuple(x.shape)}); check the source encoder/layer"
            )
        return self.output_norm.inverse(self.core(self.input_norm(x)))

    @torch.no_grad()
    def fit_normalization(
        self,
        source_feats: Tensor | Iterable[Tensor] | None,
        target_feats: Tensor | Iterable[Tensor] | None,
    ) -> "Stitcher":
        """Fit the input norm on source and the output norm on target training features.

        Each side is a tensor ``[N, dim]`` or an iterable of such chunks. A side whose norm is
        ``"none"`` is not read (so it may be None).
        """
        for norm, feats, side in (
            (self.input_norm, source_feats, "source"),
            (self.output_norm, target_feats, "target"),
        ):
            if norm.kind == "none":
                continue
            if feats is None:
                raise ValueError(f"{side} features are needed to fit the {norm.kind!r} {side} normalization")
            if isinstance(feats, Tensor):
                norm.fit(feats)
            else:
                norm.fit_stream(feats)
        return self

    def config(self) -> Dict[str, Any]:
        """Construction arguments as plain JSON types; ``Stitcher(**config)`` rebuilds the shape."""
        return {
            "name": self.name,
            "in_dim": self.in_dim,
            "out_dim": self.out_dim,
            "input_norm": self.input_norm.kind,
            "output_norm": self.output_norm.kind,
            **self.core_kwargs,
        }

    def checkpoint(self) -> Dict[str, Any]:
        """``{"config", "state_dict"}``: everything :meth:`from_checkpoint` needs, nothing else."""
        return {"config": self.config(), "state_dict": self.state_dict()}

    @classmethod
    def from_checkpoint(cls, checkpoint: Dict[str, Any]) -> "Stitcher":
        stitcher = cls(**checkpoint["config"])
        stitcher.load_state_dict(checkpoint["state_dict"], strict=True)
        return stitcher

    def extra_repr(self) -> str:
        return f"name={self.name!r}, in_dim={self.in_dim}, out_dim={self.out_dim}"


def build_stitcher(name: str, in_dim: int, out_dim: int, **kwargs: Any) -> Stitcher:
    """Build a :class:`Stitcher`; ``kwargs`` are ``input_norm``, ``output_norm`` and core options."""
    return Stitcher(name, in_dim, out_dim, **kwargs)
