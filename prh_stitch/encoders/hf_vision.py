"""Image encoders from Hugging Face transformers (``AutoModel`` + ``AutoImageProcessor``): ViT, DINOv2, ConvNeXt,
the vision towers of CLIP/SigLIP (``hf:PATH#vision``), any model whose forward takes ``pixel_values``.

Layers are the model's ``hidden_states``, named as for text: ``embeddings``, then ``layers.0`` ... (for ConvNeXt and
other staged networks ``layers.i`` is stage i's map). A vision tower adds ``projection``: the model's own image
embedding in the space it shares with text (``get_image_features``), pooled by the model (pooling None or ``head``).
Pooling of the other layers: ``cls`` (the class token), ``mean`` (over patch tokens: class and register tokens
excluded; or the global average of a map); None picks ``cls`` where the layer has prefix tokens, else ``mean``.
Prefix tokens are counted as sequence length minus patch count, so DINOv2's registers are excluded from ``mean``.

``hf:NAME`` is built by :func:`hf_encoder`, which loads the model once and hands it to the text or the vision
encoder by its tower or what its forward takes (``pixel_values`` or ``input_ids``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from PIL import Image
from torch import Tensor, nn

from prh_stitch.encoders.base import FrozenEncoder
from prh_stitch.encoders.hf_backend import PROJECTION_LAYER, HFTextEncoder, KeepsDeviceMapPlacement, check_head_pooling
from prh_stitch.encoders.hf_loading import (
    LoadingOptions, load_hf_model, load_tower, pick_tower, placed_by_device_map, split_tower,
)
from prh_stitch.encoders.pooling import get_pooler


def prefix_token_count(hidden: Tensor, image_size: Sequence[int], patch_size: Any) -> int:
    """Leading non-patch tokens of a ``(B, T, D)`` layer: T minus the patch grid; 0 for maps or coarser token grids.

    A hierarchical model (Swin) has fewer tokens than patches after its first stage: no prefix there either.
    """
    if hidden.ndim != 3 or patch_size is None:
        return 0
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    patches = (int(image_size[0]) // ph) * (int(image_size[1]) // pw)
    return max(int(hidden.shape[1]) - patches, 0)


class HFVisionEncoder(KeepsDeviceMapPlacement, FrozenEncoder):
    head_layer = PROJECTION_LAYER
    modality = "image"

    def __init__(
        self,
        model_name_or_path: str,
        pretrained: bool = True,
        checkpoint: Optional[str] = None,
        name: Optional[str] = None,
        model: Optional[nn.Module] = None,
        image_processor: Any = None,
        projection: Optional[nn.Module] = None,
        torch_dtype: Optional[str] = None,
        device_map: Any = None,
        revision: Optional[str] = None,
        trust_remote_code: bool = False,
        attn_implementation: Optional[str] = None,
    ) -> None:
        super().__init__(name or f"hf:{model_name_or_path}")
        from transformers import AutoImageProcessor

        path, _ = split_tower(model_name_or_path)
        self.model_name_or_path = model_name_or_path
        if model is None:
            model, projection, self._placed_by_device_map = load_tower(
                model_name_or_path, pretrained, checkpoint,
                LoadingOptions(torch_dtype, device_map, revision, trust_remote_code, attn_implementation), "image",
                self.name)
        if image_processor is None:
            try:
                image_processor = AutoImageProcessor.from_pretrained(path, revision=revision,
                                                                     trust_remote_code=trust_remote_code)
            except OSError as exc:
                raise ValueError(f"could not load the image processor of {path!r}: {str(exc).splitlines()[0]} "
                                 "(the folder needs a preprocessor_config.json)") from None
        self.model = model
        self.projection = projection
        self.image_processor = image_processor
        self._num_hidden_states: Optional[int] = None
        self.freeze()

    @property
    def layer_names(self) -> List[str]:
        if self._num_hidden_states is None:
            # Staged networks (ConvNeXt, Swin, ResNet) count stages, not `num_hidden_layers`: one probe pass counts them.
            with torch.inference_mode():
                self._num_hidden_states = len(self._forward(self.probe_batch()).hidden_states)
        head = [PROJECTION_LAYER] if self.projection is not None else []
        return ["embeddings"] + [f"layers.{i}" for i in range(self._num_hidden_states - 1)] + head

    def transform(self, raw: Any) -> Tensor:
        """The model's own image processor, one image at a time (in the data workers): a float ``(3, H, W)`` tensor."""
        if isinstance(raw, Image.Image) and raw.mode != "RGB":
            raw = raw.convert("RGB")  # grayscale (Fashion-MNIST) or RGBA inputs
        return self.image_processor(images=raw, return_tensors="pt")["pixel_values"][0]

    def collate(self, items: Sequence[Tensor]) -> Tensor:
        return torch.stack(list(items))

    def probe_batch(self) -> Tensor:
        return self.collate([self.transform(Image.new("RGB", (64, 64)))])

    def preprocessing_description(self) -> Dict[str, Any]:
        settings = self.image_processor.to_dict()
        settings.pop("processor_class", None)  # names the class that saved it, not what it does
        return {"processor": type(self.image_processor).__name__, **settings}

    def _forward(self, pixels: Tensor):
        pixels = pixels.to(self.device, self.compute_dtype(), non_blocking=True)
        return self.model(pixel_values=pixels, output_hidden_states=True)

    def default_pooling(self, prefix_tokens: int) -> str:
        return "cls" if prefix_tokens > 0 else "mean"

    def _encode(self, batch: Tensor, layers: List[int], pooling: Optional[str]) -> List[Tensor]:
        names = self.layer_names
        check_head_pooling(names, layers, pooling, PROJECTION_LAYER, self.name)
        output = self._forward(batch)
        patch_size = getattr(self.model.config, "patch_size", None)
        out = []
        for i in layers:
            if names[i] == PROJECTION_LAYER:
                out.append(self.projection(output.pooler_output).float())
                continue
            hidden = output.hidden_states[i]
            prefix = prefix_token_count(hidden, batch.shape[-2:], patch_size)
            pooler = get_pooler(pooling or self.default_pooling(prefix))
            out.append(pooler(hidden, None, prefix).float())
        return out


