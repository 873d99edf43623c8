"""How well a stitcher maps one model's features into another's: retrieval, the objective, alignment, zero-shot.

:func:`evaluate_stitcher` is the plain-Python entry point (``evaluate.py stitch`` calls it): a trained stitcher
(a checkpoint of ``train.py``) or a training-free baseline fitted on anchor pairs, evaluated on held-out pairs
from the feature store. It returns a :class:`StitchResult` and writes nothing until asked.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from prh_stitch import reports
from prh_stitch.alignment.features import Extraction, encoder_record, extraction_layers, load_features
from prh_stitch.alignment.scoring import calibration_fields
from prh_stitch.alignment.settings import Inputs, ScoreSettings, check_n, metric_options
from prh_stitch.atomic import atomic_folder
from prh_stitch.errors import UserError
from prh_stitch.evaluation.report import log_tensorboard, stitch_markdown
from prh_stitch.evaluation.zero_shot import ZeroShotInputs, zero_shot, zero_shot_inputs


def stitch_report(mapped: Tensor, target: Tensor, raw_source: Tensor, raw_target: Tensor, captions: Sequence[str],
                  settings: ScoreSettings, loss: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                  loss_batch_size: int = 256, zero_shot_inputs: Optional[ZeroShotInputs] = None,
                  train_captions: Optional[Collection[str]] = None) -> Dict[str, Any]:
    """Everything ``stitch`` reports, independent of where the mapping came from (checkpoint or baseline).

    ``mapped`` (source features mapped into the comparison space) and ``target`` (target features in that
    space) are compared by retrieval and alignment; ``raw_source``/``raw_target`` are the encoders' own
    features, scored for alignment as the reference the mapping should not lose. Same-caption items count
    as correct retrieval matches; retrieval is also reported on captions seen / unseen in ``train_captions``
    (when given), with exact chance (:func:`prh_stitch.evaluation.captions.caption_retrieval`).
    """
    from prh_stitch.data.datamodule import caption_groups
    from prh_stitch.evaluation.captions import caption_retrieval
    from prh_stitch.metrics import calibrate, clamp_outliers

    n = mapped.shape[0]
    check_n(n, settings, "stitch")
    groups = caption_groups(list(captions)).to(mapped.device)
    out: Dict[str, Any] = {"n": n, "unique_captions": int(groups.max()) + 1,
                           "retrieval": caption_retrieval(mapped, target, captions, train_captions),
                           "retrieval_note": "a2b = stitched source → target, b2a = target → stitched source; "
                                             "items with the identical caption count as correct; seen = the caption "
                                             "occurs in the training split; chance@k is exact for a random ranking"}
    if loss is not None:
        out["loss"] = batched_loss(loss, mapped, target, loss_batch_size)
    out["alignment"] = {}
    q = settings.outlier_quantile  # alignment only: retrieval and zero-shot score the features as they are
    sides = {"stitched": (clamp_outliers(mapped, q, "stitched source"), clamp_outliers(target, q, "target")),
             "raw": (clamp_outliers(raw_source, q, "raw source"), clamp_outliers(raw_target, q, "raw target"))}
    for metric in settings.metrics:
        cal = dict(permutations=settings.permutations, bootstrap=settings.bootstrap, seed=settings.seed,
                   **metric_options(metric, settings.k))
        out["alignment"][metric] = {which: calibration_fields(calibrate(metric, a, b, **cal))
                                    for which, (a, b) in sides.items()}
    if zero_shot_inputs is not None:
        out["zero_shot"] = zero_shot(mapped, zero_shot_inputs)
    return out


def batched_loss(loss: Callable[[Tensor, Tensor], Tensor], mapped: Tensor, target: Tensor,
                 batch_size: int) -> Dict[str, Any]:
    n, total = mapped.shape[0], 0.0
    with torch.no_grad():
        for i0 in range(0, n, batch_size):
            chunk = slice(i0, i0 + batch_size)
            total += float(loss(mapped[chunk], target[chunk])) * len(mapped[chunk])
    return {"value": total / n, "batch_size": batch_size,
            "note": "mean over consecutive batches in key order (contrastive losses depend on batch size)"}


@dataclass
class StitchResult:
    """The stitch report (a JSON-ready dict) of :func:`evaluate_stitcher`."""

    report: Dict[str, Any]

    @property
    def markdown(self) -> str:
        return stitch_markdown(self.report)

    def write(self, out: Union[str, Path], tensorboard: Optional[Path] = None) -> Path:
        """stitch.md and stitch.json under ``out`` (and TensorBoard scalars when given a folder); the JSON's path."""
        out = Path(out)
        markdown = self.markdown
        with atomic_folder(out) as folder:  # the folder is replaced as a whole: markdown and JSON always agree
            if tensorboard is not None:
                inside = Path(tensorboard).resolve().is_relative_to(out.resolve())
                log_dir = folder / Path(tensorboard).resolve().relative_to(out.resolve()) if inside else tensorboard
                log_tensorboard(log_dir, self.report, markdown, self.report["config"]["method"].get("global_step") or 0)
                self.report["tensorboard"] = str(tensorboard)
            reports.write_text(folder / "stitch.md", markdown)
            reports.write_json(folder / "stitch.json", self.report)
        return out / "stitch.json"


