"""Image encoders from torchvision classifiers whose body is a ``features`` sequence (MobileNet, EfficientNet, VGG).

Layers are ``features.0`` ... ``features.{N-1}`` (each stage's output map, pooled by global average: ``mean``)
followed by ``pre_logits``: the global average of the last map, which is what the classifier sees. Preprocessing is
torchvision's ImageNet evaluation transform: resize the short side, centre crop, ImageNet mean and std.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch import Tensor, nn

from prh_stitch.encoders.base import FrozenEncoder
from prh_stitch.encoders.pooling import get_pooler

HEAD_LAYER = "pre_logits"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TorchvisionEncoder(FrozenEncoder):
    head_layer = HEAD_LAYER
    modality = "image"

    def __init__(
        self,
        model: nn.Module,
        name: str,
        resize: int = 256,
        crop: int = 224,
        mean: Tuple[float, float, float] = IMAGENET_MEAN,
        std: Tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__(name)
        from torchvision import transforms as T

        if not isinstance(getattr(model, "features", None), nn.Sequential):
            raise ValueError(f"{name}: {type(model).__name__} has no 'features' sequence to tap")
        self.model = model.to(memory_format=torch.channels_last)
        self.resize, self.crop = int(resize), int(crop)
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        # Resize and crop on PIL images in the data workers; ToTensor + Normalize happen in `model_input`, on a
        # uint8 tensor a quarter the size (the arithmetic is the same as torchvision's own transform).
        self._pixels = T.Compose([
            T.Resize(self.resize, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(self.crop), T.PILToTensor(),
        ])
        self.freeze()

    @property
    def layer_names(self) -> List[str]:
        return [f"features.{i}" for i in range(len(self.model.features))] + [HEAD_LAYER]

    def transform(self, raw: Any) -> Tensor:
        if isinstance(raw, Image.Image) and raw.mode != "RGB":
            raw = raw.convert("RGB")
        return self._pixels(raw)

    def collate(self, items: Sequence[Tensor]) -> Tensor:
        return torch.stack(list(items))

    def probe_batch(self) -> Tensor:
        return torch.zeros(1, 3, self.crop, self.crop, dtype=torch.uint8)

    def preprocessing_description(self) -> Dict[str, Any]:
        return {"resize": self.resize, "crop": self.crop, "interpolation": "bilinear", "mean": list(self.mean),
                "std": list(self.std)}

    def model_input(self, batch: Tensor) -> Tensor:
        batch = batch.to(self.device)
        if batch.dtype == torch.uint8:
            mean = torch.tensor(self.mean, device=batch.device).view(-1, 1, 1)
            std = torch.tensor(self.std, device=batch.device).view(-1, 1, 1)
            batch = batch.float().div_(255).sub_(mean).div_(std)
        return batch.to(memory_format=torch.channels_last)

    def _encode(self, batch: Tensor, layers: List[int], pooling: Optional[str]) -> List[Tensor]:
        names = self.layer_names
        for layer in layers:
            is_head = names[layer] == HEAD_LAYER
            if is_head and pooling not in (None, "head"):
                raise ValueError(f"layer {HEAD_LAYER!r} of {self.name!r} is pooled by the model; use pooling None or 'head'")
            if not is_head and pooling == "head":
                raise ValueError(f"pooling 'head' applies only to the last layer {HEAD_LAYER!r}")
        stages = len(self.model.features)
        deepest = max(stages - 1 if names[i] == HEAD_LAYER else i for i in layers)
        hidden = self.model_input(batch)
        maps = []
        for stage in self.model.features[: deepest + 1]:  # later stages are never run: nothing asked for them
            hidden = stage(hidden)
            maps.append(hidden)
        pool = get_pooler("mean")
        return [pool(maps[stages - 1 if names[i] == HEAD_LAYER else i], None, 0).float() for i in layers]
