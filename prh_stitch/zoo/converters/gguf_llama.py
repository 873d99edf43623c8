"""A Llama-family GGUF file (llama.cpp's format, any quantisation) -> a float32 Hugging Face folder.

transformers reads GGUF itself (``from_pretrained(folder, gguf_file=...)``): it dequantises every tensor, undoes
llama.cpp's rotary re-ordering of the query and key rows, and rebuilds the tokenizer from the file's metadata. That
needs the ``gguf`` package and takes tens of seconds, so it happens once here; later loads read plain safetensors.
Tensors are kept in float32: the dequantised values (scale * q + min) are not all representable in 16 bits.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict

import torch

from prh_stitch.zoo.converters.files import find_one, save_tensors


# Texts whose encoding and decoding, with the vocabulary and the special ids, make a converted tokenizer's digest.
TOKENIZER_PROBES = ("a small red circle to the left of a large blue square on a gray background",
                    "  Two spaces, UTF-8: café, naïve, 東京 — and 1,234!\n")
_SPECIAL_ROLES = {"bos": "bos_token", "eos": "eos_token", "unknown": "unk_token", "padding": "pad_token"}


def gguf_special_token_ids(gguf_path: Path) -> Dict[str, int]:
    """The special token ids the GGUF file states ({bos, eos, unknown, padding}: those present)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields
    found = {}
    for role in _SPECIAL_ROLES:
        field = fields.get(f"tokenizer.ggml.{role}_token_id")
        if field is not None:
            found[role] = int(field.parts[field.data[0]][0])
    return found


def load_gguf_tokenizer(gguf_path: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # transformers versions rebuild the special tokens differently (5.17 made SmolLM2's <|im_start|> its end token,
    # 5.24 <|im_end|>, as the file says): the file's own ids decide, so every version converts to one tokenizer.
    for role, token_id in gguf_special_token_ids(gguf_path).items():
        setattr(tokenizer, _SPECIAL_ROLES[role], tokenizer.convert_ids_to_tokens(token_id))
    return tokenizer


def load_gguf_model(gguf_path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    return model.eval()


def tokenizer_digest(tokenizer: Any) -> str:
    """What the project uses of a tokenizer, hashed: the vocabulary, the special ids, and how the probe texts encode
    and decode. Two conversions with one digest tokenize and detokenize captions alike."""
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in TOKENIZER_PROBES]
    payload = {"vocabulary": sorted(tokenizer.get_vocab().items()), "encoded": encoded,
               "decoded": [tokenizer.decode(ids) for ids in encoded],
               "special": {role: getattr(tokenizer, f"{attr}_id") for role, attr in _SPECIAL_ROLES.items()}}
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode("utf-8")).hexdigest()


def untied_state_dict(model: Any) -> Dict[str, torch.Tensor]:
    """The state dict without the output projection when it is tied to the input embeddings (safetensors cannot
    store one tensor under two names; the config's ``tie_word_embeddings`` restores the tie on load)."""
    state = dict(model.state_dict())
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def convert_gguf_llama(sources: Path, out: Path, options: Dict[str, Any]) -> Dict[str, Any]:
    gguf_path = find_one(sources, options["gguf_glob"])
    tokenizer = load_gguf_tokenizer(gguf_path)  # checked first: dequantising the weights takes tens of seconds
    digest = tokenizer_digest(tokenizer)
    recorded = options.get("tokenizer_digest")
    if recorded and digest != recorded:
        import transformers

        # The weights' sha256 cannot see this: the tokenizer is rebuilt from the file's metadata by transformers.
        raise ValueError(f"transformers {transformers.__version__} converts {gguf_path.name}'s tokenizer differently "
                         f"(digest {digest[:12]}..., the project records {recorded[:12]}...): it would tokenize or "
                         "decode captions otherwise; fetch again with a transformers version the zoo entry names "
                         "as verified (python -m prh_stitch.zoo list); nothing was installed")
    model = load_gguf_model(gguf_path)
    save_tensors(untied_state_dict(model), Path(out) / "model.safetensors")
    model.config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return {"gguf": gguf_path.name, "parameters": int(sum(p.numel() for p in model.parameters())),
            "tokenizer_digest": digest}