@dataclass
class StitchMapping:
    """Where the mapping comes from: a loaded checkpoint's stitcher or an unfitted baseline, and the encoders."""

    source_spec: Any
    target_spec: Any
    method: Dict[str, Any]
    stitcher: Any = None
    baseline: Any = None
    loss: Any = None
    meta: Optional[Dict[str, Any]] = None  # the checkpoint's prh_stitch metadata


def checkpoint_mapping(ckpt: str, source: Optional[str], target: Optional[str], device: torch.device) -> StitchMapping:
    from prh_stitch.checkpoint import CHECKPOINT_KEY, load_stitcher, read_checkpoint

    checkpoint = read_checkpoint(ckpt)
    stitcher = load_stitcher(ckpt, device)
    source_spec, target_spec = stitcher.source_spec, stitcher.target_spec
    for flag, requested, spec in (("--source", source, source_spec), ("--target", target, target_spec)):
        if requested is not None and requested != spec.name:
            raise UserError(f"the checkpoint stitches {source_spec.name!r} → {target_spec.name!r}, but {flag} "
                            f"{requested!r} was requested ({flag} must be {spec.name!r}); evaluate the checkpoint "
                            "trained for that pair, or drop --source/--target to use the checkpoint's encoders")
    loss, objective = load_objective(checkpoint[CHECKPOINT_KEY], checkpoint["state_dict"], device)
    method = {"kind": "checkpoint", "path": os.path.abspath(ckpt), "stitcher": stitcher.config(),
              "objective": objective, "global_step": checkpoint.get("global_step"), "epoch": checkpoint.get("epoch")}
    return StitchMapping(source_spec, target_spec, method, stitcher=stitcher, loss=loss, meta=checkpoint[CHECKPOINT_KEY])


def baseline_mapping(name: str, options: Optional[Dict[str, Any]], anchors: Optional[str], source: Optional[str],
                     target: Optional[str], layers: Tuple[int, int], poolings: Tuple[Optional[str], Optional[str]]):
    from prh_stitch.encoders import EncoderSpec
    from prh_stitch.evaluation.baselines import BASELINES

    if not (source and target and anchors):
        raise UserError("--baseline needs --source, --target and --anchors (a shard pattern of anchor pairs, "
                        "normally the training split, never the evaluated data)")
    if options is not None and not isinstance(options, dict):
        raise UserError(f"--baseline-options must be a JSON object, got {type(options).__name__}")
    baseline = BASELINES.get(name)(**(options or {}))
    source_spec = EncoderSpec(source, layer=layers[0], pooling=poolings[0])
    target_spec = EncoderSpec(target, layer=layers[1], pooling=poolings[1])
    method = {"kind": "baseline", "name": name, "options": baseline.config(), "anchors": anchors}
    return StitchMapping(source_spec, target_spec, method, baseline=baseline)


def load_objective(ckpt_meta: Dict[str, Any], state: Dict[str, Tensor], device: torch.device):
    from prh_stitch.losses import build_loss

    spec = ckpt_meta.get("objective") or {}
    if not spec.get("name"):
        return None, None
    loss = build_loss(spec["name"], **(spec.get("options") or {}))
    prefix = "objective."
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if own:
        # The trained temperature of a contrastive objective lives here (objective.log_logit_scale).
        loss.load_state_dict(own, strict=True)
    return loss.to(device).eval(), spec


