"""The frozen-encoder interface shared by the timm (image) and Hugging Face (text) backends.

A frozen encoder is a pretrained network used only as a feature extractor: eval mode, no gradients,
never in an optimizer. Its outputs are therefore a pure function of (weights, preprocessing, layer,
pooling, input), which is what makes caching them on disk sound; ``fingerprint()`` names that function.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

Layer = Union[int, str]


_HEAP_TUNED = False


def keep_large_allocations_in_heap() -> None:
    """Stop glibc from returning every large activation buffer to the OS after each layer.

    By default glibc serves allocations above 32 MB (a CNN activation at batch 64 is ~100 MB) with a fresh mmap and
    unmaps them on free, so every layer of every batch page-faults its output in again: on a 2-core CPU that was
    ~40 % of EfficientNet feature-extraction time in system calls (measured: 11 -> 21 images/s with this setting).
    Raising the mmap and trim thresholds lets freed buffers be reused. Process-wide, so it is the caller's choice: the
    commands (train.py, evaluate.py) opt in at their entry points; a library call never changes it. A no-op where
    glibc is absent.
    """
    global _HEAP_TUNED
    if _HEAP_TUNED:
        return
    _HEAP_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, (1 << 31) - 1)
    except (OSError, AttributeError):
        pass


def coerce_spec(cls, value):
    """A config dataclass with a ``name`` field from an instance, a plain dict (as checkpoints store it) or a name.

    Unknown keys are an error listing the valid ones: a typo in a config must not be silently dropped.
    """
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        return cls(name=value)
    if isinstance(value, dict):
        unknown = set(value) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} setting(s) {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**value)
    raise TypeError(f"cannot read a {cls.__name__} from {type(value).__name__}")


@dataclass
class EncoderSpec:
    """What a config says about one encoder: which network, and which features of it.

    ``name`` is a built-in (``efficientnet_lite0``, ``minilm_l6``, ``tiny_vit``, ...) or a backend-prefixed
    id: ``timm:<timm model name>``, ``hf:<hub id or local folder>`` (text or vision; ``#vision``/``#text`` for a
    tower of a CLIP-like model) or ``openclip:<arch>@<tag>#vision`` / ``#text``. ``layer`` indexes
    ``encoder.layer_names`` (negative counts from the end; -1 is the model's final representation).
    ``pooling`` None means the natural pooling for that layer (see each backend). ``checkpoint`` loads
    weights from a local file instead of the hub; ``pretrained`` asks the hub (timm/hf names only);
    ``options`` go to the backend constructor unchanged (e.g. ``max_length`` for text; ``torch_dtype``,
    ``device_map``, ``revision``, ``trust_remote_code``, ``attn_implementation`` for ``hf:`` models).
    """

    name: str
    layer: int = -1
    pooling: Optional[str] = None
    pretrained: bool = True
    checkpoint: Optional[str] = None
    options: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def coerce(cls, value: Union["EncoderSpec", Dict[str, Any], str]) -> "EncoderSpec":
        """Accept a spec, a plain dict (as stored in checkpoints) or a bare name."""
        return coerce_spec(cls, value)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class FrozenEncoder(nn.Module, ABC):
    """Base class. Subclasses set ``modality`` and implement the four abstract hooks below."""

    modality: str = ""
    # The layer the model pools itself (timm's ``pre_logits``, a CLIP tower's ``projection``), if it has one: it
    # takes pooling None or "head" only, every other layer takes a pooler.
    head_layer: Optional[str] = None

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self._dims: Dict[tuple, int] = {}

    # ---- what subclasses provide -------------------------------------------------------------
    @property
    @abstractmethod
    def layer_names(self) -> List[str]:
        """Names of the tappable layers, shallow to deep; the last is the final representation."""

    @abstractmethod
    def transform(self, raw: Any) -> Any:
        """Per-sample preprocessing (PIL image -> tensor, or caption -> token ids). Runs in data workers."""

    @abstractmethod
    def collate(self, items: Sequence[Any]) -> Any:
        """Batch transformed samples into the model's input."""

    @abstractmethod
    def _encode(self, batch: Any, layers: List[int], pooling: Optional[str]) -> List[Tensor]:
        """Pooled features for already-resolved layer indices."""

    @abstractmethod
    def preprocessing_description(self) -> Dict[str, Any]:
        """Everything about preprocessing that changes the features (for the fingerprint)."""

    @abstractmethod
    def probe_batch(self) -> Any:
        """A one-sample input batch, used to find feature widths."""

    # ---- shared behaviour ----------------------------------------------------------------------
    def pooled_layers(self, pooling: Optional[str]) -> List[int]:
        """The layers ``pooling`` applies to: every layer for None (each its natural pooling), the model's own head
        layer alone for "head", and every layer but that one for an explicit pooler (``mean``, ``cls``, ...)."""
        names = self.layer_names
        if pooling is None:
            return list(range(len(names)))
        if pooling == "head":
            return [i for i, name in enumerate(names) if name == self.head_layer]
        return [i for i, name in enumerate(names) if name != self.head_layer]

    def freeze(self) -> "FrozenEncoder":
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> "FrozenEncoder":
        # A frozen encoder stays in eval mode: batch-norm statistics and dropout must not change its outputs.
        return super().train(False)

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    def resolve_layer(self, layer: Layer) -> int:
        """Map a layer index (negative from the end) or a layer name to a non-negative index."""
        names = self.layer_names
        if isinstance(layer, str):
            if layer in names:
                return names.index(layer)
            raise ValueError(f"encoder {self.name!r} has no layer {layer!r}; its layers are: {', '.join(names)}")
        n = len(names)
        if not -n <= layer < n:
            raise ValueError(
                f"layer {layer} is out of range for encoder {self.name!r}, which has {n} layers: "
                f"use an index in [{-n}, {n - 1}] (negative counts from the end; -1 = {names[-1]!r})"
            )
        return layer % n

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @torch.inference_mode()
    def encode(self, batch: Any, layers: Sequence[Layer] = (-1,), pooling: Optional[str] = None) -> List[Tensor]:
        """Pooled features, one ``(B, D)`` float tensor per requested layer, in the order asked."""
        resolved = [self.resolve_layer(layer) for layer in layers]
        return self._encode(batch, resolved, pooling)

    def feature_dim(self, layer: Layer = -1, pooling: Optional[str] = None) -> int:
        """Width of the pooled features of one layer (found once by a one-sample forward pass)."""
        key = (self.resolve_layer(layer), pooling)
        if key not in self._dims:
            batch = self.probe_batch()
            self._dims[key] = int(self.encode(batch, [key[0]], pooling)[0].shape[-1])
        return self._dims[key]

    def weights_digest(self) -> str:
        return module_digest(self)

    def compute_dtype(self) -> torch.dtype:
        """The dtype the network computes in (its first floating-point parameter's; float32 for none)."""
        floating = (p.dtype for p in self.parameters() if p.is_floating_point())
        return next(floating, torch.float32)

    def fingerprint(self, layers: Sequence[Layer] = (-1,), pooling: Optional[str] = None) -> str:
        """Identity of the features this encoder produces for these layers and pooling.

        A network run in bf16 or fp16 gives other features than in float32, so a lower compute dtype enters the
        identity (float32 adds nothing, which keeps the fingerprints of features stored before this field).
        """
        payload = {
            "name": self.name,
            "class": type(self).__name__,
            "weights": self.weights_digest(),
            "preprocessing": self.preprocessing_description(),
            "layers": [self.layer_names[self.resolve_layer(layer)] for layer in layers],
            "pooling": pooling,
        }
        if self.compute_dtype() != torch.float32:
            payload["dtype"] = str(self.compute_dtype()).replace("torch.", "")
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def module_digest(module: nn.Module) -> str:
    """A cheap digest of a module's weights: shapes plus a few values of every tensor.

    Hashing every byte of a multi-GB model on each start would cost more than it protects; a different
    checkpoint differs in these samples with overwhelming probability.
    """
    h = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = torch.cat([flat[:16], flat[-16:]]).to("cpu", torch.float64) if flat.numel() else flat.cpu()
        h.update(key.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def identity(x: Any) -> Any:
    return x


Transform = Callable[[Any], Any]
