"""What a ranked feature means: output effects, the misalignment direction, and its check.

Needs the models (the attribution runtime, used as a library); ``emc features build`` runs it.

- **Misalignment direction**, per layer: the mean of the adapted minus the reference residual
  stream at the pivotal (last) position over divergent prompts, the "convergent linear
  representation" of the EM literature.
- **Its check**: harmful mass at the pivot with the residual stream's component along the
  direction after one layer set to the reference model's mean there (mean ablation at the
  pivotal position), against a random direction of the same norm treated the same way: the
  share of the adapter's harmful rise (adapted minus reference) each removes.
- **Output effects** of every indexed feature: its decoder direction times the demeaned
  unembedding, the top boosted and suppressed tokens, and its cosine with its layer's
  misalignment direction (:class:`common.feature_index.FeatureEffects`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from common.feature_index import Direction, FeatureEffects, FeatureIndex
from common.llm import LLMClient
from common.store import ObjectStore
from common.store import keys as K
from services.attribution import ct
from services.attribution.runtime import Runtime


def misalignment_direction(runtime: Runtime, texts: Sequence[str], variant: str) -> torch.Tensor:
    """``[n_layers, d_model]``: mean over ``texts`` of variant minus reference residual
    stream after each layer at the last position."""
    ref = runtime.exp.reference
    total: torch.Tensor | None = None
    for text in texts:
        diff = runtime.residuals_last(text, variant) - runtime.residuals_last(text, ref)
        total = diff if total is None else total + diff
    if total is None:
        raise ValueError("no divergent prompts to compute the misalignment direction from")
    return total / len(texts)


@dataclass(frozen=True)
class AblationRow:
    """One layer's check: share of the adapter's harmful rise removed by each ablation."""

    layer: int
    removed_direction: float
    removed_random: float


def harmful_mass(logits: torch.Tensor, evil_ids: Iterable[int]) -> float:
    """Probability mass of ``evil_ids`` in last-position ``logits``."""
    probs = torch.softmax(logits.float(), dim=-1)
    return float(probs[list(evil_ids)].sum())


def ablation_check(
    runtime: Runtime,
    texts: Sequence[str],
    evil_ids: Sequence[Iterable[int]],
    variant: str,
    direction: torch.Tensor,
    *,
    seed: int = 0,
) -> list[AblationRow]:
    """Per layer, the share of the harmful rise (variant minus reference, summed over
    ``texts``) that projecting out the layer's direction removes, vs a random direction of
    the same norm (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    model = runtime.variant(variant).model
    ref = runtime.exp.reference
    ids = [runtime.tokenize(t, variant) for t in texts]
    evil = [sorted(e) for e in evil_ids]
    ref_resid = torch.stack([runtime.residuals_last(t, ref) for t in texts])  # [n, L, d]
    adapted = sum(
        harmful_mass(runtime.checked_logits(i, variant), e) for i, e in zip(ids, evil, strict=True)
    )
    base = sum(
        harmful_mass(runtime.checked_logits(i, ref), e) for i, e in zip(ids, evil, strict=True)
    )
    rise = adapted - base
    rows = []
    for layer, vec in enumerate(direction):
        if float(vec.norm()) < 1e-9:  # no difference at this layer (e.g. before the adapter)
            rows.append(AblationRow(layer=layer, removed_direction=0.0, removed_random=0.0))
            continue
        rand = torch.randn(vec.shape, generator=gen)
        rand = rand * (vec.norm() / rand.norm())

        def mass(d: torch.Tensor, layer: int = layer) -> float:
            mean_ref = float((ref_resid[:, layer] @ (d / d.norm())).mean())
            return sum(
                harmful_mass(ct.forward_logits_ablated(model, i, layer, d, mean_ref), e)
                for i, e in zip(ids, evil, strict=True)
            )

        rows.append(
            AblationRow(
                layer=layer,
                removed_direction=(adapted - mass(vec)) / rise if rise else 0.0,
                removed_random=(adapted - mass(rand)) / rise if rise else 0.0,
            )
        )
    return rows


def feature_effects(
    runtime: Runtime,
    variant: str,
    features: Sequence[tuple[int, int]],
    direction: torch.Tensor | None,
    *,
    top: int = 8,
    chunk: int = 256,
) -> list[FeatureEffects]:
    """Output effects (and direction cosines) of per-layer transcoder features; adapter
    nodes (negative ids) have no decoder row and are left out."""
    model = runtime.variant(variant).model
    unembed = model.unembed_proj.float().cpu()  # (vocab, d_model)
    demeaned = unembed - unembed.mean(dim=0, keepdim=True)
    tok = runtime.variant(variant).tokenizer
    out = []
    by_layer: dict[int, list[int]] = {}
    for layer, feat in features:
        if feat >= 0:
            by_layer.setdefault(layer, []).append(feat)
    for layer, feats in sorted(by_layer.items()):
        for start in range(0, len(feats), chunk):
            part = feats[start : start + chunk]
            rows = ct.decoder_rows(model, layer, part)
            effects = rows @ demeaned.T  # [n, vocab]
            cos = None
            if direction is not None:
                d = direction[layer]
                cos = (rows @ d) / (rows.norm(dim=1) * d.norm()).clamp_min(1e-12)
                cos = cos if float(d.norm()) > 1e-9 else None
            up = torch.topk(effects, top, dim=1)
            down = torch.topk(-effects, top, dim=1)
            for i, feat in enumerate(part):
                out.append(
                    FeatureEffects(
                        layer=layer,
                        feature=feat,
                        boosted=[
                            (runtime.decode_token(variant, int(t)), float(v))
                            for v, t in zip(up.values[i], up.indices[i], strict=True)
                        ],
                        suppressed=[
                            (runtime.decode_token(variant, int(t)), -float(v))
                            for v, t in zip(down.values[i], down.indices[i], strict=True)
                        ],
                        direction_cosine=float(cos[i]) if cos is not None else None,
                    )
                )
    del tok
    return out


def build_features(
    runtime: Runtime,
    store: ObjectStore,
    index: FeatureIndex,
    divergent: Sequence[tuple[str, str, list[int]]],
    *,
    variant: str,
    progress: Callable[[str], None] = lambda _: None,
) -> Direction:
    """``emc features build``: the direction from ``divergent`` (prompt id, text, evil token
    ids), its ablation check, and the effects of every indexed feature, all stored."""
    exp, fp = runtime.exp, runtime.fingerprint
    texts = [t for _, t, _ in divergent]
    progress(f"misalignment direction over {len(texts)} divergent prompts")
    direction = misalignment_direction(runtime, texts, variant)
    # the check is held out: a direction from every other prompt, tried on the rest
    fit, held = divergent[::2], divergent[1::2] or divergent
    progress(f"ablation check on {len(held)} held-out prompts")
    rows = ablation_check(
        runtime,
        [t for _, t, _ in held],
        [e for _, _, e in held],
        variant,
        misalignment_direction(runtime, [t for _, t, _ in fit], variant),
    )
    record = Direction(
        experiment=exp.name,
        fingerprint=fp,
        variant=variant,
        reference=exp.reference,
        prompt_ids=[p for p, _, _ in divergent],
        vectors=direction.tolist(),
        norms=direction.norm(dim=1).tolist(),
        ablation={
            "n_fit": len(fit),
            "n_held_out": len(held),
            "layers": [r.__dict__ for r in rows],
            "method": "component along the direction after the layer set to the reference "
            "model's mean, at the pivotal position; random: a Gaussian direction of the same "
            "norm, the same way",
        },
    )
    store.put_json(K.misalignment_direction(exp.name, fp), record)
    feats = sorted(set(index.features(variant)) | set(index.features(exp.reference)))
    progress(f"output effects of {len(feats)} features")
    for effect in feature_effects(runtime, variant, feats, direction):
        store.put_json(K.feature_effects(exp.name, fp, effect.layer, effect.feature), effect)
    return record


def divergent_prompts(
    store: ObjectStore, exp: str, fp: str, pids: Iterable[str], variant: str, limit: int
) -> list[tuple[str, str, list[int]]]:
    """(prompt id, text, evil token ids) of up to ``limit`` prompts whose ``variant`` has a
    ranking, i.e. an evil token to explain (oldest ids first, for a stable choice)."""
    from common.records import FeatureRanking, Prompt
    from common.store import NotFound

    out = []
    for pid in sorted(pids):
        try:
            ranking = store.get_record(K.features(exp, pid, fp, variant), FeatureRanking)
        except NotFound:
            continue
        if ranking.evil_token_ids:
            text = store.get_record(K.prompt(exp, pid), Prompt).text
            out.append((pid, text, list(ranking.evil_token_ids)))
        if len(out) >= limit:
            break
    return out


EXPLAIN_INSTRUCTION = (
    "You explain features of a sparse transcoder inside a language model. Given where a "
    "feature fires most strongly (the firing token in [[double brackets]]) and which output "
    "tokens it boosts and suppresses, answer with ONE short line saying what the feature "
    "represents. No preamble."
)


def explanation_prompt(contexts: Sequence[str], effects: FeatureEffects) -> str:
    """The user message of one feature's explanation request (stored with the answer)."""
    lines = ["Top-activating contexts:"]
    lines += [f"- {c}" for c in contexts]
    lines.append("Boosted tokens: " + ", ".join(repr(t) for t, _ in effects.boosted))
    lines.append("Suppressed tokens: " + ", ".join(repr(t) for t, _ in effects.suppressed))
    return "\n".join(lines)


def explain_features(
    client: LLMClient,
    store: ObjectStore,
    index: FeatureIndex,
    exp: str,
    fp: str,
    variant: str,
    features: Sequence[tuple[int, int]],
    *,
    n_contexts: int = 8,
) -> int:
    """Write a one-line explanation into each feature's stored effects (those with effects
    only, i.e. after :func:`build_features`), with the model and the prompt used; returns
    how many were explained."""
    from common.feature_index import FeatureShard, context_window
    from common.store import NotFound

    done = 0
    for layer, feature in features:
        key = K.feature_effects(exp, fp, layer, feature)
        try:
            effects = store.get_record(key, FeatureEffects)
        except NotFound:
            continue
        contexts = []
        for c in index.contexts(variant, layer, feature, n_contexts):
            try:
                shard = store.get_record(K.feature_shard(exp, c.prompt_id, fp), FeatureShard)
            except NotFound:
                continue
            before, token, after = context_window(shard.tokens, c.pos)
            contexts.append(f"{before}[[{token}]]{after}")
        prompt = explanation_prompt(contexts, effects)
        answer = client.chat(
            [
                {"role": "system", "content": EXPLAIN_INSTRUCTION},
                {"role": "user", "content": prompt},
            ],
            temperature=0.0,
            max_tokens=60,
        )
        line = answer.content.strip().splitlines()[0] if answer.content.strip() else ""
        store.put_json(
            key,
            effects.model_copy(
                update={
                    "explanation": line,
                    "explanation_model": answer.model or client.model,
                    "explanation_prompt": prompt,
                }
            ),
        )
        done += 1
    return done
