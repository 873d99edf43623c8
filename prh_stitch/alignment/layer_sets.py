"""Which layers a headline may use: the best layer pair with and without non-contextual layers.

The rule (stated in every report that uses it): a layer is **non-contextual** when it is the output of an input
embedding, i.e. a lookup table or patch projection that no token-mixing layer has seen yet, so each token's vector
does not depend on the rest of the input. By name: its last dotted component is one of
``NON_CONTEXTUAL_NAMES`` (``embeddings`` of the Hugging Face text encoders, ``patch_embed`` of timm ViTs,
``word_mean`` of a static word-vector model such as GloVe, whose one layer is a bag of words by construction, ...).
A model whose every layer is non-contextual drops out of the contextual-only comparison.
Mean-pooled, such a layer is a bag of words: on templated captions it can align with an image model better than
any contextual layer (issue #10 found MiniLM's ``embeddings`` the best text layer for all three vision models of
the offline study on the templated scene captions), which says little about converging representations. Reports
give the max over all layer pairs (the paper's) and the max over pairs of contextual layers only.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

NON_CONTEXTUAL_NAMES = frozenset({"embeddings", "embedding", "embed", "embed_tokens", "word_embeddings", "wte",
                                  "tok_embeddings", "patch_embed",
                                  "word_mean"})  # a static word-vector model's only layer (GloVe): nothing else

RULE = ("non-contextual layers (input embeddings: a layer whose name ends in one of "
        + ", ".join(sorted(NON_CONTEXTUAL_NAMES)) + ") left out")


def is_non_contextual(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in NON_CONTEXTUAL_NAMES


def contextual_indices(names: Sequence[str]) -> List[int]:
    return [i for i, n in enumerate(names) if not is_non_contextual(n)]


def best_without_non_contextual(record: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The best layer pair of ``record["matrix"]`` among contextual layers; None when a side has none left.

    Read off the full layer × layer matrix already scored (no rescoring): ``score``, the layer indices and names,
    ``excluded`` (the layer names left out) and ``same_as_best`` (the overall best pair was contextual anyway).
    """
    names_a, names_b, matrix = record["layers_a"], record["layers_b"], record["matrix"]
    keep_a, keep_b = contextual_indices(names_a), contextual_indices(names_b)
    excluded = [n for n in list(names_a) + list(names_b) if is_non_contextual(n)]
    if not keep_a or not keep_b:
        return None
    score, i, j = max((matrix[i][j], i, j) for i in keep_a for j in keep_b)
    # Ties: the lowest index pair among equal scores, matching a first-wins scan.
    i, j = min((i, j) for i in keep_a for j in keep_b if matrix[i][j] == score)
    return {"score": score, "layer_a": i, "layer_b": j, "layer_a_name": names_a[i], "layer_b_name": names_b[j],
            "excluded": excluded, "same_as_best": (i, j) == (record["layer_a"], record["layer_b"]),
            "rule": RULE}
