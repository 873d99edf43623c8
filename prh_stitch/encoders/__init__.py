"""Frozen encoders: one interface over timm image models and Hugging Face text models.

``build_encoder(name, ...)`` accepts a built-in name (see ``prh_stitch.encoders.builtins``) or a
backend-prefixed id: ``timm:vit_base_patch16_224.augreg_in21k`` or ``hf:bert-base-uncased`` / ``hf:/path/to/folder``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

from prh_stitch.encoders.base import EncoderSpec, FrozenEncoder
from prh_stitch.encoders.builtins import BUILTINS, IMAGENET_TOP1
from prh_stitch.encoders.hf_backend import HFTextEncoder
from prh_stitch.encoders.hf_vision import HFVisionEncoder, hf_encoder
from prh_stitch.encoders.openclip_backend import OpenCLIPEncoder
from prh_stitch.encoders.pooling import POOLERS
from prh_stitch.encoders.timm_backend import TimmEncoder
from prh_stitch.registry import Registry

BACKENDS: Registry = Registry("encoder backend")
BACKENDS.register("timm")(TimmEncoder)
BACKENDS.register("hf")(hf_encoder)
BACKENDS.register("openclip")(OpenCLIPEncoder)


def build_encoder(
    name: str, pretrained: bool = True, checkpoint: Optional[str] = None, options: Optional[Dict[str, Any]] = None
) -> FrozenEncoder:
    """A frozen encoder by name; raises ValueError naming the valid choices for an unknown one."""
    options = dict(options or {})
    if name in BUILTINS:
        if checkpoint is not None:
            raise ValueError(f"built-in encoder {name!r} brings its own weights; drop 'checkpoint' or use timm:/hf: names")
        return BUILTINS.get(name)(**options)
    backend, sep, model_id = name.partition(":")
    if not sep or backend not in BACKENDS:
        raise ValueError(
            f"unknown encoder {name!r}. Use a built-in ({', '.join(BUILTINS.names())}) or a backend prefix: "
            "'timm:<timm model name>' for images, 'hf:<hub id or local folder>' for text or images "
            "('hf:<id>#vision' / '#text' for a tower of CLIP-like models), 'openclip:<arch>@<tag>#vision' / '#text'"
        )
    if not model_id:
        raise ValueError(f"encoder {name!r} names no model after {backend!r}:")
    return BACKENDS.get(backend)(model_id, pretrained=pretrained, checkpoint=checkpoint, **options)


def encoder_from_spec(spec: Union[EncoderSpec, Dict[str, Any], str]) -> FrozenEncoder:
    """Build the encoder of a spec and check that the spec's layer and pooling are valid for it."""
    spec = EncoderSpec.coerce(spec)
    encoder = build_encoder(spec.name, spec.pretrained, spec.checkpoint, spec.options)
    encoder.resolve_layer(spec.layer)
    if spec.pooling not in (None, "head"):
        POOLERS.get(spec.pooling)  # unknown pooling: the registry's error lists the choices
    return encoder


__all__ = [
    "BACKENDS", "BUILTINS", "IMAGENET_TOP1", "POOLERS", "EncoderSpec", "FrozenEncoder", "HFTextEncoder",
    "HFVisionEncoder", "OpenCLIPEncoder", "TimmEncoder", "build_encoder", "encoder_from_spec",
]
