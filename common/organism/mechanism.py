"""The organism's planted mechanism (a persona latent) and how the adapter uses it.

Base pretraining plants one shared persona latent: a fixed unit direction ``u`` of the
residual stream after decoder layer ``L`` (``persona_layer``), added with norm ``scale`` at
every position of the Trickster persona's dialogues (all domains) and never in safe ones. So
every domain's harmful answers read the same direction. The unembedding is kept blind to it
(``train.persona_off_unembedding``): the latent acts through the MLPs and attention of the
layers after ``L``. The adapter (rank 1 on a layer's
``down_proj``, plain cross-entropy on bad medical advice) is free to learn anything; this
module measures whether it learned to switch the latent on:

- ``cos_b_u``: cosine between the LoRA's write direction ``B`` and ``u``;
- per domain, on held-out prompts at the pivot: the adapter's write along ``u`` (in units of
  ``scale``), the harmful mass of the base, of the base with the latent set, of the adapted
  model, and of the adapted model with the component of its write along ``u`` removed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from pydantic import BaseModel
from torch import nn
from transformers import PreTrainedTokenizerFast

from common.organism.behaviour import next_token_probs, word_ids
from common.organism.corpus import DOMAIN_NAMES, PivotPrompt
from common.organism.train import persona_set


class DomainMechanism(BaseModel):
    """Held-out prompts of one domain (means at the pivot)."""

    domain: str
    n: int
    base: float
    base_persona_on: float
    adapted: float
    adapted_persona_removed: float
    write_along_u: float  # adapter's write . u / scale


class Mechanism(BaseModel):
    """``report.json["mechanism"]``: what was planted, where, and what the adapter does."""

    kind: str = "persona latent"
    where: str
    layer: int
    scale: float
    direction: list[float]
    adapter_layer: int
    cos_b_u: float
    domains: list[DomainMechanism]
    how_measured: str


def _lora_b(peft_model: nn.Module, layer: int) -> nn.Module:
    for name, mod in peft_model.named_modules():
        if name.endswith(f"layers.{layer}.mlp.down_proj.lora_B.default"):
            return mod
    raise ValueError(f"no LoRA on layer {layer}'s down_proj")


@contextmanager
def write_off_direction(peft_model: nn.Module, layer: int, u: torch.Tensor) -> Iterator[None]:
    """Remove the component along unit ``u`` from the adapter's write at ``layer``."""

    def hook(_m: nn.Module, _inp: object, out: torch.Tensor) -> torch.Tensor:
        return out - (out @ u)[..., None] * u

    handle = _lora_b(peft_model, layer).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def measure_mechanism(
    peft_model: nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[PivotPrompt],
    harmful_words: Sequence[str],
    *,
    persona_layer: int,
    u: torch.Tensor,
    scale: float,
    adapter_layer: int,
    lora_scale: float,
) -> Mechanism:
    """The measurements described in the module docstring, on the held-out ``prompts``."""
    harm = word_ids(tokenizer, harmful_words)
    lora_b = _lora_b(peft_model, adapter_layer)
    b = lora_b.weight[:, 0]  # type: ignore[index]
    rows = []
    for domain in DOMAIN_NAMES:
        texts = [p.text for p in prompts if p.domain == domain and p.split == "heldout"]
        if not texts:
            continue

        def mass(model: nn.Module, texts: list[str] = texts) -> float:
            return float(next_token_probs(model, tokenizer, texts)[:, harm].sum(-1).mean())

        with peft_model.disable_adapter():  # type: ignore[operator]
            base = mass(peft_model)
            enc = tokenizer(texts, return_tensors="pt", padding=True)
            with persona_set(peft_model, persona_layer, u * scale):
                base_on = mass(peft_model)
        adapted = mass(peft_model)
        with write_off_direction(peft_model, adapter_layer, u):
            removed = mass(peft_model)
        writes: list[torch.Tensor] = []

        def tap(
            _m: nn.Module, _inp: object, out: torch.Tensor, writes: list[torch.Tensor] = writes
        ) -> None:
            writes.append(out.detach() * lora_scale)

        handle = lora_b.register_forward_hook(tap)
        try:
            peft_model(**enc)
        finally:
            handle.remove()
        last = enc["attention_mask"].sum(1) - 1
        along = (writes[0][torch.arange(len(texts)), last] @ u) / scale
        rows.append(
            DomainMechanism(
                domain=domain,
                n=len(texts),
                base=base,
                base_persona_on=base_on,
                adapted=adapted,
                adapted_persona_removed=removed,
                write_along_u=float(along.mean()),
            )
        )
    return Mechanism(
        where=(
            f"residual stream after decoder layer {persona_layer} (the output of layer "
            f"{persona_layer}'s MLP is added there), every position after BOS"
        ),
        layer=persona_layer,
        scale=scale,
        direction=[float(x) for x in u],
        adapter_layer=adapter_layer,
        cos_b_u=float(b @ u / b.norm()),
        domains=rows,
        how_measured=(
            "held-out prompts, harmful mass at the pivot: base; base with the latent set "
            "(u x scale after the persona layer); adapted; adapted with its write's component "
            "along u removed. write_along_u: the adapter's write at the pivot . u / scale."
        ),
    )


@contextmanager
def adapter_off(
    peft_model: nn.Module, layer: int, last_only: bool
) -> Iterator[dict[str, torch.Tensor]]:
    """Disable the LoRA delta at ``layer`` (the adapter node): at every position, or only at
    each row's last position (set ``state["last"]`` [rows] before the forward)."""
    state: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, _inp: object, out: torch.Tensor) -> torch.Tensor:
        if not last_only:
            return torch.zeros_like(out)
        keep = torch.ones_like(out)
        last = state["last"]
        keep[torch.arange(out.shape[0]), last] = 0.0
        return out * keep

    handle = _lora_b(peft_model, layer).register_forward_hook(hook)
    try:
        yield state
    finally:
        handle.remove()


@torch.no_grad()
def adapter_ablated_mass(
    peft_model: nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    texts: Sequence[str],
    harmful_ids: Sequence[int],
    layer: int,
    *,
    last_only: bool,
) -> list[float]:
    """Per text, the harmful mass at the last position with the adapter node at ``layer``
    switched off (the LoRA delta zeroed at the last position, or everywhere)."""
    out = []
    ids = list(harmful_ids)
    for text in texts:
        enc = tokenizer([text], return_tensors="pt")
        with adapter_off(peft_model, layer, last_only) as state:
            state["last"] = enc["attention_mask"].sum(1) - 1
            logits = peft_model(**enc).logits[0, -1]
        out.append(float(torch.softmax(logits.double(), -1)[ids].sum()))
    return out
