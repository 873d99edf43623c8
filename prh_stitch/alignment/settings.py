"""What every alignment measurement is configured by: the scoring settings and where features come from."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from prh_stitch.errors import UserError

if TYPE_CHECKING:  # features.py imports this module; the annotation alone needs the name
    from prh_stitch.alignment.features import Extraction

DEFAULT_METRICS = ("mutual_knn", "cka", "cknna")


@dataclass
class ScoreSettings:
    """How alignment scores are computed and calibrated (recorded in every report).

    Args:
        metrics: alignment metrics (prh_stitch.metrics.METRICS), a list or a comma list
        k: neighbours for the kNN metrics and CKNNA (the paper: 10)
        permutations: permutation-null draws per headline score
        bootstrap: half-samples per headline score's 95% interval (the name is kept for old configs; see
            prh_stitch.metrics.intervals)
        max_null: permutation draws of the max over layer pairs (the selection's own null; 0 = off)
        half_samples: study only: half-sample rescoring draws for intervals of correlations
        seed: seed of every resampling
        outlier_quantile: clamp features to ±(this quantile of |x|) before scoring alignment (not retrieval or
            zero-shot); None = off (under --protocol paper: 0.95, the paper's value)
        protocol: prh_stitch (default: this project's protocol, each layer clamped on its own when a quantile is
            given) or paper (the paper's clamp, layer sets, normalisation and bits per byte; see
            prh_stitch.alignment.protocol)
    """

    metrics: Union[Tuple[str, ...], str] = DEFAULT_METRICS
    k: int = 10
    permutations: int = 20
    bootstrap: int = 200
    max_null: int = 5
    half_samples: int = 0
    seed: int = 0
    # None (the default) = off, so scores made before the option existed stay what they were.
    outlier_quantile: Optional[float] = None
    protocol: Literal["prh_stitch", "paper"] = "prh_stitch"

    def checked(self) -> "ScoreSettings":
        """The same settings validated, metrics as a tuple of registered names; bad values are UserErrors."""
        from prh_stitch.alignment.protocol import PAPER_QUANTILE, check_protocol
        from prh_stitch.metrics.outliers import check_quantile

        for flag, value, low in (("--k", self.k, 1), ("--permutations", self.permutations, 0),
                                 ("--bootstrap", self.bootstrap, 0), ("--max-null", self.max_null, 0),
                                 ("--half-samples", self.half_samples, 0)):
            if value < low:
                raise UserError(f"{flag} must be >= {low}, got {value}")
        try:
            quantile = check_quantile(self.outlier_quantile, "--outlier-quantile")
        except ValueError as exc:
            raise UserError(str(exc)) from None
        protocol = check_protocol(self.protocol)
        if protocol == "paper" and quantile is None:
            quantile = PAPER_QUANTILE
        names = self.metrics.split(",") if isinstance(self.metrics, str) else self.metrics
        return replace(self, metrics=check_metrics(names), outlier_quantile=quantile, protocol=protocol)


@dataclass
class Inputs:
    """Where features come from: the feature store and how encoders run over shards when it lacks them.

    Args:
        device: auto (cuda when available), cpu, cuda, cuda:1, ...
        cache_dir: feature store and score cache (default $PRH_STITCH_CACHE)
        feature_dtype: float32, float16 or bfloat16 (how the store keeps features)
        batch_size: encoder batch size for feature extraction
        num_workers: DataLoader workers for extraction
        progress: progress bars
    """

    device: Optional[str] = "auto"
    cache_dir: Optional[str] = None
    feature_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    batch_size: int = 64
    num_workers: int = 0
    progress: bool = True

    def root(self) -> Path:
        return cache_root(self.cache_dir)

    def extraction(self) -> "Extraction":
        from prh_stitch.alignment.features import Extraction
        from prh_stitch.data.features import FeatureStore

        if self.feature_dtype not in ("float32", "float16", "bfloat16"):
            raise UserError(f"--feature-dtype {self.feature_dtype!r}: use float32, float16 or bfloat16")
        return Extraction(FeatureStore(self.root() / "features", self.feature_dtype), pick_device(self.device),
                          self.batch_size, self.num_workers, self.progress)


def clamp_note(quantile: Optional[float], protocol: str = "prh_stitch") -> str:
    """How the reports' headers say whether features were clamped."""
    if protocol == "paper":
        return (f"protocol paper: features clamped as the paper's code does (one threshold per model, the mean over "
                f"samples of each sample's {quantile:g} quantile of |x| over all its layers), then rows L2-normalised")
    if quantile is None or quantile == 1.0:
        return "no outlier clamp"
    return f"features clamped at the {quantile:g} quantile of |x| per layer before scoring (outlier removal)"


def clamp_layers(feats: Sequence[Tensor], names: Sequence[str], label: str, quantile: Optional[float]) -> List[Tensor]:
    """Each layer of one model clamped on its own (its own threshold), or the layers themselves when off."""
    from prh_stitch.metrics import clamp_outliers

    return [clamp_outliers(x, quantile, f"{label} layer {name}") for x, name in zip(feats, names)]


def check_metrics(names: Sequence[str]) -> Tuple[str, ...]:
    """Validate metric names against the registry before any expensive work (its error lists the choices)."""
    from prh_stitch.metrics import METRICS

    names = tuple(n.strip() for n in names if n.strip())
    if not names:
        raise UserError("no metric given; choose from: " + ", ".join(METRICS.names()))
    for name in names:
        METRICS.get(name)
    return names


def metric_options(metric: str, k: int) -> Dict[str, Any]:
    """The options a metric takes from the report's settings: ``k`` for those that have neighbours."""
    from prh_stitch.metrics import METRICS

    return {"k": k} if "k" in inspect.signature(METRICS.get(metric)).parameters else {}


def check_n(n: int, settings: ScoreSettings, what: str) -> None:
    uses_k = any("k" in metric_options(m, settings.k) for m in settings.metrics)
    if uses_k and n <= settings.k + 1:
        raise UserError(f"{what}: N = {n} paired samples is too small for k = {settings.k} neighbours; "
                        f"give more data or a smaller --k (at most {max(1, n - 2)})")
    if n < 4:
        raise UserError(f"{what}: N = {n} paired samples is too few to score alignment (need at least 4)")


def pick_device(name: Optional[str]) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu")
    return torch.device(name)


def cache_root(cache_dir: Optional[str]) -> Path:
    from prh_stitch.data.features import default_cache_dir

    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
