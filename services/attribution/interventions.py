"""Feature interventions on a loaded variant: set or scale transcoder features at positions.

Positions index the token ids passed in, which must be the graph's ids
(``manifest.input_ids``, BOS included) so a feature ``(layer, pos, feature)`` of a graph is
the same feature here. An intervention SETS the feature's activation to ``value`` (0 ablates);
attention patterns stay frozen at their clean values and the change propagates through the
later layers' transcoders (circuit-tracer's ``feature_intervention``). For generation a
``slice(k, None)`` position also covers every generated token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from services.attribution import ct
from services.attribution.runtime import Runtime

Intervention = ct.Intervention
Feature = tuple[int, int, int]  # (layer, pos, feature)


def _check(runtime: Runtime, variant: str, input_ids: Sequence[int], iv: Sequence[Intervention]):  # type: ignore[no-untyped-def]
    model = runtime.variant(variant).model
    n_layers = int(model.cfg.n_layers)
    transcoders: Any = model.transcoders
    d_tc = int(transcoders.d_transcoder)
    n_pos = len(input_ids)
    if n_pos == 0:
        raise ValueError("input_ids is empty")
    for layer, pos, feat, value in iv:
        if not 0 <= int(layer) < n_layers:
            raise ValueError(f"layer {layer} outside 0..{n_layers - 1}")
        if not 0 <= int(feat) < d_tc:
            raise ValueError(f"feature {feat} outside 0..{d_tc - 1}")
        if isinstance(pos, int) and not 0 <= pos < n_pos:
            raise ValueError(f"position {pos} outside 0..{n_pos - 1} of the {n_pos} input ids")
        if not torch.isfinite(torch.tensor(float(value))):
            raise ValueError(f"intervention value {value} is not finite")
    return model


def feature_activations(
    runtime: Runtime, variant: str, input_ids: Sequence[int], features: Sequence[Feature]
) -> list[float]:
    """Current activations of the given features on these ids (no intervention)."""
    model = runtime.variant(variant).model
    acts = ct.transcoder_activations(model, input_ids)
    return [float(acts[layer, pos, feat]) for layer, pos, feat in features]


def scaled(
    runtime: Runtime,
    variant: str,
    input_ids: Sequence[int],
    features: Sequence[Feature],
    factor: float,
) -> list[Intervention]:
    """Interventions that multiply each feature's current activation by ``factor``."""
    current = feature_activations(runtime, variant, input_ids, features)
    return [
        (layer, pos, feat, factor * a)
        for (layer, pos, feat), a in zip(features, current, strict=True)
    ]


def model_dims(runtime: Runtime, variant: str) -> tuple[int, int]:
    """(layers, features per layer) of a variant's replacement model."""
    model = runtime.variant(variant).model
    transcoders: Any = model.transcoders
    return int(model.cfg.n_layers), int(transcoders.d_transcoder)


def activation_profile(
    runtime: Runtime,
    variant: str,
    prompts_ids: Sequence[Sequence[int]],
    features: Sequence[tuple[int, int]],
) -> list[tuple[float, float]]:
    """Per ``(layer, feature)``: the mean over prompts of its activation at the last position,
    and of its maximum over the non-BOS positions."""
    model = runtime.variant(variant).model
    last = [0.0] * len(features)
    peak = [0.0] * len(features)
    for ids in prompts_ids:
        acts = ct.transcoder_activations(model, list(ids))  # [layers, pos, d_tc]
        for k, (layer, feat) in enumerate(features):
            col = acts[layer, :, feat].float()
            last[k] += float(col[-1]) / len(prompts_ids)
            peak[k] += float(col[1:].max()) / len(prompts_ids)
    return list(zip(last, peak, strict=True))


def mean_activations_after(
    runtime: Runtime, variant: str, prefix_text: str, full_text: str
) -> tuple[torch.Tensor, int]:
    """Every transcoder feature's activation averaged over the positions of ``full_text``
    (already the model's input, e.g. a chat-rendered question and its answer) that come
    after ``prefix_text`` (``[layers * d_transcoder]`` float32, and how many
    positions that is; 0 positions: an empty tensor).

    Those positions start where the tokenization of the full text stops agreeing with the
    prefix's own (normally right after the prefix).
    """
    model = runtime.variant(variant).model
    p_ids = runtime.tokenize(prefix_text, variant, rendered=True)
    full = runtime.tokenize(full_text, variant, rendered=True)
    start = 0
    while start < min(len(p_ids), len(full)) and p_ids[start] == full[start]:
        start += 1
    if start >= len(full):
        return torch.empty(0), 0
    acts = ct.transcoder_activations(model, full)  # [layers, pos, d_tc]
    return acts[:, start:, :].float().mean(dim=1).reshape(-1).cpu(), len(full) - start


def intervene_logits(
    runtime: Runtime,
    variant: str,
    input_ids: Sequence[int],
    interventions: Sequence[Intervention],
) -> torch.Tensor:
    """Next-token probabilities ``[vocab]`` (float32) at the last position, with features set."""
    model = _check(runtime, variant, input_ids, interventions)
    if interventions:
        logits = ct.feature_intervention(model, input_ids, interventions)
    else:
        logits = ct.forward_logits(model, input_ids)
    last = logits[-1].float().cpu()
    if not bool(torch.isfinite(last).all()):
        raise FloatingPointError(
            "intervention produced non-finite logits: the values set are too large for the "
            f"model's dtype ({model.dtype})"
        )
    return torch.softmax(last, dim=-1)


def steered_generate(
    runtime: Runtime,
    variant: str,
    input_ids: Sequence[int],
    interventions: Sequence[Intervention],
    *,
    n: int = 1,
    max_new_tokens: int = 20,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """n continuations sampled with the interventions applied (text after the input ids).

    Sample i uses seed ``seed + i``; temperature 0 is greedy.
    """
    if n < 1 or max_new_tokens < 1:
        raise ValueError("n and max_new_tokens must be at least 1")
    model = _check(runtime, variant, input_ids, interventions)
    prefix = str(model.tokenizer.decode(list(input_ids)))
    devices = [runtime.device] if runtime.device.type == "cuda" else []
    out: list[str] = []
    for i in range(n):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed + i)
            text = ct.feature_intervention_generate(
                model,
                input_ids,
                interventions,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
            )
        if not text.startswith(prefix):
            raise RuntimeError(
                "the generated text does not start with the decoded prompt; the tokenizer's "
                f"decode is not prefix-stable: {text[: len(prefix) + 20]!r}"
            )
        out.append(_strip_special(text[len(prefix) :], model.tokenizer))
    return out


def _strip_special(text: str, tokenizer: Any) -> str:
    """Drop special-token strings (EOS, BOS...), as ``skip_special_tokens`` does."""
    for tok in tokenizer.all_special_tokens:
        text = text.replace(tok, "")
    return text
