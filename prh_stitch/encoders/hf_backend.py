"""Text encoders from Hugging Face transformers: any hub id or local folder, every hidden state.

Layers are ``embeddings`` followed by ``layers.0`` ... ``layers.{L-1}`` (the model's ``hidden_states``).
Pooling: ``mean`` over real tokens (attention mask respected; the default), ``cls`` (first token) or
``last`` (last real token, the natural choice for causal LMs; correct for left and right padding).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from prh_stitch.encoders.base import FrozenEncoder
from prh_stitch.encoders.pooling import get_pooler
from prh_stitch.encoders.weights import load_state_dict_file, load_strict


class HFTextEncoder(FrozenEncoder):
    modality = "text"

    def __init__(
        self,
        model_name_or_path: str,
        pretrained: bool = True,
        checkpoint: Optional[str] = None,
        name: Optional[str] = None,
        max_length: int = 128,
        model: Optional[nn.Module] = None,
        tokenizer: Any = None,
        default_pooling: str = "mean",
    ) -> None:
        super().__init__(name or f"hf:{model_name_or_path}")
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.model_name_or_path = model_name_or_path
        try:
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
            if model is None:
                if pretrained and checkpoint is None:
                    model = AutoModel.from_pretrained(model_name_or_path)
                else:  # architecture only; weights from `checkpoint` (or random, for tests)
                    model = AutoModel.from_config(AutoConfig.from_pretrained(model_name_or_path))
        except OSError as exc:
            raise ValueError(
                f"could not load Hugging Face model {model_name_or_path!r}: {str(exc).splitlines()[0]} "
                "Give an existing local folder, or a hub id while online (it is cached for offline use after)."
            ) from None
        if checkpoint is not None:
            load_strict(model, load_state_dict_file(checkpoint), f"text model {model_name_or_path!r} from {checkpoint!r}")
        if tokenizer.pad_token is None:
            # GPT-style tokenizers have no pad token; padded positions are masked out, so any id will do.
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self._default_pooling = default_pooling
        get_pooler(default_pooling)  # fail early on a bad name
        self.freeze()

    @property
    def layer_names(self) -> List[str]:
        n = int(self.model.config.num_hidden_layers)
        return ["embeddings"] + [f"layers.{i}" for i in range(n)]

    def transform(self, raw: str) -> Dict[str, List[int]]:
        # Tokenised one caption at a time (in data workers); padding happens per batch in `collate`.
        return self.tokenizer(raw, truncation=True, max_length=self.max_length)

    def collate(self, items: Sequence[Dict[str, List[int]]]) -> Dict[str, Tensor]:
        return dict(self.tokenizer.pad(list(items), return_tensors="pt"))

    def probe_batch(self) -> Dict[str, Tensor]:
        return self.collate([self.transform("a probe sentence")])

    def preprocessing_description(self) -> Dict[str, Any]:
        return {
            "tokenizer": type(self.tokenizer).__name__,
            "vocab_size": len(self.tokenizer),
            "max_length": self.max_length,
            "padding_side": self.tokenizer.padding_side,
        }

    def _encode(self, batch: Dict[str, Tensor], layers: List[int], pooling: Optional[str]) -> List[Tensor]:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        output = self.model(**batch, output_hidden_states=True)
        hidden_states = output.hidden_states
        pool = get_pooler(pooling or self._default_pooling)
        mask = batch.get("attention_mask")
        return [pool(hidden_states[i], mask, 0).float() for i in layers]
