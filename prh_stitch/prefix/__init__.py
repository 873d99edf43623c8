"""Prefix stitching: a frozen image encoder's features mapped into a frozen causal LM's input embeddings.

:class:`PrefixStitchingModule` trains the map (``configs/prefix_smollm2.yaml``); :func:`evaluate_prefix` scores it
(``evaluate.py prefix``); :func:`load_prefix_map` reads a trained one back.
"""

from prh_stitch.lazy import lazy_exports

# Loaded on first use: ``evaluate.py prefix`` needs no Lightning, only the training module does.
__getattr__ = lazy_exports(__name__, {
    "LANGUAGE_MODELS": "language_models", "FrozenLanguageModel": "language_models",
    "load_language_model": "language_models", "PrefixStitchingModule": "module", "PrefixMap": "prefix_map",
    "PrefixMapSpec": "prefix_map", "load_prefix_map": "prefix_map"})

__all__ = ["LANGUAGE_MODELS", "FrozenLanguageModel", "PrefixMap", "PrefixMapSpec", "PrefixStitchingModule",
           "load_language_model", "load_prefix_map"]
