"""``python evaluate.py``: how well two models stitch, how aligned their representations are, and whether
alignment grows with competence.

Subcommands (``python evaluate.py SUBCOMMAND --help`` lists every option; ``--config FILE`` reads them from YAML
and ``--print_config`` prints one):

- ``stitch``: a trained stitcher (``--ckpt``) or a training-free baseline (``--baseline``) on held-out pairs (by
  default the checkpoint's test split): retrieval overall and on seen / unseen captions with exact chance, the
  objective's loss, alignment of stitched and of raw features, zero-shot classification.
- ``align``: the paper's measurement: every layer pair of every model pair, the best pair (max over layer
  pairs, as the paper reports it) and the last-layer pair, each against chance, a permutation null and a
  half-sample interval; figures and tables. ``--protocol prh_stitch`` (default) is this project's protocol;
  ``--protocol paper`` applies the paper's outlier clamp, layer sets and normalisation (see
  :mod:`prh_stitch.alignment.protocol`); every report names the protocol that produced it.
- ``study``: the convergence study from a YAML config (see :mod:`prh_stitch.alignment.study`).
- ``layer-sweep``: the stitching penalty of every cut (A's layer i into B's layer j), with a heatmap.
- ``translate``: a map between two encoders learned without pairs, scored on held-out pairs against the supervised
  ridge and chance (see :mod:`prh_stitch.translation`).
- ``prefix``: a trained prefix map (image -> language model): caption bits per byte with the image's prefix, with
  none and with a shuffled image's, bootstrap intervals, greedy captions and their scene attributes
  (:func:`prh_stitch.prefix.evaluation.evaluate_prefix`).

Options map onto the library's signatures: :class:`~prh_stitch.alignment.ScoreSettings` and
:class:`~prh_stitch.alignment.Inputs` (shared), :func:`~prh_stitch.evaluation.evaluate_stitcher`,
:func:`align_models`, :class:`~prh_stitch.alignment.StudyConfig`, and ``prh_stitch.layer_stitch.layer_sweep``.
User errors print one line ``evaluate.py: error: ...`` and exit with status 2; reports are written only after
everything is computed, each file atomically, so a failed run leaves no half-written report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from prh_stitch.cli.common import argv_of, option_kinds, run_command, standard_spelling, with_shipped_configs

PROG = "evaluate.py"
SCORE_SKIP = {"half_samples"}  # study only
ALIGN_ONLY = {"protocol"}  # the paper's protocol is a preset of align and study; stitch has no layer sets to choose


def align_models(data: str, out: str, vision: str = "", text: str = "", pairs: str = "vt") -> None:
    """Layer × layer alignment between models (the paper's measurement).

    Args:
        data: shard pattern of held-out image–caption pairs (brace ranges, globs, folders, pipe: URLs; several
            joined by ',')
        out: report folder
        vision: comma list of image encoders (built-ins or timm:NAME)
        text: comma list of text encoders (built-ins or hf:ID)
        pairs: vt (vision–text, default), vv, tt, a comma list, or all
    """


def stitch_outputs(out: str, data: Optional[str] = None, tensorboard: str = "auto") -> None:
    """Evaluate a trained stitcher or a baseline on held-out pairs.

    Args:
        out: report folder
        data: shard pattern of held-out image–caption pairs (brace ranges, globs, folders, pipe: URLs; several
            joined by ','); default: the checkpoint's recorded test split (see --split)
        tensorboard: TensorBoard folder; auto = next to the training run (…/version_N/evaluate); none
    """


def _subparser(description: str):
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(description=description, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="options from a YAML file (--print_config writes one)")
    return parser


def _shared(parser, score: bool = True) -> None:
    from prh_stitch.alignment import Inputs, ScoreSettings

    if score:
        parser.add_class_arguments(ScoreSettings, None, skip=SCORE_SKIP)
    parser.add_class_arguments(Inputs, None)


def build_parser():
    """The parser of every subcommand; each one's options are a signature of the library."""
    from jsonargparse import ArgumentParser

    from prh_stitch.alignment.study_config import StudyConfig
    from prh_stitch.evaluation import evaluate_stitcher

    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], exit_on_error=False)
    commands = parser.add_subcommands(dest="command")
    stitch = _subparser("Evaluate a trained stitcher or a training-free baseline on held-out pairs.")
    # evaluate_stitcher's **settings are ScoreSettings' fields: jsonargparse follows them there.
    stitch.add_function_arguments(evaluate_stitcher, None, skip={"data", "inputs"} | SCORE_SKIP | ALIGN_ONLY)
    stitch.add_function_arguments(stitch_outputs, None)
    _shared(stitch, score=False)
    commands.add_subcommand("stitch", stitch, help="evaluate a trained stitcher or a baseline on held-out pairs")
    align = _subparser("Layer × layer alignment between models (the paper's measurement).")
    align.add_function_arguments(align_models, None)
    _shared(align)
    commands.add_subcommand("align", align, help="layer × layer alignment between models (the paper's measurement)")
    study = _subparser("The convergence study: alignment against competence.")
    study.add_class_arguments(StudyConfig, None)
    study.add_argument("--progress", type=bool, default=True, help="progress bars")
    commands.add_subcommand("study", study, help="the convergence study: alignment against competence")
    from prh_stitch.layer_stitch import layer_sweep

    sweep = _subparser("Stitching penalty of every cut (A's layer i into B's layer j), with a heatmap.")
    sweep.add_function_arguments(layer_sweep, None)
    commands.add_subcommand("layer-sweep", sweep, help="stitching penalty of every cut, with a heatmap")
    from prh_stitch.translation.run import translate

    translation = _subparser("Translation without pairs: an unsupervised map between two encoders, scored on held-out pairs.")
    translation.add_function_arguments(translate, None)
    commands.add_subcommand("translate", translation, help="translation without pairs, against ridge and chance")
    from prh_stitch.prefix.evaluation import evaluate_prefix

    prefix = _subparser("Caption bits per byte of a trained prefix map (image -> language model), with controls.")
    prefix.add_function_arguments(evaluate_prefix, None)
    prefix.add_argument("--out", type=str, required=True, help="report folder")
    commands.add_subcommand("prefix", prefix, help="caption bits per byte of a prefix map, with controls")
    return parser


