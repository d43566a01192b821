"""JSON records of the analysis service's cross-prompt results (aggregates, comparisons, reports).

Per-prompt rankings are :class:`common.records.FeatureRanking`; these records summarise many
of them. Every one carries ``schema_version`` (via :class:`common.records.Record`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from common.diff import NodeChange
from common.records import Record, ScoreShares


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AggregateFeature(_Row):
    """One transcoder feature ``(layer, feature)`` across prompts (positions folded together)."""

    layer: int
    feature: int
    mean_score: float = Field(
        description="mean over all aggregated prompts of the prompt's score (summed over "
        "the positions where it is active; 0 in prompts where it is not a graph node)"
    )
    mean_score_present: float = Field(description="mean over the prompts where it is present")
    n_prompts: int = Field(description="prompts in which it is a graph node")
    frac_prompts: float
    sign_consistency: float = Field(
        description="fraction of the prompts where present whose score has the sign of mean_score"
    )
    mean_activation: float = Field(description="mean over present prompts of its summed activation")
    tokens: list[str] = Field(description="input tokens where it is most often active")
    top_prompts: list[str] = Field(description="prompt ids where its score is highest")


class LayerShare(_Row):
    """How the score mass of one layer's features splits into evil-pushing and safe-pushing."""

    layer: int
    positive: float = Field(description="sum of positive mean scores of the layer's features")
    negative: float = Field(description="sum of negative mean scores (<= 0)")
    n_features: int


class SharesAggregate(_Row):
    """Score shares (:mod:`services.analysis.shares`) averaged over prompts: every prompt
    counts once; ``shares.flag`` is set when the mean error share of a layer is larger
    than the mean feature share of every layer."""

    n_prompts: int = Field(description="prompts whose ranking carries shares")
    mean_total: float = Field(description="mean linearised evil-minus-safe score")
    shares: ScoreShares = Field(description="mean of each share (top_error_pos: not averaged)")
    n_flagged: int = Field(description="prompts whose own shares were flagged")
    flagged_layers: dict[int, int] = Field(
        default_factory=dict, description="layer -> prompts where its error nodes were flagged"
    )


class FeatureAggregate(Record):
    """Features of one variant aggregated over a set of prompts (by default the divergent ones)."""

    experiment: str
    fingerprint: str
    variant: str
    prompt_ids: list[str]
    n_features_total: int = Field(description="distinct (layer, feature) seen before truncation")
    features: list[AggregateFeature] = Field(description="highest mean_score first (top rows)")
    layers: list[LayerShare]
    shares: SharesAggregate | None = Field(
        default=None, description="where the score goes, over the same prompts"
    )


class FeatureChange(_Row):
    """A feature ``(layer, feature)`` in the reference variant vs another variant."""

    layer: int
    feature: int
    reference_activation: float
    variant_activation: float
    reference_score: float | None = Field(description="None: no reference ranking available")
    variant_score: float | None
    n_prompts: int

    @property
    def d_activation(self) -> float:
        """Variant activation minus reference activation."""
        return self.variant_activation - self.reference_activation

    @property
    def d_score(self) -> float | None:
        """Variant score minus reference score; None if either ranking is missing."""
        if self.reference_score is None or self.variant_score is None:
            return None
        return self.variant_score - self.reference_score


class VariantComparison(Record):
    """Reference vs variant on the same prompts: which features changed most.

    Per prompt, a feature's activation and score are summed over positions; absent = 0
    (not a graph node of that variant). Values are means over the prompts compared.
    """

    experiment: str
    fingerprint: str
    reference: str
    variant: str
    prompt_ids: list[str]
    scored_prompt_ids: list[str] = Field(
        description="prompts where both variants have a ranking (score columns use only these)"
    )
    by_activation: list[FeatureChange] = Field(description="largest |activation change| first")
    by_score: list[FeatureChange] = Field(description="largest |score change| first")
    diff: list[NodeChange] = Field(
        default_factory=list,
        description="diff ranking over the scored prompts: mean score per node kind (features "
        "and adapter nodes with positions folded, each layer's error nodes, tokens), largest "
        "|change| first",
    )


class PromptIssue(_Row):
    """A prompt left out of a report for one variant, and why (no evil token, or a failed step)."""

    prompt_id: str
    variant: str
    kind: Literal["nothing_to_explain", "failed"] = Field(
        description="nothing_to_explain: no evil token for this variant (not a fault)"
    )
    reason: str


class ReportIndex(Record):
    """What ``emc analyze report`` wrote: files, counts, and the prompts it could not use."""

    experiment: str
    fingerprint: str
    reference: str
    variants: list[str]
    n_prompts_with_graphs: int
    divergent_prompt_ids: list[str]
    files: list[str]
    issues: list[PromptIssue]
