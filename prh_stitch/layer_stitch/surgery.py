"""Running a timm network up to a layer, and from a layer on to its head.

``run_until`` asks timm's own ``forward_intermediates`` for the one layer (``stop_early``: the rest of the network
does not run). timm has no API for the other half, so ``run_from`` iterates the remaining blocks, then the final
convolution or norm and ``forward_head``, as each family's ``forward_features`` does. Layers are named as the
encoders name them (``TimmEncoder.layer_names``: ``blocks.j``, ResNet's ``act1``/``layerK``, then ``pre_logits``)
and resolved by the encoders' one resolver, ``FrozenEncoder.resolve_layer``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from prh_stitch.encoders.base import Layer
from prh_stitch.encoders.timm_backend import HEAD_LAYER, TimmEncoder

FAMILIES = ("efficientnet", "resnet", "vit")


def family(model: nn.Module) -> str:
    """``efficientnet``, ``resnet`` or ``vit``: the timm classes whose forward can be resumed from a layer here."""
    from timm.models.efficientnet import EfficientNet
    from timm.models.resnet import ResNet
    from timm.models.vision_transformer import VisionTransformer

    for cls, name in zip((EfficientNet, ResNet, VisionTransformer), FAMILIES):
        if isinstance(model, cls):
            return name
    raise ValueError(
        f"layer-to-layer stitching supports timm EfficientNet, ResNet and VisionTransformer models; "
        f"{type(model).__name__} is not one of them (its forward cannot be resumed from a layer here)"
    )


def require_timm(encoder: Any, role: str) -> TimmEncoder:
    """``encoder`` if it is a timm network of a supported family, else a one-line error naming ``role`` (A or B)."""
    if not isinstance(encoder, TimmEncoder):
        raise ValueError(f"model {role} ({getattr(encoder, 'name', encoder)!r}) is not a timm vision network; "
                         "layer-to-layer stitching needs two (e.g. efficientnet_lite0, tiny_resnet, tiny_vit)")
    family(encoder.model)
    return encoder


def layer_name(encoder: TimmEncoder, layer: Layer) -> str:
    """The name of ``layer`` (an index, negative from the end, or a name) through the encoders' one resolver."""
    return encoder.layer_names[encoder.resolve_layer(layer)]


def _intermediate_index(encoder: TimmEncoder, name: str) -> int:
    """The index ``forward_intermediates`` gives the output of layer ``name``.

    EfficientNet with ``extra_blocks`` counts the stem as 0 and ``blocks.j`` as ``j + 1``; a ViT counts its blocks;
    a ResNet counts its ``feature_info`` entries (``act1``, ``layer1`` ...), which are exactly its layer names.
    """
    kind = family(encoder.model)
    if kind == "resnet":
        return [info["module"] for info in encoder.model.feature_info].index(name)
    return int(name.split(".")[1]) + (1 if kind == "efficientnet" else 0)


def run_until(encoder: TimmEncoder, layer: Layer, images: Tensor) -> Tensor:
    """The output of ``layer`` on normalised ``images``, unpooled: a map ``(B, C, H, W)``, tokens ``(B, T, D)``
    (prefix tokens first, as the block emits them), or ``(B, D)`` for ``pre_logits``."""
    name = layer_name(encoder, layer)
    model = encoder.model
    if name == HEAD_LAYER:
        return model.forward_head(model.forward_features(images), pre_logits=True)
    index = _intermediate_index(encoder, name)
    kind = family(model)
    if kind == "vit":
        (output,) = model.forward_intermediates(images, indices=[index], output_fmt="NLC", intermediates_only=True,
                                                return_prefix_tokens=True, stop_early=True)
        # timm splits the class/register tokens off; the next block takes the sequence whole, prefix first.
        return torch.cat(output[::-1], dim=1) if isinstance(output, tuple) else output
    extra = {"extra_blocks": True} if kind == "efficientnet" else {}
    (output,) = model.forward_intermediates(images, indices=[index], intermediates_only=True, stop_early=True, **extra)
    return output


def run_from(encoder: TimmEncoder, layer: Layer, hidden: Tensor, pre_logits: bool = False) -> Tensor:
    """Continue ``encoder``'s forward from the output of ``layer`` to its logits (or its pre-logits features)."""
    name = layer_name(encoder, layer)
    model = encoder.model
    if name == HEAD_LAYER:
        return hidden if pre_logits else model.get_classifier()(hidden)
    kind = family(model)
    if kind == "resnet":  # the stem's remaining modules, then the later stages, in forward_features order
        order = ["act1", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        x = hidden
        for module_name in order[order.index(name) + 1:]:
            x = model.get_submodule(module_name)(x)
    else:
        x = model.blocks[int(name.split(".")[1]) + 1:](hidden)
        x = model.bn2(model.conv_head(x)) if kind == "efficientnet" else model.norm(x)
    return model.forward_head(x, pre_logits=pre_logits)