def hf_encoder(model_name_or_path: str, pretrained: bool = True, checkpoint: Optional[str] = None,
               **options: Any) -> FrozenEncoder:
    """The ``hf:`` backend: load once, then a vision or a text encoder by the input its forward takes.

    ``options`` are the constructor arguments of :class:`HFTextEncoder` or :class:`HFVisionEncoder` (loading options,
    ``max_length`` for text, ...); an option the chosen encoder does not take is an error naming the valid ones.
    """
    import inspect

    loading_keys = set(LoadingOptions.__dataclass_fields__)
    loading = LoadingOptions(**{k: v for k, v in options.items() if k in loading_keys})
    path, tower = split_tower(model_name_or_path)
    full = load_hf_model(path, pretrained, checkpoint, loading)
    model, projection = pick_tower(full, path, tower)
    # A tower says what it is; a whole model by its input (a CLIP tower module may not carry `main_input_name`).
    takes_pixels = getattr(model, "main_input_name", "input_ids") == "pixel_values"
    kind = HFVisionEncoder if tower == "vision" or (tower is None and takes_pixels) else HFTextEncoder
    allowed = set(inspect.signature(kind.__init__).parameters) - {"self", "model", "projection", "pretrained",
                                                                   "checkpoint", "model_name_or_path"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"encoder 'hf:{model_name_or_path}' ({kind.modality}) takes no option(s) {unknown}; "
                         f"valid: {sorted(allowed)}")
    encoder = kind(model_name_or_path, model=model, projection=projection, **options)
    encoder._placed_by_device_map = placed_by_device_map(full, loading.device_map)
    return encoder
