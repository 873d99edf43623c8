"""Text encoders from Hugging Face transformers: any hub id or local folder, every hidden state.

Layers are ``embeddings`` followed by ``layers.0`` ... ``layers.{L-1}`` (the model's ``hidden_states``); the text
tower of a two-tower model (``hf:PATH#text``) adds ``projection``: the model's own text embedding in the space it
shares with images (``get_text_features``), pooled by the model, so it takes pooling None or ``head`` only.
Pooling: ``mean`` over real tokens (attention mask respected; the default), ``cls`` (first token) or
``last`` (last real token, the natural choice for causal LMs; correct for left and right padding).
Loading options (``torch_dtype``, ``device_map``, ...) are described in ``prh_stitch.encoders.hf_loading``.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional, Sequence

from torch import Tensor, nn

from prh_stitch.encoders.base import FrozenEncoder
from prh_stitch.encoders.hf_loading import LoadingOptions, load_tower, split_tower
from prh_stitch.encoders.pooling import get_pooler

PROJECTION_LAYER = "projection"


class KeepsDeviceMapPlacement(nn.Module):
    """A model placed by a ``device_map`` (one GPU, or a large model spread over several by accelerate) stays where it
    was put: ``.to(...)`` is a no-op for it (the feature store moves encoders to its device and back to the CPU), and
    inputs go to the device of its first parameter (accelerate's hooks move them on from there)."""

    _placed_by_device_map = False

    def _apply(self, fn, recurse=True):
        if self._placed_by_device_map:
            return self
        return super()._apply(fn, recurse)


def check_head_pooling(names: List[str], layers: List[int], pooling: Optional[str], head: str, encoder: str) -> None:
    """A layer pooled by the model itself takes pooling None or ``head``; every other layer takes a pooler."""
    for layer in layers:
        if names[layer] == head and pooling not in (None, "head"):
            raise ValueError(f"layer {head!r} of {encoder!r} is pooled by the model itself; "
                             f"use pooling None or 'head' for it (got {pooling!r})")
        if names[layer] != head and pooling == "head":
            raise ValueError(f"pooling 'head' applies only to the layer {head!r} of {encoder!r}")


class HFTextEncoder(KeepsDeviceMapPlacement, FrozenEncoder):
    head_layer = PROJECTION_LAYER
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
        projection: Optional[nn.Module] = None,
        torch_dtype: Optional[str] = None,
        device_map: Any = None,
        revision: Optional[str] = None,
        trust_remote_code: bool = False,
        attn_implementation: Optional[str] = None,
    ) -> None:
        super().__init__(name or f"hf:{model_name_or_path}")
        from transformers import AutoTokenizer

        path, _ = split_tower(model_name_or_path)
        self.model_name_or_path = model_name_or_path
        if model is None:
            model, projection, self._placed_by_device_map = load_tower(
                model_name_or_path, pretrained, checkpoint,
                LoadingOptions(torch_dtype, device_map, revision, trust_remote_code, attn_implementation), "text",
                self.name)
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
            except OSError as exc:
                raise ValueError(f"could not load the tokenizer of {path!r}: {str(exc).splitlines()[0]}") from None
        if tokenizer.pad_token is None:
            # GPT-style tokenizers have no pad token; padded positions are masked out, so any id will do.
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self.model = model
        self.projection = projection
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self._default_pooling = default_pooling
        get_pooler(default_pooling)  # fail early on a bad name
        self.freeze()

    @property
    def layer_names(self) -> List[str]:
        n = int(self.model.config.num_hidden_layers)
        head = [PROJECTION_LAYER] if self.projection is not None else []
        return ["embeddings"] + [f"layers.{i}" for i in range(n)] + head

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
        names = self.layer_names
        check_head_pooling(names, layers, pooling, PROJECTION_LAYER, self.name)
        # Only what the model's forward names: a tokenizer may give more (BERT's token_type_ids) than a tower takes.
        accepted = inspect.signature(self.model.forward).parameters
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if k in accepted}
        output = self.model(**batch, output_hidden_states=True)
        hidden_states = output.hidden_states
        pool = get_pooler(pooling or self._default_pooling) if pooling != "head" else None
        mask = batch.get("attention_mask")
        return [self.projection(output.pooler_output).float() if names[i] == PROJECTION_LAYER
                else pool(hidden_states[i], mask, 0).float() for i in layers]
