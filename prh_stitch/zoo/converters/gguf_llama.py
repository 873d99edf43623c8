"""A Llama-family GGUF file (llama.cpp's format, any quantisation) -> a float32 Hugging Face folder.

transformers reads GGUF itself (``from_pretrained(folder, gguf_file=...)``): it dequantises every tensor, undoes
llama.cpp's rotary re-ordering of the query and key rows, and rebuilds the tokenizer from the file's metadata. That
needs the ``gguf`` package and takes tens of seconds, so it happens once here; later loads read plain safetensors.
Tensors are kept in float32: the dequantised values (scale * q + min) are not all representable in 16 bits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from prh_stitch.zoo.converters.files import find_one, save_tensors


def load_gguf_causal_lm(gguf_path: Path) -> Tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval(), tokenizer


def untied_state_dict(model: Any) -> Dict[str, torch.Tensor]:
    """The state dict without the output projection when it is tied to the input embeddings (safetensors cannot
    store one tensor under two names; the config's ``tie_word_embeddings`` restores the tie on load)."""
    state = dict(model.state_dict())
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def convert_gguf_llama(sources: Path, out: Path, options: Dict[str, Any]) -> Dict[str, Any]:
    gguf_path = find_one(sources, options["gguf_glob"])
    model, tokenizer = load_gguf_causal_lm(gguf_path)
    save_tensors(untied_state_dict(model), Path(out) / "model.safetensors")
    model.config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return {"gguf": gguf_path.name, "parameters": int(sum(p.numel() for p in model.parameters()))}
