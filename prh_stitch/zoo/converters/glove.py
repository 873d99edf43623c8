"""GloVe vectors shipped as a ``.npy`` matrix plus a parquet word index -> safetensors + a plain ``vocab.txt``.

The word list is converted once to one word per line, so loading needs no ``pyarrow`` (needed at fetch time only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

from prh_stitch.zoo.converters.files import find_one, save_tensors


def read_words(parquet_path: Path) -> List[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(str(parquet_path))
    columns = [name for name in table.column_names if not name.startswith("__")]
    if len(columns) != 1:
        raise ValueError(f"{parquet_path.name}: expected one column of words, found {columns}")
    return [str(w) for w in table.column(columns[0]).to_pylist()]


def write_vocabulary(words: List[str], path: Path) -> None:
    bad = [w for w in words if not w or any(c in w for c in "\r\n")]
    if bad:
        raise ValueError(f"{len(bad)} words are empty or hold a line break (e.g. {bad[:3]!r}); cannot write one per line")
    if len(set(words)) != len(words):
        raise ValueError("the word index holds duplicate words; a word must name exactly one vector")
    path.write_text("\n".join(words) + "\n", encoding="utf-8")


def convert_glove(sources: Path, out: Path, options: Dict[str, Any]) -> Dict[str, Any]:
    vectors = np.load(find_one(sources, options["vectors_glob"]), allow_pickle=False)
    words = read_words(find_one(sources, options["index_glob"]))
    if vectors.ndim != 2 or vectors.shape[0] != len(words):
        raise ValueError(f"GloVe matrix of shape {vectors.shape} does not match {len(words)} words")
    save_tensors({"embeddings": torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))},
                 Path(out) / "model.safetensors")
    write_vocabulary(words, Path(out) / "vocab.txt")
    return {"words": len(words), "dim": int(vectors.shape[1])}
