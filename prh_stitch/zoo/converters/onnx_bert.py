"""A BERT exported to ONNX -> a Hugging Face ``BertModel`` folder.

The exporter keeps the names of embeddings, LayerNorms and biases (``<prefix>encoder.layer.0.attention.self.query.bias``)
but turns every dense weight into an anonymous ``MatMul`` initializer (``onnx::MatMul_470``). Each such MatMul is
followed by an ``Add`` with its layer's bias, so the bias's name names the weight; ONNX multiplies ``x @ W`` where
``nn.Linear`` stores ``W.T``, hence the transpose. The result must fill ``BertModel(add_pooling_layer=False)`` exactly.

Reading uses the ``onnx`` package (the reference parser of the format; needed at fetch time only).
"""

from __future__ import annotations

import re
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np
import torch

from prh_stitch.encoders.weights import load_strict
from prh_stitch.zoo.converters.files import find_one, save_tensors

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def onnx_bert_state_dict(model: Any, prefix: str) -> Tuple[Dict[str, np.ndarray], float]:
    """(state dict with Hugging Face key names, LayerNorm epsilon) from a loaded ``onnx.ModelProto``."""
    from onnx import numpy_helper

    graph = model.graph
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: Dict[str, List[Any]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    state = {name[len(prefix):]: array for name, array in initializers.items() if name.startswith(prefix)}
    anonymous = {name for name in initializers if not name.startswith(prefix)}
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in anonymous:
            continue
        adds = [n for n in consumers[node.output[0]] if n.op_type == "Add"]
        biases = [i for add in adds for i in add.input if i.endswith(".bias") and i.startswith(prefix)]
        if len(biases) != 1:
            raise ValueError(f"MatMul weight {node.input[1]!r} is not followed by exactly one Add with a named bias")
        key = biases[0][len(prefix):-len("bias")] + "weight"
        if key in state:
            raise ValueError(f"two MatMul weights claim {key!r}; the graph is not a plain BERT export")
        state[key] = np.ascontiguousarray(initializers[node.input[1]].T)
        anonymous.discard(node.input[1])
    epsilons = {round(float(a.f), 12) for n in graph.node if n.op_type == "LayerNormalization"
                for a in n.attribute if a.name == "epsilon"}
    if len(epsilons) != 1:
        raise ValueError(f"expected one LayerNormalization epsilon in the graph, found {sorted(epsilons)}")
    return state, epsilons.pop()


def bert_config_from_state(state: Mapping[str, np.ndarray], num_attention_heads: int, eps: float) -> Any:
    from transformers import BertConfig

    layers = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
    if layers != set(range(len(layers))) or not layers:
        raise ValueError(f"encoder layers in the ONNX graph are not numbered 0..N-1: {sorted(layers)}")
    vocab, hidden = state["embeddings.word_embeddings.weight"].shape
    return BertConfig(
        vocab_size=int(vocab), hidden_size=int(hidden), num_hidden_layers=len(layers),
        num_attention_heads=int(num_attention_heads),
        intermediate_size=int(state["encoder.layer.0.intermediate.dense.bias"].shape[0]),
        max_position_embeddings=int(state["embeddings.position_embeddings.weight"].shape[0]),
        type_vocab_size=int(state["embeddings.token_type_embeddings.weight"].shape[0]),
        layer_norm_eps=eps, hidden_act="gelu",
    )


def bert_from_onnx(onnx_path: Path, prefix: str, num_attention_heads: int) -> Any:
    """A ``BertModel`` holding exactly the ONNX graph's weights (strict load: nothing missing, nothing left over)."""
    import onnx
    from transformers import BertModel

    state, eps = onnx_bert_state_dict(onnx.load(str(onnx_path)), prefix)
    config = bert_config_from_state(state, num_attention_heads, eps)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the random init is overwritten; the seed only keeps the caller's RNG untouched
        model = BertModel(config, add_pooling_layer=False)
    load_strict(model, {k: torch.from_numpy(np.array(v)) for k, v in state.items()}, f"ONNX BERT {onnx_path.name}")
    return model.eval()


def copy_tokenizer(tokenizer_dir: Path, out: Path, vocab_size: int) -> List[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copyfile(Path(tokenizer_dir) / name, Path(out) / name)
            copied.append(name)
    words = (Path(out) / "vocab.txt").read_text(encoding="utf-8").splitlines() if "vocab.txt" in copied else []
    if len(words) != vocab_size:
        raise ValueError(f"tokenizer in {tokenizer_dir} has {len(words)} words, the model's embeddings {vocab_size}")
    return copied


def tokenizer_folder(name: str) -> Path:
    if name == "minilm_l6":
        from prh_stitch.encoders.builtins import minilm_folder

        return Path(minilm_folder())
    return Path(name)


def convert_onnx_bert(sources: Path, out: Path, options: Dict[str, Any]) -> Dict[str, Any]:
    onnx_path = find_one(sources, options["onnx_glob"])
    model = bert_from_onnx(onnx_path, options["prefix"], options["num_attention_heads"])
    save_tensors(model.state_dict(), Path(out) / "model.safetensors")
    model.config.to_json_file(str(Path(out) / "config.json"))
    copied = copy_tokenizer(tokenizer_folder(options["tokenizer"]), Path(out), model.config.vocab_size)
    return {"onnx": onnx_path.name, "tokenizer_files": copied, "layer_norm_eps": model.config.layer_norm_eps}
