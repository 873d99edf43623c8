"""Image encoders from timm: any timm model name, any block or stage, explicit pooling.

Layers are the outputs of the model's top-level blocks or stages (``blocks.i`` for ViTs and EfficientNets,
``stages.i`` for ConvNeXt-style models, the feature-info modules otherwise), followed by ``pre_logits``:
the model's own head pooling of its final features, i.e. what its classifier sees.

Pooling for block layers: ``cls`` (class token), ``mean`` (mean over patch tokens, or global average of a
spatial map); None picks ``cls`` for models with a class token and ``mean`` otherwise. ``pre_logits`` is
pooled by the model itself, so it accepts only None or ``head``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch import Tensor, nn

from prh_stitch.encoders.base import FrozenEncoder
from prh_stitch.encoders.pooling import get_pooler
from prh_stitch.encoders.weights import load_state_dict_file, load_strict

HEAD_LAYER = "pre_logits"


class _StopForward(Exception):
    """Raised from a hook once the deepest requested layer has run: the rest of the network is skipped."""


def _tappable_modules(model: nn.Module) -> List[str]:
    for container in ("blocks", "stages", "layers"):
        seq = getattr(model, container, None)
        if isinstance(seq, (nn.Sequential, nn.ModuleList)) and len(seq) > 0:
            return [f"{container}.{i}" for i in range(len(seq))]
    info = getattr(model, "feature_info", None)
    if info is not None:
        return [f["module"] for f in info]
    raise ValueError(f"cannot find blocks or stages to tap in {type(model).__name__}")


def intermediate_indices(model: nn.Module, tapped: List[str]) -> Optional[Tuple[Dict[str, int], Dict[str, Any]]]:
    """Where timm's own ``forward_intermediates`` returns each tapped layer: ({layer name: index}, extra kwargs),
    or None when the model has no such API or its indices cannot be matched to the layer names (then hooks do it).

    - EfficientNet-style models with ``extra_blocks``: the stem is index 0 and ``blocks.j`` is ``j + 1``;
    - otherwise the indices follow ``feature_info``, whose module names must then be exactly the tapped layers
      (one entry per ViT block, per ConvNeXt or Swin stage; ResNet's ``act1``, ``layer1`` ...).
    """
    import inspect

    method = getattr(model, "forward_intermediates", None)
    if method is None:
        return None
    parameters = inspect.signature(method).parameters
    if "extra_blocks" in parameters and all(name.startswith("blocks.") for name in tapped):
        return {name: int(name.split(".")[1]) + 1 for name in tapped}, {"extra_blocks": True}
    info = getattr(model, "feature_info", None)
    modules = [f["module"] for f in info] if info is not None else []
    if modules != tapped:
        return None
    # Token models return (patches, prefix tokens) in NLC; joined again they are the block's own output. (Asked only
    # of models with prefix tokens: some timm 1.0 token models fail on return_prefix_tokens without any.)
    extra: Dict[str, Any] = {}
    if "return_prefix_tokens" in parameters:
        extra["output_fmt"] = "NLC"
        if getattr(model, "num_prefix_tokens", 0):
            extra["return_prefix_tokens"] = True
    return {name: i for i, name in enumerate(modules)}, extra


def split_pixel_transform(transform: Any) -> Tuple[Any, Optional[Tuple[Sequence[float], Sequence[float]]]]:
    """timm's eval transform cut before its ``ToTensor``: (PIL -> uint8 tensor transform, (mean, std)).

    timm builds ``Compose([... PIL resize/crop ..., (Maybe)ToTensor, Normalize])``. Anything else is kept
    whole (float tensors out of the workers, normalisation None), so custom transforms stay correct.
    """
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", []))
    if len(steps) >= 2 and type(steps[-2]).__name__ in ("ToTensor", "MaybeToTensor") and isinstance(steps[-1], T.Normalize):
        mean = [float(v) for v in torch.as_tensor(steps[-1].mean).flatten()]
        std = [float(v) for v in torch.as_tensor(steps[-1].std).flatten()]
        return T.Compose(steps[:-2] + [T.PILToTensor()]), (mean, std)
    return transform, None


class TimmEncoder(FrozenEncoder):
    head_layer = HEAD_LAYER
    modality = "image"

    def __init__(
        self,
        model_name: str,
        pretrained: bool = False,
        checkpoint: Optional[str] = None,
        name: Optional[str] = None,
        model: Optional[nn.Module] = None,
    ) -> None:
        super().__init__(name or f"timm:{model_name}")
        import timm

        self.model_name = model_name
        if model is None:
            # timm accepts "arch.tag" names; the architecture part must be registered.
            if not timm.is_model(model_name.split(".")[0]):
                raise ValueError(
                    f"unknown timm model {model_name!r}; list the choices with "
                    f"python -c \"import timm; print(timm.list_models('*vit*'))\""
                )
            use_hub = pretrained and checkpoint is None
            try:
                model = timm.create_model(model_name, pretrained=use_hub)
            except Exception as exc:
                if not use_hub:
                    raise
                raise ValueError(
                    f"could not fetch pretrained weights for timm model {model_name!r} "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Offline? Download them "
                    "once where the hub is reachable (they stay in the Hugging Face cache), or pass "
                    "checkpoint=PATH to a local weights file."
                ) from None
            if checkpoint is not None:
                load_strict(model, load_state_dict_file(checkpoint), f"timm model {model_name!r} from {checkpoint!r}")
        self.model = model
        self._modules_to_tap = _tappable_modules(model)
        self._intermediates = intermediate_indices(model, self._modules_to_tap)
        self._prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
        self._has_cls = getattr(model, "cls_token", None) is not None
        # NHWC maps (e.g. Swin) are permuted to NCHW before pooling.
        self._nhwc = str(getattr(model, "output_fmt", "NCHW")) == "NHWC"
        self.data_config = timm.data.resolve_data_config({}, model=model)
        self._transform = timm.data.create_transform(**self.data_config, is_training=False)
        self._pixel_transform, self._normalisation = split_pixel_transform(self._transform)
        # channels_last makes CPU convolutions several times faster (measured ~4x on EfficientNet-Lite0).
        self.model.to(memory_format=torch.channels_last)
        self.freeze()

    @property
    def layer_names(self) -> List[str]:
        return self._modules_to_tap + [HEAD_LAYER]

    def default_pooling(self, layer: int) -> str:
        if self.layer_names[layer] == HEAD_LAYER:
            return "head"
        return "cls" if self._has_cls else "mean"

    def transform(self, raw: Any) -> Tensor:
        """Resize and crop in the data workers; a uint8 ``(3, H, W)`` tensor when the pipeline allows it.

        The float conversion and normalisation wait for ``model_input``: a uint8 image is a quarter of the
        bytes to move between processes (and to the GPU), and the arithmetic is the same as timm's
        ``ToTensor`` + ``Normalize``, so the features are bit for bit those of timm's own transform.
        """
        if isinstance(raw, Image.Image) and raw.mode != "RGB":
            raw = raw.convert("RGB")  # grayscale (Fashion-MNIST) or RGBA inputs
        return self._pixel_transform(raw)

    def model_input(self, batch: Tensor) -> Tensor:
        """A collated batch as the network takes it: on the encoder's device, float, normalised, channels-last."""
        batch = batch.to(self.device, non_blocking=True)
        if batch.dtype == torch.uint8 and self._normalisation is not None:
            mean, std = (torch.as_tensor(v, dtype=torch.float32, device=batch.device).view(-1, 1, 1)
                         for v in self._normalisation)
            batch = batch.float().div_(255).sub_(mean).div_(std)  # ToTensor, then Normalize: the same operations
        return batch.to(memory_format=torch.channels_last)

    def collate(self, items: Sequence[Tensor]) -> Tensor:
        return torch.stack(list(items))

    def probe_batch(self) -> Tensor:
        return torch.zeros(1, *self.data_config["input_size"])

    def preprocessing_description(self) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()}

    def _pool_block(self, hidden: Tensor, pooling: str) -> Tensor:
        if hidden.ndim == 4 and self._nhwc and self._intermediates is None:
            hidden = hidden.permute(0, 3, 1, 2)
        return get_pooler(pooling)(hidden, None, self._prefix_tokens)

    def _encode(self, batch: Tensor, layers: List[int], pooling: Optional[str]) -> List[Tensor]:
        batch = self.model_input(batch)
        names = self.layer_names
        for layer in layers:
            chosen = pooling or self.default_pooling(layer)
            if names[layer] == HEAD_LAYER and chosen != "head":
                raise ValueError(
                    f"layer {HEAD_LAYER!r} of {self.name!r} is pooled by the model's own head; "
                    f"use pooling None or 'head' for it (got {chosen!r})"
                )
            if names[layer] != HEAD_LAYER and chosen == "head":
                raise ValueError(f"pooling 'head' applies only to the last layer {HEAD_LAYER!r}")
        wanted = {names[i] for i in layers if names[i] != HEAD_LAYER}
        need_head = any(names[i] == HEAD_LAYER for i in layers)
        run = self._run_intermediates if self._intermediates is not None else self._run_hooked
        captured, head = run(batch, wanted, need_head)
        out = []
        for layer in layers:
            if names[layer] == HEAD_LAYER:
                out.append(head.float())
            else:
                out.append(self._pool_block(captured[names[layer]], pooling or self.default_pooling(layer)).float())
        return out

    def _run_intermediates(self, batch: Tensor, wanted: set, need_head: bool):
        """The tapped layers through timm's ``forward_intermediates`` (stopping after the deepest one unless the head
        is wanted too); its maps come back NCHW whatever the model's own layout, so no NHWC permutation follows."""
        index, extra = self._intermediates
        names = sorted(wanted, key=index.get)
        if not names:  # pre_logits alone: the model's own forward, nothing to tap
            return {}, self.model.forward_head(self.model.forward_features(batch), pre_logits=True)
        result = self.model.forward_intermediates(batch, indices=[index[n] for n in names], stop_early=not need_head,
                                                  intermediates_only=not need_head, **extra)
        final, outputs = result if need_head else (None, result)
        captured = {}
        for name, output in zip(names, outputs):
            # (patches, prefix tokens): the prefix goes first again, as the block emitted it (and `_prefix_tokens` says)
            captured[name] = torch.cat([output[1], output[0]], dim=1) if isinstance(output, tuple) else output
        head = self.model.forward_head(final, pre_logits=True) if need_head else None
        return captured, head

    def _run_hooked(self, batch: Tensor, wanted: set, need_head: bool):
        """Fallback for models without a usable ``forward_intermediates``: forward hooks on the tapped modules."""
        captured: Dict[str, Tensor] = {}
        deepest = max((self._modules_to_tap.index(n) for n in wanted), default=-1)
        handles = []
        module_index = dict(self.model.named_modules())

        def make_hook(module_name: str, stop: bool):
            def hook(_module, _inputs, output):
                captured[module_name] = output[0] if isinstance(output, (tuple, list)) else output
                if stop:
                    raise _StopForward

            return hook

        for position, module_name in enumerate(self._modules_to_tap):
            if module_name in wanted:
                stop = (not need_head) and position == deepest
                handles.append(module_index[module_name].register_forward_hook(make_hook(module_name, stop)))
        head: Optional[Tensor] = None
        try:
            features = self.model.forward_features(batch)
            if need_head:
                head = self.model.forward_head(features, pre_logits=True)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return captured, head
