"""Frozen outputs of layer stitching on disk: A's activations at a cut, B's logits and pre-logits features.

Not the feature store: that keys entries by data shards and holds pooled per-layer features, while these are
unpooled maps at one cut and logits of images generated in memory. Each value is one safetensors file written by
the one atomic writer; its name is a digest of its identity (encoder fingerprint, what, layer, and a digest of the
very image bytes), and the file carries that identity and a SHA-256 of its tensor bytes, both checked on every read:
a stale, foreign or damaged file is recomputed, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors
from torch import Tensor

from prh_stitch.atomic import atomic_write_bytes

log = logging.getLogger("prh_stitch.layer_stitch")


def tensor_digest(value: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    value = value.detach().contiguous().cpu()
    h = hashlib.sha256(f"{value.dtype}{tuple(value.shape)}".encode())
    h.update(value.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ActivationCache:
    """``get(identity, compute, dtype)``: the cached tensor of that identity, computed once and kept on disk and in
    memory (``dtype`` on disk: float16 halves the size of activations)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root) / "layer_stitch"
        self._memo: Dict[str, Tensor] = {}

    @staticmethod
    def spec(identity: Dict[str, Any]) -> str:
        """The identity as canonical JSON (key order does not matter): what the file stores and is checked against."""
        return json.dumps(identity, sort_keys=True)

    def key(self, identity: Dict[str, Any]) -> str:
        return hashlib.sha256(self.spec(identity).encode()).hexdigest()

    def path(self, identity: Dict[str, Any]) -> Path:
        return self.root / f"{self.key(identity)}.safetensors"

    def get(self, identity: Dict[str, Any], compute: Callable[[], Tensor], dtype: torch.dtype) -> Tensor:
        key = self.key(identity)
        if key in self._memo:
            return self._memo[key]
        path = self.path(identity)
        value = self._read(path, identity)
        if value is None:
            value = compute().to(dtype).contiguous()
            metadata = {"identity": self.spec(identity), "sha256": tensor_digest(value)}
            atomic_write_bytes(path, save_safetensors({"value": value}, metadata=metadata))
        self._memo[key] = value
        return value

    def _read(self, path: Path, identity: Dict[str, Any]) -> Optional[Tensor]:
        """The stored tensor if the file is whole and is what ``identity`` asks for; else None (recompute)."""
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                value = handle.get_tensor("value")
        except (SafetensorError, OSError) as exc:
            log.warning("recomputing unreadable cache file %s (%s)", path, exc)
            return None
        if metadata.get("identity") != self.spec(identity):
            log.warning("recomputing %s: it holds other outputs than its name says", path)
            return None
        if metadata.get("sha256") != tensor_digest(value):
            log.warning("recomputing %s: its contents do not match their checksum", path)
            return None
        return value
