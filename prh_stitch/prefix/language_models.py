"""The frozen causal language models a prefix map feeds: a registry by name, each built frozen and in eval mode.

``smollm2_135m`` is the zoo's SmolLM2-135M (``python -m prh_stitch.zoo fetch smollm2_135m``), loaded with its LM
head; ``tiny_gpt2`` is a seeded random GPT-2 of two layers and 32 dimensions over a word-level tokenizer of the
scenes' vocabulary, for tests and for checking an installation; ``hf:<hub id or folder>`` is any Hugging Face causal LM.
"""

from __future__ import annotations

import hashlib
import json

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from prh_stitch.registry import Registry

LANGUAGE_MODELS: Registry[Callable[..., "FrozenLanguageModel"]] = Registry("language model")


@dataclass
class FrozenLanguageModel:
    """A causal LM (``model(inputs_embeds=..., attention_mask=...).logits``) with its tokenizer and the two ids the
    prefix stitcher needs: ``start_id`` (what every caption is conditioned on after the prefix, as bits per byte
    conditions on it) and ``end_id`` (what the map learns to end a caption with, where greedy decoding stops)."""

    name: str
    model: nn.Module
    tokenizer: Any
    start_id: int
    end_id: int

    @property
    def embed_dim(self) -> int:
        return int(self.model.get_input_embeddings().embedding_dim)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def fingerprint(self) -> str:
        """Identity of what a prefix map was trained against: the weights (sampled digest) and the tokenizer."""
        from prh_stitch.encoders.base import module_digest

        vocabulary = hashlib.sha256(json.dumps(sorted(self.tokenizer.get_vocab().items())).encode()).hexdigest()
        payload = {"name": self.name, "weights": module_digest(self.model), "vocabulary": vocabulary,
                   "start_id": self.start_id, "end_id": self.end_id}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]

    def to(self, device: torch.device | str) -> "FrozenLanguageModel":
        self.model.to(device)
        return self

    def freeze(self) -> "FrozenLanguageModel":
        # eval(): no dropout, so a caption's likelihood is a function of the prefix alone; no parameter trains.
        self.model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        return self


def _special_ids(tokenizer: Any) -> tuple:
    from prh_stitch.alignment.competence import start_token_id

    start = start_token_id(tokenizer)  # BOS, else EOS (GPT-2's habit), else CLS: as bits_per_byte conditions
    for attr in ("eos_token_id", "sep_token_id"):
        end = getattr(tokenizer, attr, None)
        if end is not None:
            return start, int(end)
    raise ValueError("the language model's tokenizer has no EOS or SEP token to end captions with")


def _frozen(name: str, model: nn.Module, tokenizer: Any) -> FrozenLanguageModel:
    start, end = _special_ids(tokenizer)
    return FrozenLanguageModel(name, model, tokenizer, start, end).freeze()


@LANGUAGE_MODELS.register("smollm2_135m")
def smollm2_135m(**_: Any) -> FrozenLanguageModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prh_stitch.zoo.store import require_fetched

    folder = str(require_fetched("smollm2_135m"))
    return _frozen("smollm2_135m", AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                   AutoTokenizer.from_pretrained(folder))


def scene_word_tokenizer():
    """A word-level tokenizer over the built-in scenes' caption vocabulary (every colour, shape, plural, size,
    number, relation and background word, and ``:``/``,``), built in code: offline, and a vocabulary of ~60 keeps
    the tiny LM's output layer, hence tests, fast. Other words are ``[UNK]`` (their bytes still count)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from prh_stitch.data.scenes import BACKGROUNDS, COLOURS, NUMBER_WORDS, SHAPE_PLURALS, SIZE_RADIUS

    words = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", ":", ",", "on", "background", "and", "from", "left", "to", "right",
             "the", "of", "above", "below", "an", *NUMBER_WORDS.values(), *SIZE_RADIUS, *COLOURS,
             *SHAPE_PLURALS, *SHAPE_PLURALS.values(), *BACKGROUNDS]
    vocab = {word: i for i, word in enumerate(dict.fromkeys(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="[BOS]", eos_token="[EOS]",
                                   unk_token="[UNK]", pad_token="[PAD]")


@LANGUAGE_MODELS.register("tiny_gpt2")
def tiny_gpt2(layers: int = 2, width: int = 32, seed: int = 0, init_std: float = 0.3, **_: Any) -> FrozenLanguageModel:
    """A seeded random GPT-2 over the scene-word tokenizer, for tests and installation checks.

    ``init_std`` 0.3, not GPT-2's 0.02: a random LM initialised that small predicts nearly the same distribution
    whatever its input, so no prefix could move it; at 0.3 its output depends on its input, as a trained LM's does.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = scene_word_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=width, n_layer=layers, n_head=2,
                        initializer_range=init_std, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):  # the same random LM every time: a checkpoint reloads against it
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return _frozen("tiny_gpt2", model, tokenizer)


def load_language_model(name: str, **options: Any) -> FrozenLanguageModel:
    """A frozen causal LM by registered name, or ``hf:<hub id or local folder>``."""
    if name.startswith("hf:"):
        from prh_stitch.alignment.competence import load_causal_lm

        model, tokenizer = load_causal_lm(name)
        return _frozen(name, model, tokenizer)
    return LANGUAGE_MODELS.get(name)(**options)