def option_spellings() -> Dict[str, str]:
    from prh_stitch.alignment import Inputs, ScoreSettings
    from prh_stitch.evaluation import evaluate_stitcher

    from prh_stitch.layer_stitch import layer_sweep
    from prh_stitch.translation.run import translate

    from prh_stitch.prefix.evaluation import evaluate_prefix

    return option_kinds(ScoreSettings, Inputs, evaluate_stitcher, align_models, stitch_outputs,
                        layer_sweep, translate, evaluate_prefix) | {"progress": "bool"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``evaluate.py``; returns the exit status (2 for bad input, with one line on stderr)."""
    args = argv_of(argv)
    return run_command(PROG, lambda: _run(with_shipped_configs(standard_spelling(args, option_spellings()))))


def _run(args: List[str]) -> int:
    from prh_stitch.encoders.base import keep_large_allocations_in_heap

    namespace = build_parser().parse_args(args)
    keep_large_allocations_in_heap()  # an explicit choice of this command: see the function's docstring
    command = namespace.command
    options = namespace[command].as_dict()
    config = options.pop("config", None)  # the YAML files read, when any
    config_file = str(config[-1]) if config else None
    commands = {"stitch": cmd_stitch, "align": cmd_align, "study": cmd_study, "layer-sweep": cmd_layer_sweep,
                "translate": cmd_translate, "prefix": cmd_prefix}
    return commands[command](options, config_file)


def _split(options: Dict[str, Any]):
    """The options of ScoreSettings and of Inputs, and the rest."""
    from dataclasses import fields

    from prh_stitch.alignment import Inputs, ScoreSettings

    score = {f.name: options.pop(f.name) for f in fields(ScoreSettings) if f.name in options}
    inputs = Inputs(**{f.name: options.pop(f.name) for f in fields(Inputs) if f.name in options})
    return score, inputs, options


def cmd_stitch(options: Dict[str, Any], config_file: Optional[str] = None) -> int:
    from prh_stitch.evaluation import evaluate_stitcher
    from prh_stitch.evaluation.report import tensorboard_dir

    score, inputs, rest = _split(options)
    out, tensorboard = rest.pop("out"), rest.pop("tensorboard")
    result = evaluate_stitcher(rest.pop("data"), inputs=inputs, **rest, **score)
    path = result.write(out, tensorboard_dir(tensorboard, rest.get("ckpt"), out))
    from prh_stitch.evaluation.captions import summary_line

    report = result.report
    print(f"evaluate.py stitch: {summary_line(report['split']['name'], report['retrieval'])} (stitched → target); "
          f"report in {path}")
    if report["split"].get("warning"):
        print(f"evaluate.py stitch: warning: {report['split']['warning']}")
    return 0


def cmd_align(options: Dict[str, Any], config_file: Optional[str] = None) -> int:
    from prh_stitch.alignment import align

    score, inputs, rest = _split(options)
    models = {"vision": _names(rest["vision"]), "text": _names(rest["text"])}
    result = align(models, rest["data"], pairs=rest["pairs"], inputs=inputs, **score)
    result.write(rest["out"])
    print(f"evaluate.py align: {len(result.records)} record(s) written to {Path(rest['out']) / 'alignment.json'}")
    return 0


def _names(value: str) -> List[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def cmd_study(options: Dict[str, Any], config_file: Optional[str] = None) -> int:
    from prh_stitch.alignment import run_study

    progress = options.pop("progress")
    summary = run_study(options, progress=progress, config_file=config_file, notify=print)
    for dataset in summary["datasets"]:
        for a in dataset["competence"]:
            print(f"{dataset['name']} / {a['metric']} / {a['side']}: {a['sentence']}")
    for note in summary["notes"]:
        print(f"note: {note}")
    print(f"evaluate.py study: report in {Path(options['out']) / 'study.md'} ({summary['seconds']:.1f} s)")
    return 0


def cmd_layer_sweep(options: Dict[str, Any], config_file: Optional[str] = None) -> int:
    from prh_stitch.layer_stitch import layer_sweep

    r = layer_sweep(**options).to_dict()
    print(f"B alone ({r['metric']}): {r['b_score']:.4f}; penalty matrix (rows {r['model_a']}, columns "
          f"{r['model_b']}) in {options.get('out')}/penalty.png, .csv, .json ({r['seconds']:.0f} s)")
    return 0


def cmd_translate(options: Dict[str, Any], config_file: Optional[str] = None) -> int:
    from prh_stitch.translation.run import summary_line, translate, write_translation

    result = translate(**options)
    path = write_translation(result, options["out"], options["source"], options["target"])
    print(f"evaluate.py translate: {summary_line(result.report)}; report in {path}")
    return 0


def cmd_prefix(options: Dict[str, Any], config_file: Optional[str] = None) -> int:
    from prh_stitch.prefix.evaluation import evaluate_prefix

    out = options.pop("out")
    result = evaluate_prefix(**options)
    path = result.write(out)
    b = result.report["bits_per_byte"]
    print(f"evaluate.py prefix: bits per byte on {result.report['split']['captions']} captions: prefix "
          f"{b['prefix']['bits_per_byte']:.4f}, LM alone {b['lm_alone']['bits_per_byte']:.4f}, shuffled image "
          f"{b['shuffled']['bits_per_byte']:.4f}; report in {path}")
    return 0
