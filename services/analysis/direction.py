"""One graph of exactly the quantity emc ranks: ``P_evil - P_safe`` as a custom target.

A token graph has one logit node per target token; the ranking combines their rows with the
weights ``d(P_evil - P_safe) / d logit_k`` (:func:`~services.analysis.ranking.direction_weights`).
Attribution is linear in the injected direction, so the same number comes from one graph
whose single target is the direction ``sum_k w_k u_k`` (``u_k``: token k's demeaned
unembedding, what its logit node injects). The difference is which features get into the
graph: circuit-tracer keeps the ``max_feature_nodes`` most influential on its targets, so
this graph keeps the features that matter for evil-minus-safe, not for the top tokens' own
logits. At equal feature sets the two give the same scores (tests/analysis/test_direction.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from common.graph.influence import logit_influence
from common.graph.model import AttributionGraph
from common.records import Label, ScoreShares
from common.store import ObjectStore
from services.analysis.ranking import direction_weights
from services.attribution.runtime import Runtime

LABEL = "P(evil)-P(safe)"
"""The custom target's name (its logit node's token string)."""


def evil_minus_safe_direction(
    runtime: Runtime, token_graph: AttributionGraph, labels: Mapping[int, Label]
) -> torch.Tensor:
    """The d_model direction whose attribution is the first-order change of
    ``P_evil - P_safe``, from a token graph's logit probabilities and the labels."""
    w_evil, w_safe, _, _ = direction_weights(token_graph, labels)
    m = token_graph.manifest
    vecs = runtime.logit_directions(m.variant, m.logit_token_ids).to(torch.float64)
    return ((w_evil - w_safe) @ vecs).to(torch.float32)


def direction_graph(
    runtime: Runtime, token_graph: AttributionGraph, labels: Mapping[int, Label]
) -> AttributionGraph:
    """The attribution graph of (the token graph's prompt and variant) on the single target
    ``P_evil - P_safe`` (weight 1), every other limit from the experiment."""
    m = token_graph.manifest
    vec = evil_minus_safe_direction(runtime, token_graph, labels)
    return runtime.attribute(m.prompt_text, m.variant, custom_targets=[(LABEL, 1.0, vec)])


def direction_scores(graph: AttributionGraph) -> torch.Tensor:
    """Score ``[S]`` of every source node of a :func:`direction_graph`: its total effect on
    the one target, i.e. on ``P_evil - P_safe`` (as ``score_sources(...).score``)."""
    if graph.manifest.n_logits != 1 or graph.manifest.logit_tokens != [LABEL]:
        raise ValueError(
            f"not an evil-minus-safe graph (logit nodes {graph.manifest.logit_tokens}): "
            "make it with direction_graph"
        )
    return logit_influence(graph).total[0]


@dataclass(frozen=True)
class DirectionExplanation:
    """A prompt and variant explained by its evil-minus-safe graph, next to its token graph."""

    prompt_id: str
    variant: str
    features: list[tuple[int, int, int, float]]  # (layer, pos, feature, score), best first
    shares: ScoreShares
    n_features: int  # feature nodes in the direction graph
    total: float  # sum of the roots' scores: the linearised P_evil - P_safe it explains
    token_graph_total: float  # the same from the token graph (equal up to feature choice)
    top_overlap: int  # of the token graph's top features, how many are also top here


def explain_prompt(
    runtime: Runtime,
    store: ObjectStore,
    pid: str,
    variant: str,
    *,
    top: int = 15,
) -> DirectionExplanation:
    """The evil-minus-safe graph of a stored prompt (its stored token graph and its current
    labels give the direction), scored and split into shares; nothing is stored."""
    from common.graph.artifact import load_graph
    from common.labels import resolve_labels
    from services.analysis.ranking import score_sources
    from services.analysis.shares import score_shares

    exp, fp = runtime.exp, runtime.fingerprint
    labels = resolve_labels(store, exp.name, pid, fp, variant, exp.judge.judge_id)
    token_graph = load_graph(store, exp.name, pid, fp, variant)
    graph = direction_graph(runtime, token_graph, labels.labels)
    score = direction_scores(graph)
    token_score = score_sources(token_graph, labels.labels).score

    def top_features(g: AttributionGraph, s: torch.Tensor) -> list[tuple[int, int, int, float]]:
        f = g.n_features
        order = torch.argsort(s[:f].abs(), descending=True)[:top].tolist()
        rows = [[int(v) for v in g.features[i].tolist()] for i in order]
        return [(r[0], r[1], r[2], float(s[i])) for r, i in zip(rows, order, strict=True)]

    mine, theirs = top_features(graph, score), top_features(token_graph, token_score)
    shares = score_shares(graph, score)
    return DirectionExplanation(
        prompt_id=pid,
        variant=variant,
        features=mine,
        shares=shares,
        n_features=graph.n_features,
        total=float(score[graph.n_features :].sum()),
        token_graph_total=float(token_score[token_graph.n_features :].sum()),
        top_overlap=len({f[:3] for f in mine} & {f[:3] for f in theirs}),
    )
