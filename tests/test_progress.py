"""Long steps show a progress bar with a total (so tqdm can show an ETA): the layer sweep's cuts and bits per byte's
batches (extraction and the scoring of model pairs had theirs already); ``progress=False`` keeps stderr quiet."""

import torch

from prh_stitch.layer_stitch import layer_sweep


def test_layer_sweep_counts_its_cuts_against_their_total(tmp_path, capsys):
    layer_sweep("tiny_resnet", "tiny_resnet", ["layer2"], ["layer2", "layer3"], epochs=0, n_train=8,
                n_val=8, image_size=32, cache_dir=str(tmp_path), out=None)
    err = capsys.readouterr().err
    assert "layer sweep: cuts trained" in err and "2/2" in err
    layer_sweep("tiny_resnet", "tiny_resnet", ["pre_logits"], ["pre_logits"], epochs=0, n_train=8, n_val=8,
                image_size=32, cache_dir=str(tmp_path), out=None, progress=False)
    assert "layer sweep" not in capsys.readouterr().err


def test_bits_per_byte_counts_its_batches_against_their_total(capsys):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from prh_stitch.alignment.competence import bits_per_byte
    from prh_stitch.encoders.builtins import minilm_folder

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tokenizer))).eval()
    texts = [f"caption number {i}" for i in range(5)]
    quiet = bits_per_byte(model, tokenizer, texts, batch_size=2, progress=False)
    assert "bits per byte" not in capsys.readouterr().err
    shown = bits_per_byte(model, tokenizer, texts, batch_size=2, progress=True)
    assert "3/3" in capsys.readouterr().err  # ceil(5 / 2) batches
    assert shown["bits_per_byte"] == quiet["bits_per_byte"]
