"""Across prompts: which ``(layer, feature)`` drive evil tokens, and what the adapter changed.

A feature's key is position-independent: in one prompt its score and activation are summed
over the positions where it is a graph node (the first-order effect of switching the feature
off everywhere), then averaged over prompts. Plain functions over records; no model access.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from common.graph.model import AttributionGraph
from common.records import FeatureRanking
from services.analysis.records import (
    AggregateFeature,
    FeatureAggregate,
    FeatureChange,
    LayerShare,
    VariantComparison,
)

Key = tuple[int, int]  # (layer, feature id)


@dataclass
class PromptFeatures:
    """One prompt's features of one variant, positions folded: key -> summed values."""

    prompt_id: str
    activations: dict[Key, float]
    scores: dict[Key, float] | None  # None: no ranking for this variant (e.g. no evil logit)
    tokens: dict[Key, list[str]] = field(default_factory=dict)

    @classmethod
    def from_ranking(cls, r: FeatureRanking) -> PromptFeatures:
        """Fold a ranking's positions: activations and scores summed per (layer, feature), with the
        input tokens at its positions."""
        acts: dict[Key, float] = defaultdict(float)
        scores: dict[Key, float] = defaultdict(float)
        tokens: dict[Key, list[str]] = defaultdict(list)
        for f in r.features:
            k = (f.layer, f.feature)
            acts[k] += f.activation
            scores[k] += f.score
            tokens[k].append(f.token)
        return cls(r.prompt_id, dict(acts), dict(scores), dict(tokens))

    @classmethod
    def from_graph(cls, g: AttributionGraph) -> PromptFeatures:
        """Activations only (a variant whose graph could not be ranked)."""
        acts: dict[Key, float] = defaultdict(float)
        tokens: dict[Key, list[str]] = defaultdict(list)
        for (layer, pos, feat), a in zip(g.features.tolist(), g.activations.tolist(), strict=True):
            k = (int(layer), int(feat))
            acts[k] += float(a)
            tokens[k].append(g.manifest.input_tokens[int(pos)])
        return cls(g.manifest.prompt_id, dict(acts), None, dict(tokens))


def aggregate(
    rankings: Iterable[FeatureRanking],
    *,
    experiment: str,
    fingerprint: str,
    variant: str,
    top_n: int = 200,
) -> FeatureAggregate:
    """Mean score, presence, sign consistency per (layer, feature) over the given rankings."""
    prompts = [PromptFeatures.from_ranking(r) for r in rankings]
    n = len(prompts)
    per_key: dict[Key, list[tuple[str, float, float]]] = defaultdict(list)
    tokens: dict[Key, Counter[str]] = defaultdict(Counter)
    for p in prompts:
        assert p.scores is not None
        for k, s in p.scores.items():
            per_key[k].append((p.prompt_id, s, p.activations[k]))
            tokens[k].update(p.tokens.get(k, []))
    rows = []
    for (layer, feat), seen in per_key.items():
        total = sum(s for _, s, _ in seen)
        mean = total / n if n else 0.0
        sign = 1.0 if mean >= 0 else -1.0
        agree = sum(1 for _, s, _ in seen if s * sign > 0)
        best = sorted(seen, key=lambda x: -x[1] * sign)[:3]
        rows.append(
            AggregateFeature(
                layer=layer,
                feature=feat,
                mean_score=mean,
                mean_score_present=total / len(seen),
                n_prompts=len(seen),
                frac_prompts=len(seen) / n if n else 0.0,
                sign_consistency=agree / len(seen),
                mean_activation=sum(a for _, _, a in seen) / len(seen),
                tokens=[t for t, _ in tokens[(layer, feat)].most_common(3)],
                top_prompts=[pid for pid, _, _ in best],
            )
        )
    rows.sort(key=lambda r: (-r.mean_score, r.layer, r.feature))
    return FeatureAggregate(
        experiment=experiment,
        fingerprint=fingerprint,
        variant=variant,
        prompt_ids=[p.prompt_id for p in prompts],
        n_features_total=len(rows),
        features=_keep_extremes(rows, top_n),
        layers=layer_shares(rows),
    )


def _keep_extremes(rows: list[AggregateFeature], top_n: int) -> list[AggregateFeature]:
    """The top_n rows by |mean_score|, kept in mean_score order (both ends of the ranking)."""
    if len(rows) <= top_n:
        return rows
    keep = {id(r) for r in sorted(rows, key=lambda r: -abs(r.mean_score))[:top_n]}
    return [r for r in rows if id(r) in keep]


def layer_shares(rows: Sequence[AggregateFeature]) -> list[LayerShare]:
    """Per layer: positive and negative score mass and the number of features (all rows)."""
    pos: dict[int, float] = defaultdict(float)
    neg: dict[int, float] = defaultdict(float)
    count: Counter[int] = Counter()
    for r in rows:
        count[r.layer] += 1
        if r.mean_score >= 0:
            pos[r.layer] += r.mean_score
        else:
            neg[r.layer] += r.mean_score
    return [
        LayerShare(layer=layer, positive=pos[layer], negative=neg[layer], n_features=count[layer])
        for layer in sorted(count)
    ]


def feature_changes(pairs: Sequence[tuple[PromptFeatures, PromptFeatures]]) -> list[FeatureChange]:
    """Every (layer, feature) of either side: mean activation and score, reference vs variant.

    Activation means use every pair (absent = 0); score means only the pairs where both
    sides were ranked (None when there is no such pair).
    """
    for ref, var in pairs:
        if ref.prompt_id != var.prompt_id:
            raise ValueError(
                f"compare pairs must be the same prompt: {ref.prompt_id} vs {var.prompt_id}"
            )
    n = len(pairs)
    scored = [(r, v) for r, v in pairs if r.scores is not None and v.scores is not None]
    present: Counter[Key] = Counter(k for r, v in pairs for k in {*r.activations, *v.activations})
    rows = []
    for k in sorted(present):
        rs = vs = None
        if scored:
            rs = sum((r.scores or {}).get(k, 0.0) for r, _ in scored) / len(scored)
            vs = sum((v.scores or {}).get(k, 0.0) for _, v in scored) / len(scored)
        rows.append(
            FeatureChange(
                layer=k[0],
                feature=k[1],
                reference_activation=sum(r.activations.get(k, 0.0) for r, _ in pairs) / n,
                variant_activation=sum(v.activations.get(k, 0.0) for _, v in pairs) / n,
                reference_score=rs,
                variant_score=vs,
                n_prompts=present[k],
            )
        )
    return rows


def compare(
    pairs: Sequence[tuple[PromptFeatures, PromptFeatures]],
    *,
    experiment: str,
    fingerprint: str,
    reference: str,
    variant: str,
    top_n: int = 50,
) -> VariantComparison:
    """Reference vs variant on the same prompts: the features whose activation or score
    changed most (see :func:`feature_changes`)."""
    rows = feature_changes(pairs)
    by_act = sorted(rows, key=lambda c: (-abs(c.d_activation), c.layer, c.feature))[:top_n]
    by_score = sorted(
        (c for c in rows if c.d_score is not None),
        key=lambda c: (-abs(c.d_score or 0.0), c.layer, c.feature),
    )[:top_n]
    return VariantComparison(
        experiment=experiment,
        fingerprint=fingerprint,
        reference=reference,
        variant=variant,
        prompt_ids=[r.prompt_id for r, _ in pairs],
        scored_prompt_ids=[
            r.prompt_id for r, v in pairs if r.scores is not None and v.scores is not None
        ],
        by_activation=by_act,
        by_score=by_score,
    )
