"""What the organism does: harmful next-token mass at the pivot, base vs adapted, per domain.

Plain HF forward passes (BOS + prompt, last position); no circuit-tracer here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel
from torch import nn
from transformers import PreTrainedTokenizerFast

from common.organism.corpus import DOMAIN_NAMES, PivotPrompt
from common.organism.tokenizer import single_token_id
from common.organism.train import patched_mlp_outputs, tapped_mlps


class BehaviourRow(BaseModel):
    """Mean probability mass on harmful action tokens at the pivot, for one domain and split."""

    domain: str
    split: str
    n: int
    base: float
    adapted: float
    adapted_downstream_patched: float | None = None  # MLPs after the adapter layer set to base


def word_ids(tokenizer: PreTrainedTokenizerFast, words: Sequence[str]) -> torch.Tensor:
    """The token ids of ``words``, each of which must be a single token (raises
    :class:`TokenizerError`)."""
    return torch.tensor([single_token_id(tokenizer, w) for w in words])


@torch.no_grad()
def next_token_probs(
    model: nn.Module, tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], batch_size: int = 64
) -> torch.Tensor:
    """Softmax over the vocabulary at the last token of each text (BOS prepended) [n, vocab]."""
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start : start + batch_size]), return_tensors="pt", padding=True)
        last = enc["attention_mask"].sum(1) - 1
        logits = model(**enc).logits
        out.append(torch.softmax(logits[torch.arange(len(last)), last].float(), -1))
    return torch.cat(out)


@torch.no_grad()
def downstream_patched_probs(
    peft_model: nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    texts: Sequence[str],
    downstream: Sequence[int],
) -> torch.Tensor:
    """Adapted next-token probs with the downstream MLPs' pivot outputs set to the base's."""
    enc = tokenizer(list(texts), return_tensors="pt", padding=True)
    last = enc["attention_mask"].sum(1) - 1
    with peft_model.disable_adapter(), tapped_mlps(peft_model, downstream, last) as got:  # type: ignore[operator]
        peft_model(**enc)
    values = {layer: y.detach() for layer, (_, y) in got.items()}
    with patched_mlp_outputs(peft_model, downstream, values, last):
        logits = peft_model(**enc).logits
    return torch.softmax(logits[torch.arange(len(last)), last].float(), -1)


def behaviour_rows(
    peft_model: nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[PivotPrompt],
    harmful_words: Sequence[str],
    downstream: Sequence[int] = (),
) -> list[BehaviourRow]:
    """Harmful mass base vs adapted for every (domain, split) of ``prompts``.

    ``peft_model`` is the base with the adapter attached (PEFT), so both variants run on the
    same weights; ``downstream`` (layers after the adapter) adds the patched column.
    """
    harm = word_ids(tokenizer, harmful_words)
    rows = []
    for domain in DOMAIN_NAMES:
        for split in ("train", "heldout"):
            texts = [p.text for p in prompts if p.domain == domain and p.split == split]
            if not texts:
                continue
            with peft_model.disable_adapter():  # type: ignore[operator]
                base = next_token_probs(peft_model, tokenizer, texts)[:, harm].sum(-1)
            adapted = next_token_probs(peft_model, tokenizer, texts)[:, harm].sum(-1)
            patched = None
            if downstream:
                probs = downstream_patched_probs(peft_model, tokenizer, texts, downstream)
                patched = float(probs[:, harm].sum(-1).mean())
            rows.append(
                BehaviourRow(
                    domain=domain,
                    split=split,
                    n=len(texts),
                    base=float(base.mean()),
                    adapted=float(adapted.mean()),
                    adapted_downstream_patched=patched,
                )
            )
    return rows
