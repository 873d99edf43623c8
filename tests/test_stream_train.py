"""Streaming training (``data.mode: stream``): raw shards through both frozen encoders inside the training loop.

Shrunk to seconds with the tiny encoders of configs/tiny.yaml: the streamed features are the feature store's,
training lowers its loss, augmentation changes the views (the same view for every encoder of a sample), and two
DDP ranks on the CPU take the same number of steps from their own streams.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_lightning import Callback

from prh_stitch.cli import build_cli, fit
from prh_stitch.data.augment import AugmentedInput, AugmentOptions, ImageAugment, augmented
from prh_stitch.data.datamodule import SceneData, StitchingDataModule, StreamOptions
from prh_stitch.encoders import EncoderSpec
from prh_stitch.module import StitchingModule

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
SCENES = SceneData(n_train=96, n_val=32, n_test=32, seed=3, image_size=48)


def stream_args(root, cache, *extra):
    scenes = [f"--data.scenes.{k}={v}" for k, v in vars(SCENES).items()]
    return ["--config", TINY, "--data.mode=stream", f"--data.cache_dir={cache}", *scenes, "--data.batch_size=16",
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar=false",
            "--trainer.accelerator=cpu", *extra]


def _module_and_data(cache, **stream):
    module = StitchingModule(source=EncoderSpec("tiny_vit"), target=EncoderSpec("tiny_bert"))
    dm = StitchingDataModule(scenes=SCENES, cache_dir=str(cache), batch_size=16, mode="stream",
                             stream=StreamOptions(**stream))
    dm.prepare_features(list(module.feature_requests()))
    module._setup_stream(dm)
    dm.setup_features(*module.feature_requests())
    return module, dm


def test_streamed_features_are_the_feature_stores_features_for_the_same_samples(tmp_path):
    module, dm = _module_and_data(tmp_path / "cache")
    source_request, target_request = module.feature_requests()
    stored = {side: dm.store.get(request.encoder, dm.shard_urls("train"), [request.layer], request.pooling,
                                 progress=False)
              for side, request in (("source", source_request), ("target", target_request))}
    row = {side: {key: i for i, key in enumerate(fs.keys)} for side, fs in stored.items()}
    seen = 0
    for batch in dm.train_dataloader():
        source, target = module.encode_streamed_batch(batch)
        assert not source.requires_grad and not target.requires_grad and source.dtype == torch.float32
        for side, features in (("source", source), ("target", target)):
            fs = stored[side]
            expected = fs.layer(next(iter(fs.features)))[[row[side][key] for key in batch["key"]]]
            torch.testing.assert_close(features, expected.float())
        seen += len(batch["key"])
    assert seen == SCENES.n_train  # one epoch of the resampled stream: epoch_length defaults to n_train
    # Validation in stream mode reads the same store, every sample once.
    assert len(dm.datasets["val"]) == SCENES.n_val and "train" not in dm.datasets
    assert len(dm.datasets["test"]) == SCENES.n_test


def test_augmentation_draws_once_per_image_and_changes_what_the_encoders_see(tmp_path):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    augment = ImageAugment(AugmentOptions(crop_scale=(0.2, 0.5), flip=True))
    first, again = augment(image), augment(image)
    assert first.size == image.size and first.mode == "RGB"  # still an 8-bit image of the same size
    assert np.array_equal(np.asarray(first), np.asarray(again))  # both encoders of a sample: one view
    views = {np.asarray(augment(image.copy())).tobytes() for _ in range(6)}
    assert len(views) > 1 and np.asarray(image).tobytes() not in views
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # uint8 (C, H, W) works the same way
    out = augment(tensor)
    assert out.dtype == torch.uint8 and out.shape == tensor.shape
    # Workers started by spawn/forkserver get pickled copies: both image encoders must still share one draw.
    import pickle

    from prh_stitch.encoders import build_encoder

    vit = build_encoder("tiny_vit")
    pair = pickle.loads(pickle.dumps(augmented({"a": vit, "b": vit}, AugmentOptions(crop_scale=(0.2, 0.5), flip=True))))
    assert pair["a"].augment is pair["b"].augment and pair["a"].modality == "image"
    torch.testing.assert_close(pair["a"].transform(image), pair["b"].transform(image))
    plain = object()
    assert augmented({"a": plain}, AugmentOptions())["a"] is plain  # off by default: encoders as they are
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentOptions(crop_scale=(0.5, 1.5))

    # In the stream: augmented training batches differ from the store's un-augmented features.
    module, dm = _module_and_data(tmp_path / "cache", augment=AugmentOptions(crop_scale=(0.2, 0.4), flip=True))
    assert isinstance(dm.streaming.encoders["source"], AugmentedInput)
    assert not isinstance(dm.streaming.encoders["target"], AugmentedInput)  # captions are not images
    source_request = module.feature_requests()[0]
    stored = dm.store.get(source_request.encoder, dm.shard_urls("train"), [-1], None, progress=False)
    row = {key: i for i, key in enumerate(stored.keys)}
    batch = next(iter(dm.train_dataloader()))
    source, _ = module.encode_streamed_batch(batch)
    expected = stored.layer(next(iter(stored.features)))[[row[key] for key in batch["key"]]]
    assert not torch.allclose(source, expected, atol=1e-3)


class StepLog(Callback):
    """Per-step training losses, batches per epoch and the keys each epoch streamed, on this rank."""

    def __init__(self):
        self.losses, self.batches, self.keys = [], [], []

    def on_train_epoch_start(self, trainer, module):
        self.losses.append([])
        self.batches.append(0)
        self.keys.append([])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses[-1].append(float(outputs["loss"]))
        self.batches[-1] += 1
        self.keys[-1] += batch["key"]


def test_stream_training_lowers_the_loss_and_leaves_the_encoders_frozen(tmp_path):
    cli = build_cli(stream_args(tmp_path / "run", tmp_path / "cache", "--trainer.max_epochs=6", "--model.lr=0.03"))
    log = StepLog()
    cli.trainer.callbacks.append(log)
    before = {k: v.clone() for k, v in cli.model.source_encoder.state_dict().items()}
    fit(cli)
    assert log.batches == [6] * 6  # 96 samples an epoch, batches of 16
    assert np.mean(log.losses[-1]) < 0.9 * np.mean(log.losses[0])
    after = cli.model.source_encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in cli.model.source_encoder.parameters())
    assert list(Path(tmp_path / "run").glob("**/best-*.ckpt"))
    # Tested once after fitting, as in cached mode: the selected checkpoint on the store's test features, whole set.
    from prh_stitch import load_stitcher
    from prh_stitch.evaluation.captions import caption_retrieval

    dm = cli.datamodule
    source, target, _, _ = dm.datasets["test"].tensors
    with torch.no_grad():
        expected = caption_retrieval(load_stitcher(cli.trainer.checkpoint_callback.best_model_path)(source), target,
                                     dm.captions["test"], dm.train_captions())
    assert cli.model.test_scores["subsets"]["all"]["n"] == SCENES.n_test
    for name, subset in expected["subsets"].items():
        assert cli.model.test_scores["subsets"][name] == pytest.approx(subset, abs=1e-6), name
    assert float(cli.trainer.callback_metrics["test/recall@1"]) == pytest.approx(expected["a2b/recall@1"], abs=1e-6)


def _ddp_rank(rank, world, rendezvous, root, cache, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    torch.multiprocessing.set_start_method("fork", force=True)  # DataLoader workers as in Lightning's DDP ranks
    # File rendezvous made here; Lightning, finding the process group and LOCAL_RANK, launches nothing itself.
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0")
    try:
        # 96 samples per epoch: 48 per rank, 3 batches of 16 from the rank's one worker.
        cli = build_cli(stream_args(root, cache, "--trainer.max_epochs=2", f"--trainer.devices={world}",
                                    "--trainer.strategy=ddp", "--data.num_workers=1"))
        log = StepLog()
        cli.trainer.callbacks.append(log)
        fit(cli)
        weights = cli.model.stitcher.state_dict()["core.weight"]
        Path(out, f"rank{rank}.json").write_text(json.dumps({
            "batches": log.batches, "global_step": cli.trainer.global_step, "keys": log.keys,
            "weights": weights.flatten()[:64].tolist(),
        }))
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_ranks_stream_their_own_shards_and_take_the_same_number_of_steps(tmp_path):
    torch.multiprocessing.spawn(_ddp_rank, nprocs=2, args=(2, str(tmp_path / "rendezvous"), str(tmp_path / "run"),
                                                          str(tmp_path / "cache"), str(tmp_path)))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["batches"] == ranks[1]["batches"] == [3, 3]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 6
    assert all(len(keys) == 48 for r in ranks for keys in r["keys"])
    assert ranks[0]["keys"][0] != ranks[1]["keys"][0]  # each rank draws from its own stream
    assert ranks[0]["weights"] == ranks[1]["weights"]  # DDP kept the stitchers identical


def test_stream_config_is_the_default_run_streamed():
    import yaml

    default = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    stream = yaml.safe_load((REPO / "configs" / "stream.yaml").read_text())
    assert stream["data"].pop("mode") == "stream"
    assert stream["data"].pop("stream")["augment"]["crop_scale"] is None  # augmentation off, as in the default
    assert stream["trainer"].pop("default_root_dir") == "runs/stream"
    default["trainer"].pop("default_root_dir")
    assert stream == default  # same encoders, scenes, stitcher, hyperparameters and epochs
    # Every key maps onto a constructor argument (LightningCLI refuses unknown ones).
    cli = build_cli(["--config", str(REPO / "configs" / "stream.yaml"), "--model.source.name=tiny_vit",
                     "--model.target.name=tiny_bert", "--data.stream.augment.crop_scale=[0.5, 1.0]"])
    assert cli.datamodule.mode == "stream" and cli.datamodule.stream.augment.crop_scale == (0.5, 1.0)


def test_bad_stream_settings_are_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown data mode 'streamed'"):
        StitchingDataModule(mode="streamed")
    with pytest.raises(ValueError, match="needs data.stream.epoch_length"):
        StitchingDataModule(train="a.tar", val="b.tar", test="c.tar", mode="stream")
    with pytest.raises(ValueError, match="crop_ratio"):
        AugmentOptions(crop_ratio=(2.0, 1.0))
    module = StitchingModule(source=EncoderSpec("tiny_vit"), target=EncoderSpec("tiny_bert"),
                             stitcher={"name": "linear", "fit": "ridge"})
    dm = StitchingDataModule(scenes=SCENES, cache_dir=str(tmp_path), mode="stream")
    with pytest.raises(ValueError, match="use data.mode cached"):
        module._setup_stream(dm)
