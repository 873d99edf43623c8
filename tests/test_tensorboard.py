"""TensorBoard shows the science: a tiny run's event files, read with TensorBoard's own event reader, hold the
figures, retrieval examples, hp_metric = the selected checkpoint's test recall@1, and an embedding projector config
whose vectors, captions and thumbnails match the validation rows; report folders get their own event files."""

import csv
import json
from pathlib import Path

import pytest
import torch

import prh_stitch
from prh_stitch.cli import build_cli, fit

CONFIGS = Path(prh_stitch.__file__).resolve().parent / "configs"


def accumulators(root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = []
    for events in sorted(Path(root).glob("**/events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
        accumulator.Reload()
        out.append(accumulator)
    return out


def tags(root, kind):
    return {tag for acc in accumulators(root) for tag in acc.Tags()[kind]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    cli = build_cli(["--config", str(CONFIGS / "tiny.yaml"), "--trainer.default_root_dir", str(root),
                     "--trainer.enable_progress_bar=false", "--trainer.max_epochs", "2",
                     "--board.projector_rows", "20"])
    fit(cli)
    return cli, root


def test_event_file_holds_the_similarity_figure_of_every_validation_epoch_and_retrieval_examples(run):
    cli, root = run
    assert "val/similarity_matrix" in tags(root, "images")
    images = [event for acc in accumulators(root) if "val/similarity_matrix" in acc.Tags()["images"]
              for event in acc.Images("val/similarity_matrix")]
    assert len(images) == cli.trainer.current_epoch  # one per validation epoch, none from the sanity check
    assert all(image.width > 100 and image.height > 100 for image in images)
    text = [event for acc in accumulators(root) if "val/retrieval_examples/text_summary" in acc.Tags()["tensors"]
            for event in acc.Tensors("val/retrieval_examples/text_summary")]
    assert text and cli.datamodule.captions["val"][0] in text[-1].tensor_proto.string_val[0].decode()


def test_hp_metric_is_the_selected_checkpoints_test_recall_at_1(run):
    cli, root = run
    test = json.loads(next(Path(root).glob("**/test.json")).read_text())
    values = [s for acc in accumulators(root) if "hp_metric" in acc.Tags()["scalars"] for s in acc.Scalars("hp_metric")]
    assert values[-1].value == pytest.approx(test["retrieval"]["a2b/recall@1"], abs=1e-6)
    assert any(s.value == pytest.approx(float(cli.trainer.checkpoint_callback.best_model_score), abs=1e-6)
               for s in values)  # the val score stood in until the test ran


def test_projector_config_points_at_stitched_and_target_vectors_with_captions_and_thumbnails(run):
    cli, root = run
    (config,) = list(Path(root).glob("**/projector_config.pbtxt"))
    text = config.read_text()
    assert f'tensor_name: "val/stitched_and_target:{cli.trainer.global_step:05d}"' in text
    assert "metadata_path" in text and "sprite" in text and "tensor_path" in text
    folder = next(p for p in config.parent.rglob("tensors.tsv")).parent
    vectors = torch.tensor([[float(v) for v in line.split("\t")] for line in (folder / "tensors.tsv").read_text().splitlines()])
    rows = list(csv.reader((folder / "metadata.tsv").read_text().splitlines(), delimiter="\t"))
    assert rows[0] == ["caption", "kind"] and len(rows) == 1 + 40 == 1 + len(vectors)
    captions = cli.datamodule.captions["val"][:20]
    assert [r[0] for r in rows[1:21]] == [" ".join(c.split()) for c in captions]
    assert {r[1] for r in rows[1:21]} == {"stitched"} and {r[1] for r in rows[21:]} == {"target"}
    source, target, _, _ = cli.datamodule.datasets["val"].tensors
    torch.testing.assert_close(vectors[20:], target[:20].float(), rtol=1e-5, atol=1e-5)
    from PIL import Image

    sprite = Image.open(folder / "sprite.png")
    assert sprite.size[0] >= 32 * 6  # 40 thumbnails of 32 px tiled in a square


def test_report_board_writes_figures_text_and_scalars_into_the_report_folder(tmp_path):
    from prh_stitch.report_board import report_board
    from prh_stitch.reports import layer_heatmap

    fig = layer_heatmap(torch.rand(3, 4), ["a0", "a1", "a2"], ["b0", "b1", "b2", "b3"], "A", "B", "mutual_knn",
                        (1, 2), 0.1)
    with report_board(tmp_path) as board:
        board.figure("align/layers", fig)
        board.text("align/table", "| a | b |\n|---|---|\n| 1 | 2 |")
        board.scalar("align/score", 0.5)
        board.scalar("align/skipped", float("nan"))  # NaN is not a score: left out
    assert tags(tmp_path / "tensorboard", "images") == {"align/layers"}
    assert tags(tmp_path / "tensorboard", "scalars") == {"align/score"}
    assert "align/table/text_summary" in tags(tmp_path / "tensorboard", "tensors")


def _record(model_a, model_b, matrix, best, seed):
    gen = torch.Generator().manual_seed(seed)
    cal = lambda: {"chance": 0.05, "null_mean": float(torch.rand(1, generator=gen)) / 10, "null_std": 0.01,
                   "calibrated": 0.3, "ci_low": 0.2, "ci_high": 0.4}
    la, lb = len(matrix), len(matrix[0])
    return {"model_a": model_a, "model_b": model_b, "metric": "mutual_knn", "n": 50, "protocol": "prh_stitch",
            "score": matrix[best[0]][best[1]], "layer_a": best[0], "layer_b": best[1], **cal(),
            "layer_a_name": f"a{best[0]}", "layer_b_name": f"b{best[1]}", "max_null_mean": 0.1,
            "max_calibrated": 0.2, "contextual": None, "matrix": matrix,
            "layers_a": [f"a{i}" for i in range(la)], "layers_b": [f"b{j}" for j in range(lb)],
            "last": {"score": matrix[-1][-1], "layer_a": la - 1, "layer_b": lb - 1, "layer_a_name": f"a{la - 1}",
                     "layer_b_name": f"b{lb - 1}", **cal()}}


def test_align_report_writes_every_matrix_cell_long_form_pdf_figures_and_its_tensorboard(tmp_path):
    from types import SimpleNamespace

    from prh_stitch.alignment.report import alignment_outputs

    first = _record("vit/tiny", "bert", [[0.1, 0.2, 0.3], [0.6, 0.4, 0.5]], (1, 0), 0)
    second = _record("vit/tiny", "gpt", [[0.1, 0.2], [0.3, 0.9]], (1, 1), 1)  # best = last
    models = [SimpleNamespace(label=label) for label in ("vit/tiny", "bert", "gpt")]
    alignment_outputs(tmp_path, models, [first, second], {"settings": {"k": 5}, "device": "cpu"}, "test")

    with open(tmp_path / "alignment_layers.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 + 4
    for record, mine in ((first, rows[:6]), (second, rows[6:])):
        cells = [(i, j, v) for i, row in enumerate(record["matrix"]) for j, v in enumerate(row)]
        assert [(int(r["layer_a"]), int(r["layer_b"]), float(r["score"])) for r in mine] == cells
        for r in mine:
            cell = (int(r["layer_a"]), int(r["layer_b"]))
            source = record if cell == (record["layer_a"], record["layer_b"]) else \
                record["last"] if cell == (record["last"]["layer_a"], record["last"]["layer_b"]) else None
            if source is None:
                assert r["role"] == "" and r["null_mean"] == r["chance"] == r["ci_low"] == ""
            else:
                assert float(r["null_mean"]) == source["null_mean"] and float(r["ci_high"]) == source["ci_high"]
                assert float(r["chance"]) == source["chance"]
    assert [r["role"] for r in rows if r["role"]] == ["best", "last", "best, last"]

    for png in tmp_path.glob("*.png"):
        assert png.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
    assert tags(tmp_path / "tensorboard", "images") == {
        "models/mutual_knn", "layers/mutual_knn/vit_tiny__bert", "layers/mutual_knn/vit_tiny__gpt"}
    assert tags(tmp_path / "tensorboard", "scalars") == {
        f"mutual_knn/{which}/vit_tiny__{b}" for which in ("best", "last") for b in ("bert", "gpt")}
    assert "alignment/text_summary" in tags(tmp_path / "tensorboard", "tensors")
