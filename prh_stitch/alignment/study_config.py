"""The study config: dataclasses parsed by jsonargparse (the machinery of every command), then checked.

An unknown or misspelt key is an error that names it; so is a value of the wrong type. A config is a YAML file
(a path, or the name of a shipped one: ``study_offline``), a mapping, or a :class:`StudyConfig`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Union

from prh_stitch.errors import UserError, parser_error_line


@dataclass
class ScenesData:
    """The built-in scenes, written into the cache once.

    Args:
        n: evaluated scenes (of the split below)
        seed: scene generator seed
        image_size: image side in pixels
        n_train: size of the (unused here) training split; 4096 shares the default training run's shards
        split: val (the default training run's validation split) or test (its own seed stream, with the
            attribute combinations the training split holds out, so its captions are unseen in training)
        n_val: size of the validation split written beside a test split (the folder holds all three)
    """

    n: int = 1024
    seed: int = 0
    image_size: int = 224
    n_train: int = 4096
    split: Literal["val", "test"] = "val"
    n_val: int = 1024


@dataclass
class FashionMnistData:
    """Fashion-MNIST from the system dataset folder.

    Args:
        n: first n images of the split
        split: train or test
    """

    n: int = 1000
    split: str = "test"


@dataclass
class DataBlock:
    """One dataset of the study: exactly one of shards, scenes or fashion_mnist.

    Args:
        name: the dataset's name in the reports (its report folder)
        shards: a shard pattern of image–caption pairs
        scenes: the built-in scenes
        fashion_mnist: Fashion-MNIST
        optional: skip with a note (instead of failing) when the dataset is not installed
    """

    name: str
    shards: Optional[str] = None
    scenes: Optional[ScenesData] = None
    fashion_mnist: Optional[FashionMnistData] = None
    optional: bool = False


@dataclass
class ProbeData:
    """The linear probe's data: Fashion-MNIST, the first n_train training and n_test test images.

    Args:
        n_train: training images (the regulariser is chosen on a validation part of these)
        n_test: test images (only scored, never used for a choice)
        val_fraction: share of the training images held out to choose the regulariser
        seed: seed of that split
    """

    n_train: int = 60000
    n_test: int = 10000
    val_fraction: float = 0.1
    seed: int = 0


@dataclass
class CompetenceBlock:
    """How good the models of one modality are.

    Args:
        label: the competence's name in reports
        higher_is_better: whether a larger value means a better model
        scores: {model: value}; "imagenet_top1" (the built-in table); or "published" (the built-in table and the
            zoo entries' published scores), merged with "extra_scores"
        extra_scores: {model: value} added to a named table (e.g. a random-weights control at chance)
        source: where the numbers come from (printed in the report)
        measure: "bits_per_byte" (text, causal LMs): measured on the dataset's captions; "linear_probe" (vision):
            Fashion-MNIST linear-probe top-1 (%) of the encoder's final pooled features
        probe: the linear probe's data (measure linear_probe)
        side: vision or text (default: the block's key, which may then be any name, e.g. vision_probe)
    """

    label: str = "competence"
    higher_is_better: bool = True
    scores: Union[Dict[str, float], str, None] = None
    extra_scores: Dict[str, float] = field(default_factory=dict)
    source: Optional[str] = None
    measure: Optional[str] = None
    probe: Optional[ProbeData] = None
    side: Optional[Literal["vision", "text"]] = None


@dataclass
class BindingBlock:
    """The binding test on the built-in scenes: true vs attribute-swapped caption (prh_stitch.alignment.binding).

    Args:
        n_test: test scenes (their own seed stream)
        n_train: training scenes the stitcher is fitted on (null: the data block's n_train)
        n_val: validation scenes its ridge strength is chosen on (null: the data block's n)
    """

    n_test: int = 1024
    n_train: Optional[int] = None
    n_val: Optional[int] = None


@dataclass
class StudyConfig:
    """Does alignment rise with competence? Models, datasets, scoring settings and competence.

    Args:
        vision: image encoders (names or spec mappings)
        text: text encoders (names or spec mappings)
        data: the datasets
        metrics: alignment metrics
        k: neighbours for the kNN metrics and CKNNA
        permutations: permutation-null draws per headline score
        bootstrap: half-samples per headline score's 95% interval (name kept for old configs)
        max_null: permutation draws of the max over layer pairs
        half_samples: half-sample rescoring draws for intervals of correlations
        seed: seed of every resampling
        outlier_quantile: clamp features to ±(this quantile of |x|) first (protocol paper: 0.95 unless given)
        protocol: prh_stitch (this project's protocol, the default) or paper (the paper's outlier clamp, layer
            sets, normalisation and bits per byte; see prh_stitch.alignment.protocol)
        stability_halves: random halves of the items in which the best layer pair is re-selected, to report how
            often it wins (0 = off)
        knn_k: neighbour counts of the mutual-kNN k × N table (calibrated against the permutation null)
        knn_n: item counts of that table (null = all items); empty lists turn the table off
        pairs: vt (vision–text), vv, tt, a comma list, or all
        competence: per modality (vision, text), how good the models are
        binding: the binding test on every scenes dataset (true vs attribute-swapped caption); null = off
        out: report folder
        cache_dir: feature store and score cache (default $PRH_STITCH_CACHE)
        device: auto, cpu, cuda, ...
        batch_size: encoder batch size for feature extraction
        num_workers: DataLoader workers for extraction
        feature_dtype: float32, float16 or bfloat16
    """

    vision: List[Union[str, Dict[str, Any]]]
    text: List[Union[str, Dict[str, Any]]]
    data: List[DataBlock]
    metrics: List[str] = field(default_factory=lambda: ["mutual_knn"])
    k: int = 10
    permutations: int = 20
    bootstrap: int = 200
    max_null: int = 5
    half_samples: int = 100
    seed: int = 0
    outlier_quantile: Optional[float] = None
    protocol: Literal["prh_stitch", "paper"] = "prh_stitch"
    stability_halves: int = 20
    knn_k: List[int] = field(default_factory=lambda: [5, 10, 20])
    knn_n: List[Optional[int]] = field(default_factory=lambda: [256, 512, None])
    pairs: str = "vt"
    competence: Dict[str, CompetenceBlock] = field(default_factory=dict)
    binding: Optional[BindingBlock] = None
    out: str = "runs/study"
    cache_dir: Optional[str] = None
    device: Optional[str] = None
    batch_size: int = 64
    num_workers: int = 0
    feature_dtype: Literal["float32", "float16", "bfloat16"] = "float32"


def study_parser(prog: str = "study"):
    """The parser of a study config: StudyConfig's fields at the top level, ``--config`` for a YAML file."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=prog, exit_on_error=False, description=StudyConfig.__doc__.splitlines()[0])
    parser.add_argument("--config", action=ActionConfigFile, help="a study YAML (a path or a shipped name)")
    parser.add_class_arguments(StudyConfig, None)
    return parser


def load_config(source: Union[str, Path, Mapping[str, Any], StudyConfig]) -> StudyConfig:
    """A checked StudyConfig from a YAML path or shipped name, a mapping, or a StudyConfig."""
    from argparse import ArgumentError

    from prh_stitch.configs import shipped_config

    if isinstance(source, StudyConfig):  # through the parser too, so a hand-built config is checked the same way
        source = asdict(source)
    parser = study_parser()
    where = "the study config" if isinstance(source, Mapping) else f"study config {source}"
    try:
        if isinstance(source, Mapping):
            namespace = parser.parse_object(dict(source))
        else:
            path = shipped_config(source)
            if not path.is_file():
                raise UserError(f"cannot read study config {str(source)!r}: no such file (nor a shipped config of "
                                "that name)")
            namespace = parser.parse_args(["--config", str(path)])
            where = f"study config {path}"
    except ArgumentError as exc:
        raise UserError(f"{where}: {parser_error_line(str(exc))}") from None
    namespace.pop("config", None)
    return check_config(StudyConfig(**parser.instantiate(namespace).as_dict()), where)


def check_config(cfg: StudyConfig, where: str) -> StudyConfig:
    """What types cannot say: one data source per block, known competence measures, metrics, pairs, quantile."""
    from prh_stitch.alignment.align import parse_pairs
    from prh_stitch.alignment.settings import check_metrics
    from prh_stitch.encoders import EncoderSpec
    from prh_stitch.metrics.outliers import check_quantile

    cfg.vision = [EncoderSpec.coerce(s) for s in cfg.vision]
    cfg.text = [EncoderSpec.coerce(s) for s in cfg.text]
    if not cfg.data:
        raise UserError("the study config lists no data")
    for i, b in enumerate(cfg.data):
        if sum(x is not None for x in (b.shards, b.scenes, b.fashion_mnist)) != 1:
            raise UserError(f"data[{i}] ({b.name}) needs exactly one of shards, scenes or fashion_mnist")
    for key, block in cfg.competence.items():
        block.side = block.side or (key if key in ("vision", "text") else None)
        if block.side is None:
            raise UserError(f"competence.{key}: give side: vision or side: text (only the keys 'vision' and 'text' "
                            "imply their side)")
        allowed = {"bits_per_byte": "text", "linear_probe": "vision"}
        if block.measure is not None and allowed.get(block.measure) != block.side:
            raise UserError(f"competence.{key}.measure: 'bits_per_byte' (text models) or 'linear_probe' (vision "
                            f"models), got {block.measure!r} for {block.side} models")
        if isinstance(block.scores, str) and block.scores not in ("imagenet_top1", "published"):
            raise UserError(f"competence.{key}.scores: a mapping {{model: value}}, 'imagenet_top1' or 'published'")
        if block.measure == "linear_probe":
            block.probe = block.probe or ProbeData()
            p = block.probe
            if p.n_train < 10 or p.n_test < 1 or not 0 < p.val_fraction < 1:
                raise UserError(f"competence.{key}.probe: n_train >= 10, n_test >= 1 and val_fraction in (0, 1)")
    cfg.metrics = list(check_metrics(cfg.metrics))
    if cfg.stability_halves < 0 or any(k < 1 for k in cfg.knn_k) or any(n is not None and n < 4 for n in cfg.knn_n):
        raise UserError(f"{where}: stability_halves must be >= 0, knn_k values >= 1 and knn_n values >= 4 (or null "
                        "for all items)")
    parse_pairs(cfg.pairs)
    if cfg.binding is not None and min(n for n in asdict(cfg.binding).values() if n is not None) < 1:
        raise UserError(f"{where}: binding.n_test, n_train and n_val must be >= 1 scenes, got {asdict(cfg.binding)}")
    try:
        cfg.outlier_quantile = check_quantile(cfg.outlier_quantile, f"outlier_quantile in {where}")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return cfg

