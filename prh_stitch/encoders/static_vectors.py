"""A non-contextual text encoder: lowercase words looked up in a table of static word vectors, then averaged.

The baseline every contextual text model should beat (GloVe's ``the`` means the same in every caption). It has one
layer, ``word_mean``; words missing from the vocabulary are dropped, and a caption with no known word gets the zero
vector (the mean pooler's convention for an empty row).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from prh_stitch.encoders.base import FrozenEncoder
from prh_stitch.encoders.pooling import mean_pool

# Words and single punctuation marks, as GloVe's lowercased, tokenised training text has them.
WORD_PATTERN = r"\w+|[^\w\s]"


def tokenize_words(text: str) -> List[str]:
    return re.findall(WORD_PATTERN, text.lower())


class StaticWordEncoder(FrozenEncoder):
    modality = "text"
    LAYER = "word_mean"

    def __init__(self, words: Sequence[str], vectors: Tensor, name: str, max_words: int = 128) -> None:
        super().__init__(name)
        if vectors.ndim != 2 or vectors.shape[0] != len(words):
            raise ValueError(f"{name}: {len(words)} words but a vector table of shape {tuple(vectors.shape)}")
        self.index: Dict[str, int] = {word: i for i, word in enumerate(words)}
        self.embeddings = nn.Embedding.from_pretrained(vectors.float(), freeze=True)
        self.max_words = int(max_words)
        self.freeze()

    @classmethod
    def from_folder(cls, folder: str | Path, name: str, max_words: int = 128) -> "StaticWordEncoder":
        """A folder with ``vocab.txt`` (one word per line, row order) and ``model.safetensors`` (``embeddings``)."""
        from safetensors.torch import load_file

        words = (Path(folder) / "vocab.txt").read_text(encoding="utf-8").splitlines()
        return cls(words, load_file(str(Path(folder) / "model.safetensors"))["embeddings"], name, max_words)

    @property
    def layer_names(self) -> List[str]:
        return [self.LAYER]

    def transform(self, raw: str) -> List[int]:
        ids = [self.index[w] for w in tokenize_words(raw) if w in self.index]
        return ids[: self.max_words]

    def collate(self, items: Sequence[List[int]]) -> Dict[str, Tensor]:
        width = max([len(ids) for ids in items] + [1])
        input_ids = torch.zeros(len(items), width, dtype=torch.long)
        mask = torch.zeros(len(items), width, dtype=torch.long)
        for row, ids in enumerate(items):
            input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def probe_batch(self) -> Dict[str, Tensor]:
        return self.collate([self.transform("a probe sentence")])

    def preprocessing_description(self) -> Dict[str, Any]:
        return {"tokenizer": WORD_PATTERN, "lowercase": True, "vocab_size": len(self.index), "max_words": self.max_words}

    def _encode(self, batch: Dict[str, Tensor], layers: List[int], pooling: Optional[str]) -> List[Tensor]:
        if pooling not in (None, "mean"):
            raise ValueError(f"{self.name!r} averages word vectors; use pooling None or 'mean' (got {pooling!r})")
        input_ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        pooled = mean_pool(self.embeddings(input_ids), mask).float()
        return [pooled for _ in layers]
