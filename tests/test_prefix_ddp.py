"""Prefix stitching under DDP: two CPU processes (gloo, file rendezvous) run the shrunk prefix config through
train.py's own code path, and every rank is checked against one process scoring the whole split."""

import math
import os

import pytest
import torch
from pytorch_lightning import Callback

from prh_stitch.checkpoint import read_checkpoint
from prh_stitch.cli import build_cli, fit
from prh_stitch.prefix import load_language_model, load_prefix_map
from prh_stitch.prefix.captions import caption_nats, tokenize_captions
from prh_stitch.prefix.evaluation import evaluate_prefix

from test_prefix_config import SHRINK

WORLD = 2
N_TRAIN, N_VAL, N_TEST = 30, 15, 13  # odd val and test: the DistributedSampler pads rank 1 with a repeat of row 0
BATCH, EPOCHS = 4, 2


def prefix_args(root, *extra):
    # The shrunk shipped config, with every training and validation batch (the config limits both), small batches
    # so that each rank takes several steps and validates over several batches.
    return ["--config", "prefix_smollm2", *SHRINK, "--trainer.default_root_dir", str(root / "run"),
            "--data.init_args.cache_dir", str(root / "cache"), "--data.init_args.scenes.n_train", str(N_TRAIN),
            "--data.init_args.scenes.n_val", str(N_VAL), "--data.init_args.scenes.n_test", str(N_TEST),
            "--data.init_args.batch_size", str(BATCH), "--trainer.max_epochs", str(EPOCHS),
            "--trainer.limit_train_batches", "1.0", "--trainer.limit_val_batches", "1.0", *extra]


class PrefixSeen(Callback):
    """What one rank did: its map before training and after each validation, the validation rows it scored, its
    optimizer steps per epoch and the logged validation bits per byte."""

    def __init__(self):
        self.initial, self.maps, self.val_index, self.val, self.steps = None, [], [], [], []

    def on_train_start(self, trainer, pl_module):
        self.initial = {k: v.clone() for k, v in pl_module.stitcher.state_dict().items()}

    def on_train_epoch_end(self, trainer, pl_module):
        self.steps.append(trainer.global_step)

    def on_validation_epoch_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.val_index.append([])

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.val_index[-1] += batch[2].tolist()

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.maps.append({k: v.clone() for k, v in pl_module.stitcher.state_dict().items()})

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.val.append(float(trainer.callback_metrics["val/bits_per_byte"]))


def _prefix_ddp_worker(rank, world, root):
    import torch.distributed as dist

    torch.set_num_threads(1)  # two ranks on a small machine
    # LOCAL_RANK marks the process as launched from outside, so Lightning joins this process group, not its own.
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world)
    try:
        cli = build_cli(prefix_args(root, "--trainer.accelerator=cpu", f"--trainer.devices={world}",
                                    "--trainer.strategy=ddp"))
        seen = PrefixSeen()
        cli.trainer.callbacks.append(seen)
        fit(cli)
        best = cli.trainer.checkpoint_callback.best_model_path
        # train.py tests feature stitchers only; the prefix module's test split is scored the same way here.
        cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best, verbose=False)
        torch.save({"initial": seen.initial, "maps": seen.maps, "val_index": seen.val_index, "val": seen.val,
                    "steps": seen.steps, "global_step": cli.trainer.global_step, "best": best,
                    "test": cli.model.test_scores, "lm": cli.model.lm.fingerprint()}, root / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_prefix_ddp_keeps_replicas_equal_and_scores_each_caption_once(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_prefix_ddp_worker, args=(WORLD, tmp_path), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    # The same number of optimizer steps on both ranks: 15 training rows per rank, batches of 4, every epoch.
    per_epoch = math.ceil(math.ceil(N_TRAIN / WORLD) / BATCH)
    for seen in ranks:
        assert seen["steps"] == [per_epoch * (e + 1) for e in range(EPOCHS)]
        assert seen["global_step"] == per_epoch * EPOCHS
        assert seen["lm"] == load_language_model("tiny_gpt2").fingerprint()  # the frozen LM stayed as loaded
    # The ranks validated disjoint halves, rank 1 padded with a repeat of row 0: the case the metric must handle.
    for epoch in range(EPOCHS):
        rows = ranks[0]["val_index"][epoch] + ranks[1]["val_index"][epoch]
        assert len(rows) == N_VAL + 1 and sorted(set(rows)) == list(range(N_VAL))
        assert ranks[1]["val_index"][epoch][-1] == 0

    # DDP kept the maps bit-identical after every epoch, and training moved them.
    for epoch in range(EPOCHS):
        for key, value in ranks[0]["maps"][epoch].items():
            torch.testing.assert_close(ranks[1]["maps"][epoch][key], value, rtol=0, atol=0)
    assert ranks[0]["initial"].keys() == ranks[0]["maps"][0].keys()
    for key, value in ranks[0]["initial"].items():
        torch.testing.assert_close(ranks[1]["initial"][key], value, rtol=0, atol=0)
    moved = [key for key, value in ranks[0]["initial"].items() if not torch.equal(value, ranks[0]["maps"][0][key])]
    assert "core.weight" in moved and not torch.equal(ranks[0]["maps"][0]["core.weight"],
                                                      ranks[0]["maps"][1]["core.weight"])

    # The one-process reference: the whole validation split from the run's feature store, each caption once.
    reference = build_cli(prefix_args(tmp_path, "--trainer.accelerator=cpu", "--trainer.devices=1"))
    module, dm = reference.model, reference.datamodule
    dm.setup_features(module.feature_request(), module.feature_request())
    features = dm.datasets["val"].tensors[0]
    tokens = tokenize_captions(module.lm, dm.captions["val"])
    assert len(features) == len(tokens) == N_VAL
    expected = []
    for state in ranks[0]["maps"]:
        module.stitcher.load_state_dict(state)
        with torch.no_grad():
            nats = caption_nats(module.lm, module.prefix(features), tokens)
        expected.append(float(nats.sum() / math.log(2) / tokens.bytes.sum()))
    assert expected[0] != expected[1]
    for rank, seen in enumerate(ranks):
        assert seen["val"] == pytest.approx(expected, rel=1e-6, abs=0), rank

    # The best checkpoint is the epoch of the lowest validation score; it loads on one process (as evaluate.py
    # loads it) with rank 0's weights of that epoch.
    best = ranks[0]["best"]
    assert ranks[1]["best"] == best
    epoch = int(read_checkpoint(best)["epoch"])
    assert epoch == min(range(EPOCHS), key=lambda e: expected[e])
    loaded = load_prefix_map(best).stitcher.state_dict()
    assert loaded.keys() == ranks[0]["maps"][epoch].keys()
    for key, value in ranks[0]["maps"][epoch].items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)

    # The test split (13 captions: padded too) is scored once per caption on every rank, with the selected
    # checkpoint: what evaluate.py prefix computes on one process.
    report = evaluate_prefix(best, split="test", generate=0, bootstrap=10, cache_dir=str(tmp_path / "cache"),
                             progress=False).report
    assert report["split"]["captions"] == N_TEST
    for rank, seen in enumerate(ranks):
        assert seen["test"]["captions"] == N_TEST, rank
        assert seen["test"]["bits_per_byte"] == pytest.approx(report["bits_per_byte"]["prefix"]["bits_per_byte"],
                                                              rel=1e-6, abs=0), rank