@dataclass
class HeldOut:
    """The evaluated pairs: both encoders' features at the stitched layers, rows joined by key."""

    source_encoder: Any
    target_encoder: Any
    layers: Tuple[list, list]  # the layers extracted per side (all, or just the stitched one)
    feature_sets: Tuple[Any, Any]
    names: Tuple[str, str]  # the stitched layer of each side
    raw_source: Tensor
    raw_target: Tensor
    captions: list
    labels: Tensor


def held_out(ex: Extraction, mapping: StitchMapping, urls: Sequence[str]) -> HeldOut:
    from prh_stitch.data.features import align_by_key
    from prh_stitch.encoders import encoder_from_spec

    specs = (mapping.source_spec, mapping.target_spec)
    encoders = [encoder_from_spec(spec) for spec in specs]
    if mapping.stitcher is not None:  # a trained map applies only to the features it was trained on
        from prh_stitch.checkpoint import check_trained_with

        for side, encoder, spec in zip(("source", "target"), encoders, specs):
            check_trained_with(mapping.stitcher, side, encoder.fingerprint([spec.layer], spec.pooling))
    layers = [extraction_layers(enc, spec.pooling, spec.layer) for enc, spec in zip(encoders, specs)]
    fs = [load_features(ex, enc, urls, spec.pooling, lay) for enc, spec, lay in zip(encoders, specs, layers)]
    names = [enc.layer_names[enc.resolve_layer(spec.layer)] for enc, spec in zip(encoders, specs)]
    ia, ib = align_by_key(fs[0], fs[1])
    return HeldOut(encoders[0], encoders[1], (layers[0], layers[1]), (fs[0], fs[1]), (names[0], names[1]),
                   fs[0].layer(names[0])[ia].float().to(ex.device), fs[1].layer(names[1])[ib].float().to(ex.device),
                   [fs[0].captions[i] for i in ia.tolist()],
                   torch.tensor([fs[0].labels[i] for i in ia.tolist()], dtype=torch.long))


def apply_mapping(ex: Extraction, mapping: StitchMapping, pairs: HeldOut, urls: Sequence[str]):
    """The mapped source, the target in the comparison space, and the map from target space into it."""
    from prh_stitch.data.features import align_by_key
    from prh_stitch.data.shards import expand_urls

    (s_name, t_name), stitcher = pairs.names, mapping.stitcher
    if stitcher is not None:
        if pairs.raw_source.shape[1] != stitcher.in_dim or pairs.raw_target.shape[1] != stitcher.out_dim:
            raise UserError(f"the checkpoint's stitcher maps {stitcher.in_dim}-d to {stitcher.out_dim}-d features, "
                            f"but {mapping.source_spec.name}/{s_name} and {mapping.target_spec.name}/{t_name} give "
                            f"{pairs.raw_source.shape[1]}-d and {pairs.raw_target.shape[1]}-d; were the encoders "
                            "changed?")
        with torch.no_grad():
            mapped = stitcher(pairs.raw_source)
        return mapped, pairs.raw_target, lambda x: x  # the target space is the comparison space
    anchor_urls = expand_urls(mapping.method["anchors"])
    if set(anchor_urls) & set(urls):
        raise UserError("--anchors and --data name the same shards; anchors must not be the evaluated items")
    fa = load_features(ex, pairs.source_encoder, anchor_urls, mapping.source_spec.pooling, pairs.layers[0])
    fb = load_features(ex, pairs.target_encoder, anchor_urls, mapping.target_spec.pooling, pairs.layers[1])
    ja, jb = align_by_key(fa, fb)
    baseline = mapping.baseline
    baseline.fit(fa.layer(s_name)[ja].float().to(ex.device), fb.layer(t_name)[jb].float().to(ex.device))
    return (baseline.transform_source(pairs.raw_source), baseline.transform_target(pairs.raw_target),
            baseline.transform_target)


