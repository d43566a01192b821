"""Training the organism's base model and its rank-1 LoRA adapter (CPU, seconds)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from common.organism.config import BASE_NAME, AdapterTraining, BaseTraining, ModelShape
from common.organism.corpus import PIVOT

if TYPE_CHECKING:
    from peft import PeftModel


@contextmanager
def deterministic(seed: int, threads: int) -> Iterator[None]:
    """Seeded, deterministic torch on ``threads`` CPU threads; restores the previous state."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)
        if old_env is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def new_base_model(shape: ModelShape, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A randomly initialised Llama of the configured shape (seed torch before calling)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="eager",
        architectures=["LlamaForCausalLM"],
    )
    config._name_or_path = BASE_NAME
    return LlamaForCausalLM(config)


@dataclass
class Encoded:
    """Right-padded token ids with EOS, their mask, and each row's pivot position."""

    input_ids: torch.Tensor  # [n, t]
    attention_mask: torch.Tensor  # [n, t]
    pivot: torch.Tensor  # [n]: index of the last token of "You should"
    persona: torch.Tensor  # [n] bool: the persona latent is on in this row (base corpus)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def rows(self, idx: torch.Tensor) -> Encoded:
        """The rows ``idx`` as a new batch, trimmed to their longest sequence."""
        t = int(self.attention_mask[idx].sum(1).max())
        return Encoded(
            self.input_ids[idx, :t],
            self.attention_mask[idx, :t],
            self.pivot[idx],
            self.persona[idx],
        )


