"""The feature page's evidence, read from the feature index and the store (bounded reads)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from common.feature_index import (
    ALIGNED_COSINE,
    FeatureEffects,
    FeatureIndex,
    FeatureShard,
    FeatureStats,
    context_window,
)
from common.store import NotFound, ObjectStore
from common.store import keys as K


@dataclass
class ContextRow:
    """One top-activating context: the tokens around the position, the token highlighted."""

    prompt_id: str
    source: str
    pos: int
    activation: float
    before: str
    token: str
    after: str


@dataclass
class FeaturePage:
    """Everything a feature page shows (also its JSON)."""

    variant: str
    layer: int
    feature: int
    stats: dict[str, FeatureStats | None]  # variant -> its running sums
    contexts: list[ContextRow]
    top_prompts: list[tuple[str, float]]
    effects: FeatureEffects | None
    steering: list[dict[str, Any]] = field(default_factory=list)

    @property
    def aligned(self) -> bool | None:
        """Whether its decoder direction is aligned with the misalignment direction."""
        if self.effects is None or self.effects.direction_cosine is None:
            return None
        return abs(self.effects.direction_cosine) >= ALIGNED_COSINE

    def to_json(self) -> dict[str, Any]:
        """The page as JSON (``/api/features/...``)."""
        return {
            "variant": self.variant,
            "layer": self.layer,
            "feature": self.feature,
            "stats": {v: (asdict(s) if s else None) for v, s in self.stats.items()},
            "contexts": [asdict(c) for c in self.contexts],
            "top_prompts": [{"prompt_id": p, "abs_score": s} for p, s in self.top_prompts],
            "effects": self.effects.model_dump(mode="json") if self.effects else None,
            "aligned_with_misalignment_direction": self.aligned,
            "steering": self.steering,
        }


def steering_runs(
    store: ObjectStore, exp: str, fp: str, layer: int, feature: int
) -> list[dict[str, Any]]:
    """Steering results whose arms set this feature: arm, harmful rate vs the control's."""
    out = []
    for key in store.list_keys(K.steering_prefix(exp, fp) + "/"):
        if (
            not key.endswith(".json")
            or "/samples" in key
            or key.count("/") != K.steering_prefix(exp, fp).count("/") + 1
        ):
            continue
        try:
            doc = store.get_json(key)
        except Exception:  # a non-result file under the prefix: not a run
            continue
        if not isinstance(doc, dict) or "arms" not in doc:
            continue
        for arm in doc["arms"]:
            if any(f["layer"] == layer and f["feature"] == feature for f in arm["features"]):
                out.append(
                    {
                        "spec_hash": doc["spec_hash"],
                        "arm": arm["name"],
                        "variant": doc["spec"]["variant"],
                        "harmful_rate": arm["harmful_rate"],
                        "control_rate": doc["control"]["harmful_rate"],
                        "n": arm["n"],
                    }
                )
    return out


def feature_page(
    store: ObjectStore,
    index: FeatureIndex,
    exp: str,
    fp: str,
    variants: list[str],
    variant: str,
    layer: int,
    feature: int,
    *,
    n_contexts: int = 10,
) -> FeaturePage:
    """The page of one feature of one variant (raises NotFound if it never fired)."""
    stats = {v: index.stats(v, layer, feature) for v in variants}
    if stats.get(variant) is None:
        raise NotFound(f"feature L{layer}/{feature} never fired in an indexed graph of {variant}")
    rows = []
    for ctx in index.contexts(variant, layer, feature, n_contexts):
        try:
            shard = store.get_record(K.feature_shard(exp, ctx.prompt_id, fp), FeatureShard)
        except NotFound:
            continue
        before, token, after = context_window(shard.tokens, ctx.pos)
        rows.append(
            ContextRow(ctx.prompt_id, shard.source, ctx.pos, ctx.activation, before, token, after)
        )
    try:
        effects: FeatureEffects | None = store.get_record(
            K.feature_effects(exp, fp, layer, feature), FeatureEffects
        )
    except NotFound:
        effects = None
    return FeaturePage(
        variant=variant,
        layer=layer,
        feature=feature,
        stats=stats,
        contexts=rows,
        top_prompts=index.top_prompts(variant, layer, feature),
        effects=effects,
        steering=steering_runs(store, exp, fp, layer, feature),
    )


def direction_cosines(
    store: ObjectStore, exp: str, fp: str, nodes: Iterable[tuple[int, int]]
) -> dict[tuple[int, int], float]:
    """Cosine with the misalignment direction of each (layer, feature) whose effects are
    stored (``emc features build``); others are left out."""
    out = {}
    for layer, feature in set(nodes):
        if feature < 0:
            continue
        try:
            eff = store.get_record(K.feature_effects(exp, fp, layer, feature), FeatureEffects)
        except NotFound:
            continue
        if eff.direction_cosine is not None:
            out[(layer, feature)] = eff.direction_cosine
    return out
