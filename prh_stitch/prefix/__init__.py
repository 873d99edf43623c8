"""Prefix stitching: a frozen image encoder's features mapped into a frozen causal LM's input embeddings.

:class:`PrefixStitchingModule` trains the map (``configs/prefix_smollm2.yaml``); :func:`evaluate_prefix` scores it
(``evaluate.py prefix``); :func:`load_prefix_map` reads a trained one back.
"""

from prh_stitch.prefix.language_models import LANGUAGE_MODELS, FrozenLanguageModel, load_language_model
from prh_stitch.prefix.module import PrefixStitchingModule
from prh_stitch.prefix.prefix_map import PrefixMap, PrefixMapSpec, load_prefix_map

__all__ = ["LANGUAGE_MODELS", "FrozenLanguageModel", "PrefixMap", "PrefixMapSpec", "PrefixStitchingModule",
           "load_language_model", "load_prefix_map"]
