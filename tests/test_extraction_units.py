"""The ranks extracting one entry together (``Ranks``) and the worker side of extraction (``unit_batches``).

``Ranks.agree`` is what keeps a DDP extraction from hanging or half-committing when one rank fails: every rank must
raise, the failing one its own error, the others an error of the same kind naming the rank. ``unit_batches`` turns a
consumer's samples into encoder batches that never span two units, with repeated captions of a unit (text encoders
only) travelling without model input.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from prh_stitch.data.extraction_units import Ranks, UnitDone, _label, unit_batches
from prh_stitch.data.store_entry import BadFeatures, EntryMismatch, IncompleteShards
from prh_stitch.encoders import build_encoder
from prh_stitch.errors import UserError


def simulated(rank, contributions, sent=None):
    """Rank ``rank`` of ``len(contributions)``; the others contribute what the list says (None: no error)."""

    def exchange(obj):
        if sent is not None:
            sent.append(obj)
        everyone = list(contributions)
        everyone[rank] = obj
        return everyone

    return Ranks(rank, len(contributions), exchange)


# -- Ranks.agree -------------------------------------------------------------------------------------------------


def test_agree_without_failures_returns_every_ranks_none():
    sent = []
    assert simulated(1, [None, None, None], sent).agree(None) == [None, None, None]
    assert sent == [None]
    assert Ranks().agree(None) == [None]  # a single process


def test_a_failing_rank_sends_its_error_and_raises_it_itself():
    sent = []
    mine = UserError("shard 3 is cut")
    with pytest.raises(UserError) as raised:
        simulated(0, [None, ("ValueError", "another problem")], sent).agree(mine)
    assert raised.value is mine  # its own error, not the other rank's, and not re-wrapped
    assert sent == [("UserError", "shard 3 is cut")]


@pytest.mark.parametrize("kind", [BadFeatures, EntryMismatch, IncompleteShards, UserError, ValueError])
def test_the_other_ranks_raise_a_user_error_of_the_same_kind_naming_the_rank(kind):
    with pytest.raises(kind) as raised:
        simulated(0, [None, None, (kind.__name__, "no good sample")]).agree(None)
    assert type(raised.value) is kind
    assert str(raised.value) == "feature extraction failed on rank 2: no good sample"


def test_an_unexpected_failure_elsewhere_is_a_runtime_error_and_the_first_failing_rank_is_named():
    with pytest.raises(RuntimeError) as raised:
        simulated(3, [None, ("KeyError", "'layer'"), ("UserError", "later rank"), None]).agree(None)
    assert type(raised.value) is RuntimeError
    assert str(raised.value) == "feature extraction failed on rank 1: 'layer'"


def test_ranks_of_a_trainer_are_one_process_unless_several_run():
    for trainer in (None, SimpleNamespace(world_size=1)):
        ranks = Ranks.from_trainer(trainer)
        assert (ranks.rank, ranks.world, ranks.exchange("x")) == (0, 1, ["x"])
    # Several processes but no initialised group (e.g. a trainer not yet launched): one process, not a hang.
    ranks = Ranks.from_trainer(SimpleNamespace(world_size=2))
    assert (ranks.rank, ranks.world, ranks.exchange("x")) == (0, 1, ["x"])


def test_in_an_initialised_group_ranks_exchange_through_it_and_a_one_process_trainer_never_does(tmp_path, monkeypatch):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        sent = []
        gather = dist.all_gather_object

        def counted(gathered, obj, *args, **kwargs):
            sent.append(obj)
            return gather(gathered, obj, *args, **kwargs)

        monkeypatch.setattr(dist, "all_gather_object", counted)
        ranks = Ranks.from_torch()
        assert (ranks.rank, ranks.world) == (0, 1)
        assert ranks.exchange({"rank": 0}) == [{"rank": 0}] and sent == [{"rank": 0}]
        one = Ranks.from_trainer(SimpleNamespace(world_size=1))  # one process: no collective, even with a group
        assert one.exchange("x") == ["x"] and sent == [{"rank": 0}]
        several = Ranks.from_trainer(SimpleNamespace(world_size=2))  # several: the group's collective
        assert several.exchange("y") == ["y"] and sent == [{"rank": 0}, "y"]
    finally:
        dist.destroy_process_group()


def _agree_on_rank(rank, world, rendezvous, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        ranks = Ranks.from_torch()
        trainer = Ranks.from_trainer(SimpleNamespace(world_size=world))
        first = ranks.exchange({"rank": rank})
        assert trainer.exchange({"rank": rank}) == first
        try:
            ranks.agree(UserError("bad shard") if rank == 1 else None)
            outcome = "no error"
        except Exception as exc:  # noqa: BLE001 - what each rank raised is the result
            outcome = f"{type(exc).__name__}: {exc}"
        Path(out, f"rank{rank}.json").write_text(json.dumps({
            "ranks": [ranks.rank, ranks.world], "trainer": [trainer.rank, trainer.world], "first": first,
            "outcome": outcome}))
    finally:
        dist.destroy_process_group()


def test_over_torch_distributed_every_rank_raises_when_one_fails(tmp_path):
    # Forked, not spawned: nothing here needs a fresh interpreter, and forked ranks run the code under test as
    # this process has it (mutation testing swaps functions in memory).
    torch.multiprocessing.start_processes(_agree_on_rank, args=(3, str(tmp_path / "rendezvous"), str(tmp_path)),
                                          nprocs=3, start_method="fork")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert [r["ranks"] for r in results] == [[0, 3], [1, 3], [2, 3]]
    assert [r["trainer"] for r in results] == [[0, 3], [1, 3], [2, 3]]
    assert all(r["first"] == [{"rank": 0}, {"rank": 1}, {"rank": 2}] for r in results)
    assert [r["outcome"] for r in results] == ["UserError: feature extraction failed on rank 1: bad shard",
                                                "UserError: bad shard",
                                                "UserError: feature extraction failed on rank 1: bad shard"]


# -- unit_batches -------------------------------------------------------------------------------------------------


def _sample(key, caption, unit):
    return {"key": key, "caption": caption, "label": int(key[1:]) % 3, "unit": unit, "meta": {}, "url": "u.tar",
            "image": Image.new("RGB", (20, 20), (int(key[1:]) * 20, 0, 0))}


def _done(shard, block):
    return UnitDone(shard, block, "u.tar", 5, False, 5, {})


def stream():
    """Unit (0, 0): 5 samples with repeated captions; its end; unit (0, 1): 3 samples, one caption of unit (0, 0)
    again (a new unit: encoded again); its end; then 2 samples of unit (1, 0) whose end never comes (the stream is
    cut: the last batch still goes out)."""
    a, b, c = "a red circle", "two blue squares", "one star"
    return [_sample("k0", a, (0, 0)), _sample("k1", b, (0, 0)), _sample("k2", a, (0, 0)), _sample("k3", a, (0, 0)),
            _sample("k4", b, (0, 0)), _done(0, 0),
            _sample("k5", a, (0, 1)), _sample("k6", c, (0, 1)), _sample("k7", c, (0, 1)), _done(0, 1),
            _sample("k8", b, (1, 0)), _sample("k9", b, (1, 0))]


def _summary(events):
    out = []
    for kind, item in events:
        if kind == "batch":
            out.append(("batch", item["key"], item["repeat"]))
        else:
            out.append((kind, (item.shard, item.block)))
    return out


def test_a_text_encoders_batches_stay_in_their_unit_and_carry_repeated_captions_without_input():
    encoder = build_encoder("tiny_bert")
    events = list(unit_batches(stream(), 2, encoder))
    assert _summary(events) == [
        ("batch", ["k0", "k1"], [False, False]),
        ("batch", ["k2", "k3"], [True, True]),
        ("batch", ["k4"], [True]),
        ("done", (0, 0)),
        ("batch", ["k5", "k6"], [False, False]),
        ("batch", ["k7"], [True]),
        ("done", (0, 1)),
        ("batch", ["k8", "k9"], [False, True]),
    ]
    samples = {s["key"]: s for s in stream() if isinstance(s, dict)}
    for kind, batch in events:
        if kind != "batch":
            continue
        assert batch["caption"] == [samples[k]["caption"] for k in batch["key"]]
        assert batch["label"] == [samples[k]["label"] for k in batch["key"]]
        assert batch["unit"] == [samples[k]["unit"] for k in batch["key"]]
        new = [samples[k]["caption"] for k, r in zip(batch["key"], batch["repeat"]) if not r]
        if not new:
            assert batch["inputs"] == {}  # a batch of repeats only: nothing for the model
            continue
        expected = encoder.collate([encoder.transform(c) for c in new])
        assert set(batch["inputs"]["encoder"]) == set(expected)
        for name, tensor in expected.items():  # only the new captions, in order
            assert torch.equal(batch["inputs"]["encoder"][name], tensor)


def test_an_image_encoders_samples_are_all_encoded_and_a_full_batch_goes_before_the_next_sample():
    encoder = build_encoder("tiny_vit")
    events = list(unit_batches(stream(), 3, encoder))
    assert _summary(events) == [
        ("batch", ["k0", "k1", "k2"], [False] * 3),
        ("batch", ["k3", "k4"], [False] * 2),
        ("done", (0, 0)),
        ("batch", ["k5", "k6", "k7"], [False] * 3),
        ("done", (0, 1)),
        ("batch", ["k8", "k9"], [False] * 2),
    ]
    samples = {s["key"]: s for s in stream() if isinstance(s, dict)}
    for kind, batch in events:
        if kind == "batch":
            expected = encoder.collate([encoder.transform(samples[k]["image"]) for k in batch["key"]])
            assert torch.equal(batch["inputs"]["encoder"], expected)


def test_a_unit_end_with_nothing_pending_sends_no_empty_batch():
    encoder = build_encoder("tiny_vit")
    items = [_sample("k0", "x", (0, 0)), _sample("k1", "y", (0, 0)), _done(0, 0), _done(0, 1)]
    assert _summary(unit_batches(items, 2, encoder)) == [("batch", ["k0", "k1"], [False, False]),
                                                         ("done", (0, 0)), ("done", (0, 1))]
    assert list(unit_batches([], 2, encoder)) == []


def test_a_samples_label_is_its_metadatas_number_else_minus_one():
    assert [_label({"label": 4}), _label({"label": 2.0}), _label({"label": 0})] == [4, 2, 0]
    # No label, a label that is not a number, metadata that is not a mapping: -1 (the store's "no label").
    assert [_label({}), _label({"label": "cat"}), _label({"label": None}), _label(["label", 3]), _label(None),
            _label("label")] == [-1] * 6
