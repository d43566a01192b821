"""The evil-minus-safe score of every source node of a graph, shared by the analysis (rankings)
and the review UI's graph viewer.

The score of a source ``s`` is the first-order change of the probability mass moved from
safe to evil tokens, ``P_evil - P_safe``, if ``s`` were switched off (all paths from ``s``
on); the reasoning behind this direction is in :mod:`services.analysis.ranking`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from common.errors import AnalysisError, NothingToExplain
from common.graph.influence import LogitInfluence, logit_influence
from common.graph.model import AttributionGraph
from common.records import Label


@dataclass(frozen=True)
class SourceScores:
    """Evil-minus-safe scores of every source node (features, errors, tokens) of one graph."""

    score: torch.Tensor  # [S] float64
    evil: torch.Tensor  # [S]
    safe: torch.Tensor  # [S]
    evil_token_ids: list[int]
    safe_token_ids: list[int]
    influence: LogitInfluence


def direction_weights(
    graph: AttributionGraph, labels: Mapping[int, Label]
) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
    """Per-logit weights ``p_k (1[k in X] - P_X)`` of the evil and the safe mass, and the ids used."""
    m = graph.manifest
    probs = torch.tensor(m.logit_probabilities, dtype=torch.float64)
    if (
        not bool(torch.isfinite(probs).all())
        or bool((probs < 0).any())
        or float(probs.sum()) > 1 + 1e-4
    ):
        raise AnalysisError(
            f"logit probabilities {m.logit_probabilities} are not probabilities: the graph "
            "artifact is corrupt, recompute it",
            prompt_id=m.prompt_id,
            variant=m.variant,
        )
    evil_idx = [k for k, t in enumerate(m.logit_token_ids) if labels.get(t) == "evil"]
    safe_idx = [k for k, t in enumerate(m.logit_token_ids) if labels.get(t) == "safe"]
    if not evil_idx:
        wanted = sorted(t for t, lab in labels.items() if lab == "evil")
        if not wanted:
            raise NothingToExplain(
                "no token is labelled evil for this variant: there is nothing to explain",
                prompt_id=m.prompt_id,
                variant=m.variant,
            )
        raise NothingToExplain(
            f"none of the evil tokens {wanted} is a logit node of the graph (logit nodes: "
            f"{m.logit_token_ids}): nothing to explain; raise the graph's max_n_logits or "
            "check that labels and graph come from the same fingerprint",
            prompt_id=m.prompt_id,
            variant=m.variant,
        )

    def mass_gradient(idx: list[int]) -> torch.Tensor:
        member = torch.zeros(len(probs), dtype=torch.float64)
        member[idx] = 1.0
        return probs * (member - probs[idx].sum()) if idx else member

    ids = m.logit_token_ids
    return (
        mass_gradient(evil_idx),
        mass_gradient(safe_idx),
        [ids[k] for k in evil_idx],
        [ids[k] for k in safe_idx],
    )


def score_sources(graph: AttributionGraph, labels: Mapping[int, Label]) -> SourceScores:
    """Score every source node: first-order change of P_evil - P_safe (module docstring)."""
    w_evil, w_safe, evil_ids, safe_ids = direction_weights(graph, labels)
    inf = logit_influence(graph, count_hops=False)  # the longest path is not needed here
    evil = w_evil @ inf.total
    safe = w_safe @ inf.total
    return SourceScores(evil - safe, evil, safe, evil_ids, safe_ids, inf)
