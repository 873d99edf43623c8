"""Image augmentation for streaming training: random resized crop and horizontal flip, in the data workers.

Streamed images are encoded afresh every epoch, so each epoch can see a new view of each image (cached features
cannot: they are a function of the un-augmented image, see ``features.py``). The augmentation runs where each
encoder's own preprocessing runs -- in the DataLoader workers, on the decoded 8-bit image (PIL, or a uint8
``(C, H, W)`` tensor), before the encoder resizes and crops it -- by wrapping the image encoders handed to the
raw stream (``AugmentedInput``), so the stream itself needs no hook.

One draw per image: when two image encoders read the same sample (image-to-image stitching), both must see the
same view or the pair no longer matches; ``ImageAugment`` therefore reuses its last draw when it is called again
on the very same image object, which is how each sample's image reaches every encoder in turn.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torchvision.transforms.functional as F
from torchvision.transforms import RandomResizedCrop


@dataclass
class AugmentOptions:
    """Image augmentation of streamed training images (all off by default).

    ``crop_scale``: random resized crop, ``[min, max]`` fraction of the image area kept (e.g. ``[0.5, 1.0]``);
    the crop is resized back to the image's own size, so the encoder's preprocessing sees the geometry it
    expects. null = no crop. ``crop_ratio``: the crop's aspect-ratio range. ``flip``: mirror left-right with
    probability 1/2.
    """

    crop_scale: Optional[Tuple[float, float]] = None
    crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = False

    def __post_init__(self) -> None:
        if self.crop_scale is not None:
            lo, hi = _pair(self.crop_scale, "crop_scale")
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"augment crop_scale must be [min, max] with 0 < min <= max <= 1, got {list(self.crop_scale)}")
        lo, hi = _pair(self.crop_ratio, "crop_ratio")
        if not 0 < lo <= hi:
            raise ValueError(f"augment crop_ratio must be [min, max] with 0 < min <= max, got {list(self.crop_ratio)}")

    @property
    def enabled(self) -> bool:
        return self.crop_scale is not None or self.flip


def _pair(value: Any, name: str) -> Tuple[float, float]:
    values = list(value)
    if len(values) != 2:
        raise ValueError(f"augment {name} takes two numbers [min, max], got {values}")
    return float(values[0]), float(values[1])


class ImageAugment:
    """Random resized crop and flip of one decoded 8-bit image, one draw per image (see the module docstring).

    Randomness comes from Python's ``random`` and torch's generator, which PyTorch seeds differently in every
    DataLoader worker and every epoch from the trainer's seed: runs are reproducible, views differ per epoch.
    """

    def __init__(self, options: AugmentOptions) -> None:
        self.options = options
        self._last_image: Any = None
        self._last_draw: Any = None

    def __getstate__(self):
        return {"options": self.options, "_last_image": None, "_last_draw": None}

    def _draw(self, image: Any) -> Tuple[Optional[Tuple[int, int, int, int]], bool]:
        crop = None
        if self.options.crop_scale is not None:
            crop = RandomResizedCrop.get_params(image, list(self.options.crop_scale), list(self.options.crop_ratio))
        return crop, self.options.flip and random.random() < 0.5

    def __call__(self, image: Any) -> Any:
        if image is not self._last_image:
            # Holding the last image keeps its id from being reused by a new image while we compare against it.
            self._last_image, self._last_draw = image, self._draw(image)
        crop, flip = self._last_draw
        if crop is not None:
            top, left, height, width = crop
            size = list(F.get_dimensions(image)[1:])  # back to the image's own (H, W)
            image = F.resized_crop(image, top, left, height, width, size, antialias=True)
        return F.hflip(image) if flip else image


class AugmentedInput:
    """An encoder as the raw stream sees it, with ``augment`` applied to the image before its ``transform``.

    Everything else (``collate``, ``modality``, ``name``, ...) is the wrapped encoder's own.
    """

    def __init__(self, encoder: Any, augment: ImageAugment) -> None:
        self.encoder = encoder
        self.augment = augment

    def transform(self, raw: Any) -> Any:
        return self.encoder.transform(self.augment(raw))

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found normally; never for encoder/augment themselves (unpickling
        # looks up __setstate__ before they exist, which must not recurse).
        if name in ("encoder", "augment") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.encoder, name)


def augmented(encoders: dict, options: AugmentOptions) -> dict:
    """The encoders for the raw training stream: image encoders wrapped with one shared ``ImageAugment``."""
    if not options.enabled:
        return dict(encoders)
    augment = ImageAugment(options)
    return {name: AugmentedInput(encoder, augment) if encoder.modality == "image" else encoder
            for name, encoder in encoders.items()}
