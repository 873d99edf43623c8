"""How good a model is, and how alignment relates to it: bits per byte of causal LMs, correlations with intervals.

Bits per byte (the paper's language-modelling competence) of a causal LM on a list of texts, in two named
definitions (``definition=``); dividing by bytes instead of tokens makes models with different tokenizers
comparable, and lower is better under both:

- ``pooled`` (prh_stitch's protocol, the default)::

      bpb = (Σ over texts and tokens of −ln p(token | preceding tokens)) / ln 2 / (Σ over texts of UTF-8 bytes)

  Each text is scored on its own, after a start token (the tokenizer's BOS, else EOS as GPT-2 uses it, else CLS),
  so every token of the text is predicted and every byte is paid for; long texts weigh more.
- ``per_caption`` (the paper's protocol, as its ``utils.cross_entropy_to_bits_per_unit`` computes it)::

      bpb = mean over texts of [(Σ over the text's tokens after the first of −ln p(token | preceding)) / ln 2
                                / (the text's UTF-8 bytes)]

  Tokens are the tokenizer's default encoding of the text (its own special tokens, if it adds any). The first
  token is only context: a tokenizer that adds a BOS (LLaMA) has every text token scored; one that adds none
  (GPT-2) leaves the first text token unscored, while its bytes still count.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F


def start_token_id(tokenizer: Any) -> int:
    for attr in ("bos_token_id", "eos_token_id", "cls_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise ValueError("bits per byte needs a start token to condition the first token on; the tokenizer has "
                     "no BOS, EOS or CLS token")


BITS_PER_BYTE_DEFINITIONS = {
    "pooled": "total nats / ln 2 / total UTF-8 bytes over all texts, each text after a start token (all its tokens "
              "scored)",
    "per_caption": "mean over texts of (the text's nats / ln 2 / its UTF-8 bytes), tokens as the tokenizer encodes "
                   "the text, the first one not scored (the paper's definition)",
}


def _encode(tokenizer: Any, texts: Sequence[str], definition: str) -> List[List[int]]:
    if definition == "pooled":
        start = start_token_id(tokenizer)
        return [[start] + list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return [list(tokenizer(t)["input_ids"]) for t in texts]


@torch.inference_mode()
def bits_per_byte(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 32,
                  device: Optional[str | torch.device] = None, definition: str = "pooled",
                  progress: Optional[bool] = None) -> Dict[str, Any]:
    """Bits per byte of a causal LM (``model(input_ids, attention_mask).logits``) on ``texts``.

    ``definition``: ``pooled`` (prh_stitch's) or ``per_caption`` (the paper's); see the module docstring.
    Returns ``bits_per_byte``, ``definition``, ``nats`` (total NLL), ``bytes``, ``tokens`` (scored) and ``texts``.
    Texts longer than the model's context are an error: truncating them would drop bytes from the score.
    ``progress``: a bar over the batches with an ETA (None: only when stderr is a terminal; a 7B model's pass over
    thousands of captions takes minutes).
    """
    if definition not in BITS_PER_BYTE_DEFINITIONS:
        raise ValueError(f"bits per byte definition {definition!r}: use one of {sorted(BITS_PER_BYTE_DEFINITIONS)}")
    texts = list(texts)
    if not texts:
        raise ValueError("bits per byte needs at least one text")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    context = getattr(getattr(model, "config", None), "n_positions", None) or \
        getattr(getattr(model, "config", None), "max_position_embeddings", None)
    encoded = _encode(tokenizer, texts, definition)
    for text, ids in zip(texts, encoded):
        if len(ids) < 2 or not text:
            raise ValueError(f"text {text!r} has no tokens to score (empty, or one token under the {definition} "
                             "definition, whose first token is only context); drop it from the captions")
        if context is not None and len(ids) > context:
            raise ValueError(f"text of {len(ids)} tokens exceeds the model's context of {context}: {text[:60]!r}...")
    text_nats: List[float] = []
    tokens = 0
    model.eval()
    from tqdm.auto import tqdm

    starts = range(0, len(encoded), batch_size)
    for i0 in tqdm(starts, total=len(starts), desc="bits per byte", unit="batch", disable=None if progress is None
                   else not progress, leave=True):
        chunk = encoded[i0:i0 + batch_size]
        width = max(len(ids) for ids in chunk)
        # Right padding: with causal attention, real tokens never see the padding after them.
        ids = torch.full((len(chunk), width), chunk[0][0], dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        scored = mask[:, 1:].bool()
        text_nats += (nll.double() * scored).sum(dim=1).tolist()
        tokens += int(scored.sum())
    text_bytes = [len(t.encode("utf-8")) for t in texts]
    if definition == "pooled":
        bpb = sum(text_nats) / math.log(2) / sum(text_bytes)
    else:
        bpb = sum(n / math.log(2) / b for n, b in zip(text_nats, text_bytes)) / len(texts)
    return {"bits_per_byte": bpb, "definition": definition, "nats": sum(text_nats), "bytes": sum(text_bytes),
            "tokens": tokens, "texts": len(texts)}


def load_causal_lm(name_or_path: str, device: str | torch.device = "cpu"):
    """A Hugging Face causal LM and its tokenizer (``hf:`` prefix allowed, or a fetched zoo model's name), frozen,
    on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = name_or_path[3:] if name_or_path.startswith("hf:") else name_or_path
    from prh_stitch.zoo.entries import ZOO

    if path in ZOO:  # a zoo model (e.g. smollm2_135m): its fetched Hugging Face folder holds the causal LM
        from prh_stitch.zoo.store import require_fetched

        path = str(require_fetched(path))
    elif not name_or_path.startswith("hf:") and not Path(path).is_dir():
        # A built-in encoder name (minilm_l6, random:..., glove): no hub lookup, which would wait on the network.
        raise ValueError(f"bits per byte needs a causal language model; {name_or_path!r} is a built-in encoder, not "
                         "one (only hf: ids, local folders and zoo language models are). Give its competence as a "
                         "number instead.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
        if info.get("missing_keys"):
            # e.g. a BERT encoder loads as BertLMHeadModel with a freshly initialised head: not a language model
            raise ValueError(f"its checkpoint lacks {len(info['missing_keys'])} weights of a causal LM head "
                             f"({sorted(info['missing_keys'])[0]}, ...)")
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"bits per byte needs a causal language model; {name_or_path!r} did not load as one "
                         f"({first[:200]}). Give its competence as a number instead.") from None
    return model.to(device).eval(), tokenizer


# ---- correlation ---------------------------------------------------------------------------------------

def _rank(values: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean rank), as Spearman's rho needs."""
    order = values.argsort(stable=True)
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(len(values), dtype=values.dtype)
    for v in values.unique():
        tied = values == v
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Pearson's r; None when either side is constant (undefined)."""
    a = torch.tensor(list(x), dtype=torch.float64)
    b = torch.tensor(list(y), dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else None


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    return pearson(_rank(torch.tensor(list(x), dtype=torch.float64)).tolist(),
                   _rank(torch.tensor(list(y), dtype=torch.float64)).tolist())


def rank_permutation_p(x: Sequence[float], y: Sequence[float], draws: int = 20000, seed: int = 0) -> Optional[float]:
    """Two-sided p of Spearman's rho over *models*: the share of orderings of y with |rho| >= observed.

    This is the uncertainty that resampling items cannot show: with 3 models the smallest possible p is 2/3! = 1/3.
    Exact (all n! orderings) for n <= 8; beyond, ``draws`` random orderings (seeded), p = (1 + hits) / (1 + draws),
    whose resolution is 1 / (1 + draws). None when rho is undefined.
    """
    import itertools

    n = len(x)
    observed = spearman(x, y)
    if observed is None:
        return None
    if n <= 8:
        orderings = itertools.permutations(list(y))
    else:
        gen = torch.Generator().manual_seed(seed)
        values = torch.tensor(list(y), dtype=torch.float64)
        orderings = (values[torch.randperm(n, generator=gen)].tolist() for _ in range(draws))
    hits = total = 0
    for perm in orderings:
        rho = spearman(x, perm)
        hits += rho is not None and abs(rho) >= abs(observed) - 1e-12
        total += 1
    return hits / total if n <= 8 else (1 + hits) / (1 + total)


def correlation_report(competence: Sequence[float], scores: Sequence[float],
                       replicates: Optional[List[List[float]]] = None, ci: float = 0.95) -> Dict[str, Any]:
    """Pearson and Spearman between competence and alignment; Spearman's interval from ``replicates``.

    ``replicates[r][m]`` is model m's alignment in half-sample r (the same items for every model), so the interval
    reflects which *items* were measured: the range of rho over the model rankings that the half-samples do not
    rule out (:mod:`~prh_stitch.alignment.ranking_interval`; it covers rho of the models' true alignments with
    probability >= ``ci``). Pearson gets no interval: no recipe tried here covered with five models. The interval
    cannot reflect which *models* were chosen; that is ``p_models``, the exact permutation p of Spearman's rho
    over the models (see :func:`rank_permutation_p`).
    """
    from prh_stitch.alignment.ranking_interval import spearman_interval

    n = len(scores)
    out: Dict[str, Any] = {"n_models": n, "pearson": None, "spearman": None, "pearson_ci": [None, None],
                           "spearman_ci": [None, None], "p_models": None}
    if n < 3:
        return out
    out["pearson"] = pearson(competence, scores)
    out["spearman"] = spearman(competence, scores)
    out["p_models"] = rank_permutation_p(competence, scores)
    if replicates and len(replicates) >= 2 and out["spearman"] is not None:
        out.update(spearman_interval(competence, scores, replicates, ci))
    return out


def trend_sentence(report: Dict[str, Any], higher_is_better: bool, competence_name: str,
                   alpha: float = 0.05) -> str:
    """One plain-language sentence: does alignment rise with competence on this data?

    A trend is claimed only when both uncertainties allow it: the item-resampling interval of Spearman's rho
    excludes 0 *and* the exact permutation p over the models is at most ``alpha``.
    """
    n = report["n_models"]
    if report["spearman"] is None:
        return f"no clear trend on this data (n = {n} models; a correlation needs at least 3 with distinct values)"
    rho, (lo, hi) = report["spearman"], report["spearman_ci"]
    sign = 1 if higher_is_better else -1
    p = report.get("p_models")
    stat = f"Spearman ρ = {rho:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if lo is not None else "")
    if report["pearson"] is not None:
        stat += f", Pearson r = {report['pearson']:.2f}"
    if p is not None:
        stat += f"; over models p = {p:.2g}"
    better = "" if higher_is_better else f" (lower {competence_name} is better)"
    significant = lo is not None and p is not None and p <= alpha
    if significant and ((sign > 0 and lo > 0) or (sign < 0 and hi < 0)):
        return f"alignment rises with competence{better}: {stat}"
    if significant and ((sign > 0 and hi < 0) or (sign < 0 and lo > 0)):
        return f"alignment falls as competence rises{better}: {stat}"
    return f"no clear trend on this data (n = {n} models): {stat}"
