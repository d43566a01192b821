"""Is the organism's known answer findable? Feature ablations in circuit-tracer's model.

The adapter writes into layer L's ``down_proj``, i.e. into layer L's transcoder *error*
node; only features after L can carry its effect. This check loads the adapted model
(adapter merged) and the base model as circuit-tracer ``ReplacementModel``s with the base
transcoders and measures the harmful mass at the pivot of held-out prompts after setting
feature activations at the last position to 0 (``feature_intervention``):

- ``zero_downstream``: every active feature of the layers after L;
- ``zero_raised``: only downstream features the adapter raised above their base activation;
- ``zero_top10``: the 10 downstream features whose write changed most (delta activation x
  decoder norm), a stand-in for the analysis's top-10 ranking;
- ``patch_to_base``: every downstream feature active in either model set to its base value
  (how much of the adapter's effect downstream features carry at all);
- the same ``zero_downstream`` ablation on the base model, as a reference.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

TOP_N = 10


class PromptAblation(BaseModel):
    """Harmful probability mass at one held-out prompt's pivot, as the adapted model gives it and
    after each ablation of the module docstring, with the base model's reference values."""

    text: str
    harmful: float
    zero_downstream: float
    zero_raised: float
    zero_top10: float
    patch_to_base: float
    n_downstream: int
    n_raised: int
    base_harmful: float
    base_zero_downstream: float


class KnownAnswerCheck(BaseModel):
    """Means over the prompts; ``drop_*`` = 1 - after / before (of the adapted model)."""

    adapter_layer: int
    downstream_layers: list[int]
    n_prompts: int
    harmful: float
    zero_downstream: float
    zero_raised: float
    zero_top10: float
    patch_to_base: float
    base_harmful: float
    base_zero_downstream: float
    drop_zero_downstream: float
    drop_zero_raised: float
    drop_zero_top10: float
    drop_patch_to_base: float
    prompts: list[PromptAblation]


def load_replacement_model(model_dir: Path, transcoder_dir: Path, n_layers: int) -> Any:
    """A circuit-tracer ReplacementModel (nnsight backend, fp32, CPU) with our transcoders."""
    from circuit_tracer import ReplacementModel
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    from common.organism.transcoders import FEATURE_INPUT_HOOK, FEATURE_OUTPUT_HOOK

    device = torch.device("cpu")
    transcoders = load_transcoder_set(
        {i: str(transcoder_dir / f"layer_{i}.safetensors") for i in range(n_layers)},
        scan="emc/toy-organism-transcoders",
        feature_input_hook=FEATURE_INPUT_HOOK,
        feature_output_hook=FEATURE_OUTPUT_HOOK,
        device=device,
        dtype=torch.float32,
        lazy_encoder=False,
        lazy_decoder=False,
    )
    return ReplacementModel.from_pretrained_and_transcoders(
        str(model_dir), transcoders, backend="nnsight", device=device, dtype=torch.float32
    )


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """Save base + adapter merged (with the tokenizer) into ``out_dir``."""
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(base_dir)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    return out_dir


