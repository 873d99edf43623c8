"""The command lines as thin layers: every subcommand's help, configs for every subcommand, both option
spellings, shipped configs by name, LightningCLI's subclass selection, and a library that never imports them."""

import json
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Tuple, Union

import pytest
import yaml

from prh_stitch.cli.common import option_kinds, standard_spelling
from prh_stitch.cli.evaluate import main as evaluate_main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv", [["--help"], ["stitch", "--help"], ["align", "--help"], ["study", "--help"],
                                  ["layer-sweep", "--help"]])
def test_every_subcommand_has_help(argv, capsys):
    assert evaluate_main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: evaluate.py") or "usage:" in out
    if argv[0] == "align":
        assert "--outlier_quantile" in out and "--cache_dir" in out and "--config" in out
    if argv[0] == "stitch":
        assert "--ckpt" in out and "--baseline_options" in out and "--tensorboard" in out


def test_classic_and_jsonargparse_spellings_are_the_same_options():
    def kinds_of(a=1, max_null: int = 5, progress: bool = True, layers_a: list = (), metrics: str = ""):
        pass

    kinds = option_kinds(kinds_of)
    assert kinds == {"a": "value", "max_null": "value", "progress": "bool", "layers_a": "list", "metrics": "value"}
    classic = ["align", "--max-null", "2", "--no-progress", "--layers-a", "layer1", "layer2", "--metrics", "a,b"]
    assert standard_spelling(classic, kinds) == ["align", "--max_null", "2", "--progress", "false", "--layers_a",
                                                 "[layer1, layer2]", "--metrics", "a,b"]
    already = ["--max_null=2", "--progress", "--layers_a", "[x]", "--progress", "false"]
    assert standard_spelling(already, kinds) == ["--max_null=2", "--progress", "true", "--layers_a", "[x]",
                                                 "--progress", "false"]


def test_print_config_round_trips_through_config(tmp_path, capsys):
    args = ["align", "--vision", "tiny_vit", "--text", "tiny_bert", "--data", "x-*.tar", "--out", "o", "--k", "7",
            "--max-null", "0", "--no-progress", "--metrics", "mutual_knn,cka"]
    assert evaluate_main(args + ["--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["k"] == 7 and printed["max_null"] == 0 and printed["progress"] is False
    assert printed["vision"] == "tiny_vit" and printed["metrics"] == "mutual_knn,cka"
    config = tmp_path / "align.yaml"
    config.write_text(yaml.safe_dump(printed))
    assert evaluate_main(["align", "--config", str(config), "--k", "3", "--print_config"]) == 0
    again = yaml.safe_load(capsys.readouterr().out)
    assert again == dict(printed, k=3)  # the file's options, the later flag wins
    config.write_text(yaml.safe_dump(dict(printed, kk=3)))
    assert evaluate_main(["align", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evaluate.py: error:") and "kk" in err and len(err.splitlines()) == 1


def test_train_finds_shipped_configs_by_name_from_any_directory(tmp_path, monkeypatch):
    from prh_stitch.cli import build_cli

    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", "tiny", "--trainer.default_root_dir", str(tmp_path / "run"),
                     "--model.stitcher.fit", "ridge", "--trainer.max_epochs", "1"])
    assert cli.config["model"]["init_args"]["source"]["name"] == "tiny_vit"  # tiny.yaml's, found without a path
    assert cli.model.stitcher_spec.fit == "ridge"
    assert type(cli.model).__name__ == "StitchingModule"


def test_layer_stitch_configs_select_their_classes_by_class_path(capsys):
    from prh_stitch.cli import build_cli

    for name in ("layer_stitch_lite0_to_lite2", "layer_stitch_lite2_to_lite0"):
        with pytest.raises(SystemExit) as exit_info:
            build_cli(["--config", name, "--print_config"])
        assert exit_info.value.code == 0
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["model"]["class_path"].endswith("LayerStitchingModule")
        assert printed["data"]["class_path"].endswith("LayerStitchDataModule")
        assert printed["model"]["init_args"]["layer_a"] == "blocks.3" and "task" not in printed


def test_the_library_never_imports_the_command_lines():
    code = ("import sys, prh_stitch.alignment, prh_stitch.evaluation, prh_stitch.reports; "
            "bad = sorted(m for m in sys.modules if m.startswith('prh_stitch.cli')); print(json.dumps(bad))")
    result = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == []


def test_top_level_commands_are_a_few_lines():
    for name in ("train.py", "evaluate.py"):
        lines = [line for line in (REPO / name).read_text().splitlines() if line.strip()]
        assert len(lines) <= 8, name


def test_evaluate_and_scoring_never_import_lightning_or_torchmetrics():
    """A study rerun from the caches spent 20 s importing them (evaluate.py reads every subcommand's signature)."""
    code = ("import sys\n"
            "from prh_stitch.cli.evaluate import build_parser, option_spellings\n"
            "option_spellings(); build_parser()\n"
            "import prh_stitch.alignment.study, prh_stitch.metrics, prh_stitch.layer_stitch, prh_stitch.prefix\n"
            "print(sorted(m for m in ('pytorch_lightning', 'lightning_fabric', 'torchmetrics') if m in sys.modules))\n"
            "from prh_stitch.metrics import MutualKNN  # a wrapper still loads on first use\n"
            "print('torchmetrics' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["[]", "True"]


def _optional_options(listed: Optional[List[str]] = None, flag: Optional[bool] = None,
                      either: Union[Tuple[str, ...], str] = "a", plain: Optional[int] = None) -> None:
    """Options of the kinds option_kinds tells apart."""


def test_an_optional_list_or_flag_is_spelled_as_its_inner_type_and_other_unions_as_values():
    kinds = option_kinds(_optional_options)
    assert kinds == {"listed": "list", "flag": "bool", "either": "value", "plain": "value"}
    assert standard_spelling(["--listed", "a", "b", "--flag", "--either", "x"], kinds) == [
        "--listed", "[a, b]", "--flag", "true", "--either", "x"]