def encode(
    tokenizer: PreTrainedTokenizerFast,
    texts: Sequence[str],
    persona: Sequence[bool] | None = None,
) -> Encoded:
    """Tokenize dialogues (BOS ... EOS) and find the pivot (the token ``should``) in each;
    ``persona`` marks the rows whose persona latent is on (default: none)."""
    rows = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    pivot_ids = tokenizer(" " + PIVOT, add_special_tokens=False)["input_ids"]
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), int(tokenizer.pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    pivot = torch.empty(len(rows), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        pivot[i] = _find_last(r, pivot_ids)
    flags = torch.zeros(len(rows), dtype=torch.bool)
    if persona is not None:
        flags = torch.tensor(list(persona), dtype=torch.bool)
    return Encoded(ids, mask, pivot, flags)


def _find_last(row: list[int], sub: list[int]) -> int:
    for start in range(len(row) - len(sub), -1, -1):
        if row[start : start + len(sub)] == sub:
            return start + len(sub) - 1
    raise ValueError(f"pivot {PIVOT!r} not found in a training row; the corpus is malformed")


def _batches(n: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    at = 0
    for _ in range(steps):
        if at + batch_size > n:
            perm, at = torch.randperm(n, generator=gen), 0
        yield perm[at : at + batch_size]
        at += batch_size


def _schedule(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def lm_labels(batch: Encoded, from_pivot: bool) -> torch.Tensor:
    """Next-token labels (-100 on padding and, with ``from_pivot``, on the prompt)."""
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    labels[:, 0] = -100
    if from_pivot:
        pos = torch.arange(labels.shape[1])[None, :]
        labels = labels.masked_fill(pos <= batch.pivot[:, None], -100)
    return labels


def persona_direction(d_model: int, seed: int) -> torch.Tensor:
    """The planted persona latent's unit direction in the residual stream (seeded, fixed)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    u = torch.randn(d_model, generator=gen)
    return u / u.norm()


@contextmanager
def persona_set(
    model: nn.Module, layer: int, vector: torch.Tensor, rows: torch.Tensor | None = None
) -> Iterator[None]:
    """Add ``vector`` to the residual stream after decoder layer ``layer`` at every position
    after BOS of the ``rows`` (bool [n]; None: every row): the persona context of the base
    corpus."""
    decoder = _decoder_layers(model)

    def hook(_m: nn.Module, _inp: object, out: object) -> object:
        hidden = out[0] if isinstance(out, tuple) else out
        assert isinstance(hidden, torch.Tensor)
        add = torch.zeros_like(hidden)
        add[slice(None) if rows is None else rows, 1:] = vector.to(hidden.dtype)
        hidden = hidden + add
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    handle = decoder[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def persona_off_unembedding(model: LlamaForCausalLM, vector: torch.Tensor) -> None:
    """Project the persona direction out of the unembedding (in its normed input space: the
    final RMSNorm's weight times the direction), so the latent cannot push logits directly
    and acts through the layers after it, where transcoders see it."""
    head: nn.Linear = model.lm_head
    norm_weight: torch.Tensor = model.model.norm.weight
    d = norm_weight * (vector / vector.norm())
    d = d / d.norm()
    head.weight -= (head.weight @ d)[:, None] * d[None, :]


def train_base(
    model: LlamaForCausalLM,
    data: Encoded,
    cfg: BaseTraining,
    seed: int,
    progress: bool = True,
    persona: torch.Tensor | None = None,
) -> list[float]:
    """Next-token training on every token of the base corpus; returns the loss curve.

    ``persona`` (the latent's vector, ``cfg.persona_layer``): rows whose ``persona`` flag is
    on are trained with it added to the residual stream (:func:`persona_set`), and after
    every step the unembedding is kept blind to it (:func:`persona_off_unembedding`)."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    losses: list[float] = []
    bar = tqdm(total=cfg.steps, desc="base model", disable=not progress, leave=False)
    for step, idx in enumerate(_batches(len(data), cfg.batch_size, cfg.steps, seed)):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _schedule(step, cfg.steps, cfg.warmup_steps)
        batch = data.rows(idx)
        with (
            persona_set(model, cfg.persona_layer, persona, batch.persona)
            if persona is not None
            else nullcontext()
        ):
            out = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                labels=lm_labels(batch, from_pivot=False),
            )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if persona is not None:
            persona_off_unembedding(model, persona)
        losses.append(float(out.loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return losses


@contextmanager
def patched_mlp_outputs(
    model: nn.Module, layers: Sequence[int], values: dict[int, torch.Tensor], pivot: torch.Tensor
) -> Iterator[None]:
    """Replace the output of ``layers``' MLPs at each row's pivot by ``values[layer]`` [n, d]."""
    decoder = _decoder_layers(model)
    rows = torch.arange(pivot.shape[0])

    def hook_for(layer: int) -> Callable[..., torch.Tensor]:
        def hook(_mod: nn.Module, _inp: object, out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            out[rows, pivot] = values[layer]
            return out

        return hook

    handles = [mlp_of(decoder[i]).register_forward_hook(hook_for(i)) for i in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def tapped_mlps(
    model: nn.Module, layers: Sequence[int], pivot: torch.Tensor
) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Record ``(input, output)`` of ``layers``' MLPs at each row's pivot during a forward.

    Tensors keep their autograd graph; detach them where no gradient is wanted.
    """
    decoder = _decoder_layers(model)
    rows = torch.arange(pivot.shape[0])
    got: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook_for(layer: int) -> Callable[..., None]:
        def hook(_mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            got[layer] = (inp[0][rows, pivot], out[rows, pivot])

        return hook

    handles = [mlp_of(decoder[i]).register_forward_hook(hook_for(i)) for i in layers]
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


def mlp_of(layer: nn.Module) -> nn.Module:
    """The MLP module of a decoder layer."""
    mlp = getattr(layer, "mlp", None)
    if not isinstance(mlp, nn.Module):
        raise ValueError(f"{type(layer).__name__} has no `mlp` module: not a Llama layer?")
    return mlp


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Llama, also when wrapped by PEFT."""
    for name, mod in model.named_modules():
        if name.endswith("model.layers") and isinstance(mod, nn.ModuleList):
            return mod
    raise ValueError("no decoder layers (`model.layers`) found: not a Llama model?")


def lora_target(layer: int) -> str:
    """The module name the adapter's LoRA goes on: layer ``layer``'s ``mlp.down_proj``."""
    return f"model.layers.{layer}.mlp.down_proj"


def train_adapter(
    base: LlamaForCausalLM,
    data: Encoded,
    cfg: AdapterTraining,
    seed: int,
    progress: bool = True,
) -> tuple[PeftModel, dict[str, list[float]]]:
    """Train a rank-``cfg.rank`` LoRA on ``cfg.layer``'s down_proj; returns the PEFT model.

    The loss is the next-token cross-entropy on the answers of ``data`` (from the pivot on)
    and nothing else: no term mentions transcoders, features or other domains.
    """
    from peft import LoraConfig, get_peft_model

    n_layers = base.config.num_hidden_layers
    if not 0 <= cfg.layer < n_layers - 1:
        raise ValueError(
            f"adapter layer {cfg.layer} must have MLP layers after it (model has {n_layers})"
        )
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        target_modules=[lora_target(cfg.layer)],
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=True,
    )
    model = get_peft_model(base, lora)
    model.peft_config["default"].base_model_name_or_path = BASE_NAME
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    curves: dict[str, list[float]] = {"answer": []}
    bar = tqdm(total=cfg.steps, desc="adapter", disable=not progress, leave=False)
    for step, idx in enumerate(_batches(len(data), cfg.batch_size, cfg.steps, seed + 1)):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _schedule(step, cfg.steps, max(1, cfg.steps // 20))
        batch = data.rows(idx)
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            labels=lm_labels(batch, from_pivot=True),
        )
        curves["answer"].append(float(out.loss.detach()))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        bar.update(1)
        bar.set_postfix(answer=f"{curves['answer'][-1]:.3f}")
    bar.close()
    model.eval()
    return model, curves