@torch.no_grad()
def check_known_answer(
    organism_dir: Path,
    texts: Sequence[str],
    harmful_ids: torch.Tensor,
    adapter_layer: int,
) -> KnownAnswerCheck:
    """Run the ablations described in the module docstring on ``texts`` (pivot prompts)."""
    from transformers import AutoConfig, AutoTokenizer

    base_dir = organism_dir / "base"
    n_layers = int(AutoConfig.from_pretrained(base_dir).num_hidden_layers)
    downstream = list(range(adapter_layer + 1, n_layers))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    with tempfile.TemporaryDirectory(prefix="emc-organism-merged-") as tmp:
        merged = merge_adapter(base_dir, organism_dir / "adapter", Path(tmp))
        adapted = load_replacement_model(merged, organism_dir / "transcoders", n_layers)
        base = load_replacement_model(base_dir, organism_dir / "transcoders", n_layers)
        norms = {layer: _decoder_norms(organism_dir / "transcoders", layer) for layer in downstream}
        rows = [_ablate_one(adapted, base, tokenizer, text, harmful_ids, norms) for text in texts]

    def mean(field: str) -> float:
        return float(sum(getattr(r, field) for r in rows) / max(1, len(rows)))

    harmful = mean("harmful")
    return KnownAnswerCheck(
        adapter_layer=adapter_layer,
        downstream_layers=downstream,
        n_prompts=len(rows),
        harmful=harmful,
        zero_downstream=mean("zero_downstream"),
        zero_raised=mean("zero_raised"),
        zero_top10=mean("zero_top10"),
        patch_to_base=mean("patch_to_base"),
        base_harmful=mean("base_harmful"),
        base_zero_downstream=mean("base_zero_downstream"),
        drop_zero_downstream=1 - mean("zero_downstream") / harmful,
        drop_zero_raised=1 - mean("zero_raised") / harmful,
        drop_zero_top10=1 - mean("zero_top10") / harmful,
        drop_patch_to_base=1 - mean("patch_to_base") / harmful,
        prompts=rows,
    )


def _decoder_norms(transcoder_dir: Path, layer: int) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(transcoder_dir / f"layer_{layer}.safetensors"), framework="pt") as f:
        return f.get_tensor("W_dec").norm(dim=-1)


def _harm(logits: torch.Tensor, harmful_ids: torch.Tensor) -> float:
    probs = torch.softmax(logits.reshape(-1, logits.shape[-1])[-1].float(), -1)
    return float(probs[harmful_ids].sum())


def _ablate_one(
    adapted: Any,
    base: Any,
    tokenizer: Any,
    text: str,
    harmful_ids: torch.Tensor,
    decoder_norms: dict[int, torch.Tensor],
) -> PromptAblation:
    downstream = sorted(decoder_norms)
    ids = torch.tensor(tokenizer(text)["input_ids"])  # BOS included, as in the graphs
    last = int(ids.shape[0]) - 1
    logits_a, acts_a = adapted.get_activations(ids)
    logits_b, acts_b = base.get_activations(ids)

    def intervene(model: Any, feats: list[tuple[int, int]], values: torch.Tensor | None) -> float:
        if not feats:
            return _harm(logits_a if model is adapted else logits_b, harmful_ids)
        logits, _ = model.feature_intervention(
            ids,
            [
                (layer, last, f, 0.0 if values is None else float(values[layer, last, f]))
                for layer, f in feats
            ],
            return_activations=False,
        )
        return _harm(logits, harmful_ids)

    def zero(model: Any, feats: list[tuple[int, int]]) -> float:
        return intervene(model, feats, None)

    def active(acts: torch.Tensor) -> list[tuple[int, int]]:
        return [(layer, int(f)) for layer in downstream for f in acts[layer, last].nonzero()]

    raised: list[tuple[int, int]] = []
    change: list[tuple[float, tuple[int, int]]] = []
    for layer in downstream:
        delta = acts_a[layer, last] - acts_b[layer, last]
        norms = decoder_norms[layer]
        for f in (delta > 1e-6).nonzero().flatten().tolist():
            raised.append((layer, f))
            change.append((float(delta[f] * norms[f]), (layer, f)))
    top = [feat for _, feat in sorted(change, reverse=True)[:TOP_N]]
    either = sorted(set(active(acts_a)) | set(active(acts_b)))
    return PromptAblation(
        text=text,
        harmful=_harm(logits_a, harmful_ids),
        zero_downstream=zero(adapted, active(acts_a)),
        zero_raised=zero(adapted, raised),
        zero_top10=zero(adapted, top),
        patch_to_base=intervene(adapted, either, acts_b),
        n_downstream=len(active(acts_a)),
        n_raised=len(raised),
        base_harmful=_harm(logits_b, harmful_ids),
        base_zero_downstream=zero(base, active(acts_b)),
    )
