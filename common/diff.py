"""What changed from the reference (base) to an adapted variant on one prompt.

Both variants are attributed on the same logit targets (the union of their top-k), so a
node's score means the same quantity in both graphs: the first-order change of
``P_evil - P_safe`` if the node were switched off. The diff ranking orders nodes by how
much that contribution changed, adapted minus base; a node absent from a graph (not active,
or an adapter node in the base) contributes 0 there. Error nodes, the adapter and tokens
enter per layer through the rankings' :class:`~common.records.ScoreShares`.
"""

from __future__ import annotations

import heapq

from pydantic import BaseModel, ConfigDict, Field

from common.records import FeatureRanking, RankingDigest, ScoreShares, node_label


class NodeChange(BaseModel):
    """One node's score in the reference and in the variant (absent = 0)."""

    model_config = ConfigDict(extra="forbid")
    label: str = Field(description="L3/F1234@5, L3/adapter@5, L3 errors, tokens")
    kind: str = Field(description="feature | adapter | errors | tokens")
    layer: int | None
    pos: int | None = None
    feature: int | None = None
    reference: float
    variant: float

    @property
    def change(self) -> float:
        """Variant score minus reference score."""
        return self.variant - self.reference


class PromptDiff(BaseModel):
    """The diff ranking of one prompt: largest |change| first."""

    model_config = ConfigDict(extra="forbid")
    prompt_id: str
    reference: str
    variant: str
    total_reference: float
    total_variant: float
    nodes: list[NodeChange]


def _kind_rows(shares: ScoreShares | None) -> dict[tuple[str, int | None], float]:
    if shares is None:
        return {}
    out: dict[tuple[str, int | None], float] = {("tokens", None): shares.tokens * shares.total}
    for row in shares.layers:
        out["errors", row.layer] = row.errors * shares.total
    return out


def prompt_diff(
    ref: FeatureRanking | RankingDigest, var: FeatureRanking | RankingDigest, *, top: int = 30
) -> PromptDiff:
    """Nodes whose contribution changed most from ``ref`` to ``var`` (same prompt; rankings or
    their digests, which give the same diff)."""
    if ref.prompt_id != var.prompt_id:
        raise ValueError(f"rankings of two prompts: {ref.prompt_id} vs {var.prompt_id}")
    keyed: dict[tuple[int, int, int], list[float]] = {}
    for which, ranking in ((0, ref), (1, var)):
        for node, score in ranking.node_scores():
            keyed.setdefault(node, [0.0, 0.0])[which] += score
    ref_kinds, var_kinds = _kind_rows(ref.shares), _kind_rows(var.shares)
    kinds = {
        k: (ref_kinds.get(k, 0.0), var_kinds.get(k, 0.0))
        for k in sorted(set(ref_kinds) | set(var_kinds), key=str)
    }
    # NodeChange records only for the nodes that can make the top (every one tied with the
    # last is kept until the label breaks the tie): thousands of rows per ranking otherwise
    changes = [abs(b - a) for a, b in keyed.values()] + [abs(b - a) for a, b in kinds.values()]
    cutoff = heapq.nlargest(top, changes)[-1] if 0 < top < len(changes) else -1.0
    nodes = [
        NodeChange(
            label=f"{node_label(layer, feat)}@{pos}",
            kind="adapter" if feat < 0 else "feature",
            layer=layer,
            pos=pos,
            feature=feat,
            reference=a,
            variant=b,
        )
        for (layer, pos, feat), (a, b) in keyed.items()
        if abs(b - a) >= cutoff
    ]
    for (kind, layer), (a, b) in kinds.items():
        if abs(b - a) >= cutoff:
            nodes.append(
                NodeChange(
                    label="tokens" if kind == "tokens" else f"L{layer} errors",
                    kind=kind,
                    layer=layer,
                    reference=a,
                    variant=b,
                )
            )
    nodes.sort(key=lambda n: (-abs(n.change), n.label))
    return PromptDiff(
        prompt_id=ref.prompt_id,
        reference=ref.variant,
        variant=var.variant,
        total_reference=ref.shares.total if ref.shares else 0.0,
        total_variant=var.shares.total if var.shares else 0.0,
        nodes=nodes[:top],
    )