def evaluate_stitcher(data: Optional[Union[str, Sequence[str]]] = None, ckpt: Optional[str] = None,
                      baseline: Optional[str] = None, *, split: str = "test", train_data: Optional[str] = None,
                      baseline_options: Optional[Dict[str, Any]] = None, anchors: Optional[str] = None,
                      source: Optional[str] = None, target: Optional[str] = None, source_layer: int = -1,
                      target_layer: int = -1, source_pooling: Optional[str] = None,
                      target_pooling: Optional[str] = None, prompt: str = "a photo of a {}",
                      loss_batch_size: int = 256, inputs: Optional[Inputs] = None, **settings: Any) -> StitchResult:
    """Evaluate a trained stitcher (``ckpt``) or a training-free ``baseline`` on held-out pairs: by default the
    checkpoint's recorded test split (see :mod:`prh_stitch.evaluation.splits`).

    ``settings`` are :class:`ScoreSettings` fields (``metrics``, ``k``, ...); ``inputs`` says where features come
    from (:class:`Inputs`). The report names the split it read and the split every choice was made on.

    Args:
        data: shard pattern of held-out image–caption pairs (default: the checkpoint's recorded test split)
        ckpt: checkpoint of a trained stitcher (train.py)
        split: without --data: which recorded split of the checkpoint to read (test, or val: the split its
            choices were made on, reported with a warning)
        train_data: shard pattern of the training pairs, whose captions count as seen (default: the
            checkpoint's recorded training split, or a baseline's anchors)
        baseline: a training-free baseline (prh_stitch.evaluation.baselines.BASELINES)
        baseline_options: the baseline's options, e.g. {"num_anchors": 512}
        anchors: with a baseline: shard pattern of anchor pairs (the training split, never the evaluated data)
        source: source encoder (with a checkpoint: checked against the checkpoint's)
        target: target encoder (with a checkpoint: checked against the checkpoint's)
        source_layer: with a baseline: source layer
        target_layer: with a baseline: target layer
        source_pooling: with a baseline: source pooling
        target_pooling: with a baseline: target pooling
        prompt: zero-shot class prompt; {} is the class name
        loss_batch_size: batch size for the objective's loss
    """
    from prh_stitch.data.shards import expand_urls
    from prh_stitch.evaluation.splits import local_split_record, resolve_split, train_captions

    score_settings = ScoreSettings(**settings).checked()
    if score_settings.protocol != "prh_stitch":
        # The paper's protocol is a preset of layer sets and a clamp over all of a model's layers (align, study);
        # a stitch scores one given layer pair, so it would silently be the per-layer clamp under the paper's name.
        raise UserError(f"protocol={score_settings.protocol!r} applies to align and study only; stitch evaluation "
                        "scores one layer pair under prh_stitch's protocol: leave protocol out")
    if (ckpt is None) == (baseline is None):
        raise UserError("give exactly one of --ckpt PATH (a trained stitcher) or --baseline NAME (training-free)")
    inputs = inputs or Inputs()
    ex = inputs.extraction()
    if ckpt is not None:
        mapping = checkpoint_mapping(ckpt, source, target, ex.device)
    else:
        mapping = baseline_mapping(baseline, baseline_options, anchors, source, target, (source_layer, target_layer),
                                   (source_pooling, target_pooling))
    meta = mapping.meta
    if meta is not None and meta.get("data"):  # recorded built-in scenes made elsewhere: regenerated here
        meta = dict(meta, data=local_split_record(meta["data"], inputs.root()))
    evaluated = resolve_split(data, split, meta, anchors, train_data)
    data = evaluated.pattern
    urls = expand_urls(data)
    pairs = held_out(ex, mapping, urls)
    mapped, target_space, to_space = apply_mapping(ex, mapping, pairs, urls)
    text_target = pairs.target_encoder.modality == "text"
    zs, zs_note = zero_shot_inputs(urls, pairs.labels, pairs.target_encoder, mapping.target_spec, to_space, prompt,
                                   ex.device, reference=target_space if text_target else None)
    result = stitch_report(mapped, target_space, pairs.raw_source, pairs.raw_target, pairs.captions, score_settings,
                           mapping.loss, loss_batch_size, zs, train_captions(evaluated))
    if zs_note:
        result["zero_shot"] = {"skipped": zs_note}
    fs_source, fs_target = pairs.feature_sets
    report = {
        **reports.provenance("stitch", {"data": data, "method": mapping.method}, str(ex.device), score_settings.seed,
                             {"source": encoder_record(fs_source), "target": encoder_record(fs_target)},
                             settings=asdict(score_settings)),
        "source": {**mapping.source_spec.to_dict(), "layer_name": pairs.names[0]},
        "target": {**mapping.target_spec.to_dict(), "layer_name": pairs.names[1]},
        "split": evaluated.record(),
        **result,
    }
    return StitchResult(report)
