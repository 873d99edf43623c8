"""Both towers of any open_clip model (``pip install "prh_stitch[openclip]"``): ``openclip:NAME#vision`` / ``#text``.

``NAME`` is what ``open_clip.create_model`` takes: a registered architecture with a pretrained tag after ``@``
(``openclip:ViT-B-32@laion2b_s34b_b79k#vision``), ``hf-hub:org/repo`` or ``local-dir:/path/to/folder`` (a folder
with ``open_clip_config.json`` and the weights, as open_clip saves and the hub serves them). ``pretrained: false``
builds the architecture with fixed-seed random weights; ``checkpoint`` loads a local weights file instead.

Layers come from open_clip's own ``forward_intermediates``: ``layers.0`` ... (the transformer blocks of the text
tower; the blocks or stages of the vision trunk), then ``projection``: ``encode_image`` / ``encode_text``, the
model's unnormalised embedding in the shared space, pooled by the model (pooling None or ``head``).
Pooling of the other layers: vision as for timm (``cls`` where there is a class token, the default then; ``mean``
over patch tokens or a map); text ``last`` (the end-of-text token, what CLIP's own pooling reads; the default),
``mean`` or ``cls`` over the real tokens (padding, which open_clip adds up to the context length, is masked out).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from PIL import Image
from torch import Tensor

from prh_stitch.encoders.base import FrozenEncoder
from prh_stitch.encoders.hf_backend import PROJECTION_LAYER, check_head_pooling
from prh_stitch.encoders.hf_loading import DTYPES, TOWERS
from prh_stitch.encoders.pooling import get_pooler
from prh_stitch.encoders.weights import load_state_dict_file, load_strict

SCHEMAS = ("hf-hub:", "local-dir:")


def parse_openclip_name(model_id: str):
    """``"ViT-B-32@openai#text"`` -> ``("ViT-B-32", "openai", "text")``; schema names carry no tag."""
    name, sep, tower = model_id.rpartition("#")
    if not sep or tower not in TOWERS:
        raise ValueError(f"encoder 'openclip:{model_id}' names no tower: end it with '#vision' or '#text'")
    tag = None
    if not name.startswith(SCHEMAS) and "@" in name:
        name, tag = name.split("@", 1)
    return name, tag, tower


def padding_mask(tokens: Tensor, pad_id: int) -> Tensor:
    """1 up to and including each row's last non-pad token: open_clip pads at the end only, and a pad id inside a
    caption (SimpleTokenizer's 0 is also the token '!') must not be taken for padding."""
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    last = torch.where(tokens != pad_id, positions, torch.full_like(positions, -1)).amax(dim=1, keepdim=True)
    return (positions <= last).long()


class OpenCLIPEncoder(FrozenEncoder):
    head_layer = PROJECTION_LAYER

    def __init__(
        self,
        model_id: str,
        pretrained: bool = True,
        checkpoint: Optional[str] = None,
        name: Optional[str] = None,
        torch_dtype: Optional[str] = None,
    ) -> None:
        super().__init__(name or f"openclip:{model_id}")
        try:
            import open_clip
        except ImportError:
            raise ValueError('openclip: encoders need the open_clip_torch package; pip install "prh_stitch[openclip]"') from None
        if torch_dtype is not None and torch_dtype not in DTYPES:
            raise ValueError(f"unknown torch_dtype {torch_dtype!r}; use one of {sorted(DTYPES)}")
        arch, tag, self.tower = parse_openclip_name(model_id)
        self.modality = "image" if self.tower == "vision" else "text"
        from_source = pretrained and checkpoint is None
        if from_source and tag is None and not arch.startswith(SCHEMAS):
            tags = open_clip.list_pretrained_tags_by_model(arch)
            raise ValueError(f"encoder {self.name!r}: name pretrained weights after '@' (tags for {arch!r}: "
                             f"{', '.join(tags) or 'none'}) or set pretrained: false for random weights")
        try:
            with torch.random.fork_rng(devices=[]):  # random weights (pretrained: false) are the same every run
                torch.manual_seed(0)
                model, _, preprocess = open_clip.create_model_and_transforms(
                    arch, pretrained=tag if from_source else None, load_weights=from_source)
        except RuntimeError as exc:
            raise ValueError(f"could not build open_clip model {arch!r}: {str(exc).splitlines()[0]} "
                             "(open_clip.list_models() lists the architectures)") from None
        if checkpoint is not None:
            load_strict(model, load_state_dict_file(checkpoint), f"open_clip model {arch!r} from {checkpoint!r}")
        if torch_dtype is not None:
            model = model.to(DTYPES[torch_dtype])
        self.arch, self.tag = arch, tag
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(arch) if self.tower == "text" else None
        self._num_layers: Optional[int] = None
        self.freeze()

    # ---- layers -------------------------------------------------------------------------------
    @property
    def layer_names(self) -> List[str]:
        if self._num_layers is None:  # trunks differ (ViT blocks, ResNet or ConvNeXt stages): count them once
            with torch.inference_mode():
                self._num_layers = len(self._intermediates(self.probe_batch(), None, False)[0])
        return [f"layers.{i}" for i in range(self._num_layers)] + [PROJECTION_LAYER]

    def _intermediates(self, batch: Tensor, indices: Optional[List[int]], with_projection: bool):
        """(the requested layers' unpooled outputs, each with its prefix-token count; the projection or None)."""
        batch = batch.to(self.device, non_blocking=True)
        common = dict(intermediates_only=not with_projection, normalize=False,
                      stop_early=not with_projection and indices is not None)
        if self.tower == "text":
            out = self.model.forward_intermediates(text=batch, text_indices=indices, **common)
            return [(h, 0) for h in out["text_intermediates"]], out.get("text_features")
        token_trunk = type(self.model.visual).__name__ == "VisionTransformer"
        out = self.model.forward_intermediates(
            image=batch.to(self.compute_dtype()), image_indices=indices,
            image_output_fmt="NLC" if token_trunk else "NCHW", image_output_extra_tokens=token_trunk, **common)
        hidden = out["image_intermediates"]
        prefixes = out.get("image_intermediates_prefix") or [None] * len(hidden)
        # The trunk splits the class token off; joined again (prefix first, as the block emits it) for pooling.
        layers = [(torch.cat([p, h], dim=1), p.shape[1]) if p is not None else (h, 0) for p, h in zip(prefixes, hidden)]
        return layers, out.get("image_features")

    # ---- inputs -------------------------------------------------------------------------------
    def transform(self, raw: Any) -> Tensor:
        if self.tower == "text":
            return self.tokenizer([raw])[0]
        if isinstance(raw, Image.Image) and raw.mode != "RGB":
            raw = raw.convert("RGB")
        return self.preprocess(raw)

    def collate(self, items: Sequence[Tensor]) -> Tensor:
        return torch.stack(list(items))

    def probe_batch(self) -> Tensor:
        raw = "a probe sentence" if self.tower == "text" else Image.new("RGB", (64, 64))
        return self.collate([self.transform(raw)])

    def preprocessing_description(self) -> Dict[str, Any]:
        if self.tower == "text":
            return {"tokenizer": type(self.tokenizer).__name__, "context_length": self.tokenizer.context_length}
        return {"transform": repr(self.preprocess)}

    def _pad_id(self) -> int:
        inner = getattr(self.tokenizer, "tokenizer", None)  # HF-based tokenizers (SigLIP, multilingual)
        pad = getattr(inner, "pad_token_id", None)
        return int(pad) if pad is not None else 0  # open_clip's SimpleTokenizer pads with 0

    # ---- features -----------------------------------------------------------------------------
    def _encode(self, batch: Tensor, layers: List[int], pooling: Optional[str]) -> List[Tensor]:
        names = self.layer_names
        check_head_pooling(names, layers, pooling, PROJECTION_LAYER, self.name)
        blocks = sorted({i for i in layers if names[i] != PROJECTION_LAYER})
        with_projection = len(blocks) < len(layers)
        # open_clip cannot be asked for no intermediate at all; the projection alone takes the last one along.
        hidden, projection = self._intermediates(batch, blocks or [len(names) - 2], with_projection)
        by_layer = dict(zip(blocks, hidden))
        mask = padding_mask(batch.to(self.device), self._pad_id()) if self.tower == "text" else None
        out = []
        for i in layers:
            if names[i] == PROJECTION_LAYER:
                out.append(projection.float())
                continue
            tokens, prefix = by_layer[i]
            default = ("cls" if prefix else "mean") if self.tower == "vision" else "last"
            out.append(get_pooler(pooling or default)(tokens, mask, prefix).float())
        return out
