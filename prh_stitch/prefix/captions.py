"""Captions as the language model reads them after a prefix, their likelihood, and greedy captions from a prefix.

A caption is the token sequence ``[start] + text + [end]`` placed after the ``n_prefix`` prefix embeddings. Its
*text* tokens are what bits per byte scores: exactly the tokens that
:func:`prh_stitch.alignment.competence.bits_per_byte` (``pooled``) scores after the same start token, so with no
prefix the figure here is that function's figure. The end token is scored by the training loss only, so that a
trained map also says where a caption stops (greedy decoding ends there); it is not part of the text's bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from prh_stitch.prefix.language_models import FrozenLanguageModel


@dataclass
class CaptionTokens:
    """Every caption of a split, tokenised once: ``ids`` (N, L) right-padded, ``text`` (N, L) marks the scored text
    tokens, ``end`` (N, L) the end token, ``bytes`` (N,) each caption's UTF-8 bytes."""

    ids: Tensor
    text: Tensor
    end: Tensor
    bytes: Tensor

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, index: Tensor, device: torch.device | str) -> "CaptionTokens":
        """The rows ``index``, cut to their longest caption, on ``device``."""
        index = index.to(self.ids.device)
        width = int((self.text[index] | self.end[index]).sum(1).max()) + 1  # + the start token
        pick = lambda t: t[index, :width].to(device)  # noqa: E731
        return CaptionTokens(pick(self.ids), pick(self.text), pick(self.end), self.bytes[index].to(device))


def tokenize_captions(lm: FrozenLanguageModel, captions: Sequence[str], max_tokens: Optional[int] = None
                      ) -> CaptionTokens:
    """Tokenise captions after the LM's start token; a caption longer than ``max_tokens`` text tokens is an error
    (cutting it would drop bytes from the score)."""
    encoded: List[List[int]] = []
    for caption in captions:
        if not caption:
            raise ValueError("an empty caption has no tokens to score; drop it from the data")
        ids = list(lm.tokenizer(caption, add_special_tokens=False)["input_ids"])
        if max_tokens is not None and len(ids) > max_tokens:
            raise ValueError(f"caption of {len(ids)} tokens exceeds max_caption_tokens={max_tokens}: "
                             f"{caption[:60]!r}...; raise max_caption_tokens")
        encoded.append(ids)
    width = max(len(ids) for ids in encoded) + 2
    ids = torch.full((len(encoded), width), lm.end_id, dtype=torch.long)
    text = torch.zeros((len(encoded), width), dtype=torch.bool)
    end = torch.zeros((len(encoded), width), dtype=torch.bool)
    for row, seq in enumerate(encoded):
        ids[row, 0] = lm.start_id
        ids[row, 1:len(seq) + 1] = torch.tensor(seq, dtype=torch.long)
        text[row, 1:len(seq) + 1] = True
        end[row, len(seq) + 1] = True  # ids there is already end_id (the fill value)
    n_bytes = torch.tensor([len(c.encode("utf-8")) for c in captions], dtype=torch.float64)
    return CaptionTokens(ids, text, end, n_bytes)


def token_nll(lm: FrozenLanguageModel, prefix: Optional[Tensor], tokens: CaptionTokens) -> Tensor:
    """−ln p of every caption token given the prefix and the tokens before it: (N, L), position t is the NLL of
    ``ids[:, t]`` (position 0, the start token, is never predicted and holds 0).

    ``prefix`` (N, P, D) or None (the LM alone). Gradients flow into ``prefix`` only: the LM is frozen.
    """
    embeds = lm.embed(tokens.ids)
    mask = (tokens.text | tokens.end).clone()
    mask[:, 0] = True  # the start token is real context
    n_prefix = 0
    if prefix is not None:
        n_prefix = prefix.shape[1]
        embeds = torch.cat([prefix.to(embeds.dtype), embeds], dim=1)
        mask = torch.cat([torch.ones(prefix.shape[:2], dtype=torch.bool, device=mask.device), mask], dim=1)
    # Right padding: with causal attention, real tokens never see the padding after them.
    logits = lm.model(inputs_embeds=embeds, attention_mask=mask.long()).logits
    predicting = logits[:, n_prefix:-1].float()  # position n_prefix + t predicts ids[:, t + 1]
    nll = F.cross_entropy(predicting.transpose(1, 2), tokens.ids[:, 1:], reduction="none")
    return torch.cat([torch.zeros_like(nll[:, :1]), nll], dim=1)


def caption_nats(lm: FrozenLanguageModel, prefix: Optional[Tensor], tokens: CaptionTokens) -> Tensor:
    """Each caption's text NLL in nats (N,), float64: what bits per byte divides by ln 2 and the bytes."""
    return (token_nll(lm, prefix, tokens).double() * tokens.text).sum(dim=1)


def training_loss(lm: FrozenLanguageModel, prefix: Tensor, tokens: CaptionTokens) -> Tensor:
    """Mean NLL per predicted token (text and end tokens) of a batch: the map's training objective."""
    scored = tokens.text | tokens.end
    return (token_nll(lm, prefix, tokens) * scored).sum() / scored.sum()


@torch.no_grad()
def greedy_captions(lm: FrozenLanguageModel, prefix: Tensor, max_new_tokens: int = 40) -> List[str]:
    """Greedy decoding after ``prefix`` (N, P, D) and the start token, until the end token or ``max_new_tokens``."""
    n = prefix.shape[0]
    start = torch.full((n, 1), lm.start_id, dtype=torch.long, device=prefix.device)
    embeds = torch.cat([prefix.to(lm.embed(start).dtype), lm.embed(start)], dim=1)
    out = torch.empty((n, 0), dtype=torch.long, device=prefix.device)
    done = torch.zeros(n, dtype=torch.bool, device=prefix.device)
    past = None
    for _ in range(max_new_tokens):
        result = lm.model(inputs_embeds=embeds, past_key_values=past, use_cache=True)
        past = result.past_key_values
        token = result.logits[:, -1].argmax(-1)
        token = torch.where(done, torch.full_like(token, lm.end_id), token)
        out = torch.cat([out, token[:, None]], dim=1)
        done |= token == lm.end_id
        if bool(done.all()):
            break
        embeds = lm.embed(token[:, None])
    texts = []
    for row in out.tolist():
        row = row[:row.index(lm.end_id)] if lm.end_id in row else row
        texts.append(lm.tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts
