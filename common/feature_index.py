"""The feature index: for every feature seen in a stored graph, where it fires across the
mined corpus, built as prompts stream in.

Two layers, as everything in emc: the store holds the truth, Redis an index rebuilt from it.

- **Store**: one shard per prompt (``keys.feature_shard``, :class:`FeatureShard`): the prompt's
  input tokens and, per variant, every feature node's (layer, pos, feature, activation) and
  evil-minus-safe score (from the ranking, None where nothing was ranked). The analysis
  worker writes it after ranking the prompt.
- **Redis**, per (variant, layer, feature): the top contexts by activation (a sorted set of
  ``pid:pos``, trimmed to :data:`TOP_CONTEXTS`), the top prompts by |score|, and running
  sums (prompts, activation, score, positive and negative scores). Indexing a prompt again
  first takes its old shard's contribution out, so re-ranking after new labels never
  counts twice. :func:`rebuild` replays every shard.

A feature page then reads a bounded amount: two sorted sets, one hash and the shards of the
prompts it shows, whatever the corpus size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis
from pydantic import Field

from common.graph.model import AttributionGraph
from common.records import FeatureRanking, Record
from common.store import NotFound, ObjectStore
from common.store import keys as K

TOP_CONTEXTS = 32
"""Contexts kept per feature (the page shows the strongest)."""

TOP_PROMPTS = 20
"""Prompts kept per feature by |score|."""

ALIGNED_COSINE = 0.3
"""|cosine| with the layer's misalignment direction from which a feature counts as aligned
with it (random directions in d_model have |cos| ~ 1/sqrt(d_model))."""


class VariantFeatures(Record):
    """Columns of one variant's feature nodes in one prompt's graph."""

    layer: list[int]
    pos: list[int]
    feature: list[int]
    activation: list[float]
    score: list[float] | None = Field(
        default=None, description="evil-minus-safe score per node; None: not ranked"
    )


class FeatureShard(Record):
    """One prompt's features for the index (``keys.feature_shard``)."""

    prompt_id: str
    text: str
    source: str
    tokens: list[str]
    variants: dict[str, VariantFeatures]


class FeatureEffects(Record):
    """What a feature writes: its decoder direction times the unembedding (demeaned), and
    its cosine with the layer's misalignment direction (``keys.feature_effects``)."""

    layer: int
    feature: int
    boosted: list[tuple[str, float]]
    suppressed: list[tuple[str, float]]
    direction_cosine: float | None = None
    explanation: str | None = Field(
        default=None, description="one line from an LLM, given the evidence (optional)"
    )
    explanation_model: str | None = None
    explanation_prompt: str | None = None


class Direction(Record):
    """Per layer, the mean of adapted minus reference residual stream at the pivotal
    (last) position over divergent prompts (``keys.misalignment_direction``)."""

    experiment: str
    fingerprint: str
    variant: str
    reference: str
    prompt_ids: list[str]
    vectors: list[list[float]]  # [n_layers][d_model]
    norms: list[float]
    ablation: dict[str, Any] = Field(
        default_factory=dict, description="harmful mass removed by ablating it, vs random"
    )


def shard_of(
    pid: str,
    text: str,
    source: str,
    graphs: Mapping[str, AttributionGraph],
    rankings: Mapping[str, FeatureRanking],
) -> FeatureShard:
    """The shard of one prompt from its graphs and (where ranked) its rankings."""
    variants = {}
    tokens: list[str] = []
    for variant, g in graphs.items():
        tokens = list(g.manifest.input_tokens)
        rows = [[int(v) for v in r] for r in g.features.tolist()]
        scores = None
        ranking = rankings.get(variant)
        if ranking is not None:
            by_node = {(f.layer, f.pos, f.feature): f.score for f in ranking.features}
            scores = [float(by_node.get((r[0], r[1], r[2]), 0.0)) for r in rows]
        variants[variant] = VariantFeatures(
            layer=[r[0] for r in rows],
            pos=[r[1] for r in rows],
            feature=[r[2] for r in rows],
            activation=[float(a) for a in g.activations.tolist()],
            score=scores,
        )
    return FeatureShard(prompt_id=pid, text=text, source=source, tokens=tokens, variants=variants)


@dataclass(frozen=True)
class FeatureStats:
    """Running sums of one (variant, layer, feature) over the prompts it fired in."""

    n_prompts: int
    mean_activation: float
    n_ranked: int
    mean_score: float
    sign_consistency: float  # share of ranked prompts whose score has the majority's sign


@dataclass(frozen=True)
class Context:
    """One place a feature fired: the prompt, the position and the activation."""

    prompt_id: str
    pos: int
    activation: float


class FeatureIndex:
    """The Redis side of the index for one experiment and fingerprint."""

    def __init__(self, client: redis.Redis, exp: str, fp: str) -> None:
        self.redis = client
        self.prefix = f"emc:{exp}:{fp}:fx"

    def _key(self, variant: str, layer: int, feature: int, what: str) -> str:
        return f"{self.prefix}:{variant}:{layer}:{feature}:{what}"

    def _apply(self, shard: FeatureShard, sign: int) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pid = shard.prompt_id
        for variant, cols in shard.variants.items():
            per_feature: dict[tuple[int, int], tuple[float, int, float]] = {}
            for i, (layer, pos, feat, act) in enumerate(
                zip(cols.layer, cols.pos, cols.feature, cols.activation, strict=True)
            ):
                key = (layer, feat)
                best, best_pos, score = per_feature.get(key, (-math.inf, pos, 0.0))
                s = cols.score[i] if cols.score is not None else 0.0
                per_feature[key] = (max(best, act), pos if act > best else best_pos, score + s)
                top = self._key(variant, layer, feat, "contexts")
                if sign > 0:
                    pipe.zadd(top, {f"{pid}:{pos}": act})
                else:
                    pipe.zrem(top, f"{pid}:{pos}")
            for (layer, feat), (act, _, score) in per_feature.items():
                stats = self._key(variant, layer, feat, "stats")
                pipe.hincrby(stats, "n", sign)
                pipe.hincrbyfloat(stats, "act", sign * act)
                prompts = self._key(variant, layer, feat, "prompts")
                if cols.score is not None:
                    pipe.hincrby(stats, "ranked", sign)
                    pipe.hincrbyfloat(stats, "score", sign * score)
                    pipe.hincrby(stats, "pos" if score > 0 else "neg", sign if score else 0)
                    if sign > 0:
                        pipe.zadd(prompts, {pid: abs(score)})
                    else:
                        pipe.zrem(prompts, pid)
                if sign > 0:
                    pipe.zremrangebyrank(
                        self._key(variant, layer, feat, "contexts"), 0, -TOP_CONTEXTS - 1
                    )
                    pipe.zremrangebyrank(prompts, 0, -TOP_PROMPTS - 1)
        pipe.execute()

    def add(self, shard: FeatureShard, old: FeatureShard | None = None) -> None:
        """Index a prompt's shard, replacing ``old`` (its previous shard) if given."""
        if old is not None:
            self._apply(old, -1)
        self._apply(shard, +1)

    def clear(self) -> int:
        """Drop the whole Redis side (before a rebuild); returns the keys removed."""
        n = 0
        for key in self.redis.scan_iter(match=f"{self.prefix}:*", count=1000):
            n += int(self.redis.delete(key))
        return n

    def stats(self, variant: str, layer: int, feature: int) -> FeatureStats | None:
        """The running sums of a feature, or None if it never fired in an indexed graph."""
        raw = {
            _s(k): _s(v)
            for k, v in self.redis.hgetall(self._key(variant, layer, feature, "stats")).items()
        }
        n = int(raw.get("n", 0))
        if n <= 0:
            return None
        ranked = int(raw.get("ranked", 0))
        pos, neg = int(raw.get("pos", 0)), int(raw.get("neg", 0))
        return FeatureStats(
            n_prompts=n,
            mean_activation=float(raw.get("act", 0.0)) / n,
            n_ranked=ranked,
            mean_score=float(raw.get("score", 0.0)) / ranked if ranked else 0.0,
            sign_consistency=max(pos, neg) / ranked if ranked else 0.0,
        )

    def contexts(self, variant: str, layer: int, feature: int, n: int = 10) -> list[Context]:
        """The strongest activations of a feature across the corpus, strongest first."""
        rows: list[tuple[Any, float]] = self.redis.zrevrange(  # type: ignore[assignment]
            self._key(variant, layer, feature, "contexts"), 0, n - 1, withscores=True
        )
        out = []
        for member, act in rows:
            pid, _, pos = _s(member).rpartition(":")
            out.append(Context(pid, int(pos), float(act)))
        return out

    def top_prompts(
        self, variant: str, layer: int, feature: int, n: int = 10
    ) -> list[tuple[str, float]]:
        """Prompts where the feature's |score| is largest, with that |score|."""
        rows: list[tuple[Any, float]] = self.redis.zrevrange(  # type: ignore[assignment]
            self._key(variant, layer, feature, "prompts"), 0, n - 1, withscores=True
        )
        return [(_s(m), float(s)) for m, s in rows]

    def features(self, variant: str) -> list[tuple[int, int]]:
        """Every (layer, feature) of ``variant`` in the index (a scan: for batch jobs only)."""
        out = set()
        for key in self.redis.scan_iter(match=f"{self.prefix}:{variant}:*:stats", count=1000):
            parts = _s(key).split(":")
            out.add((int(parts[-3]), int(parts[-2])))
        return sorted(out)


def context_window(
    tokens: list[str], pos: int, before: int = 12, after: int = 3
) -> tuple[str, str, str]:
    """The text before a position, its token, and the text after (what a context shows)."""
    return (
        "".join(tokens[max(0, pos - before) : pos]),
        tokens[pos] if pos < len(tokens) else "",
        "".join(tokens[pos + 1 : pos + 1 + after]),
    )


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def index_prompt(
    store: ObjectStore, index: FeatureIndex, exp: str, fp: str, shard: FeatureShard
) -> None:
    """Store a prompt's shard and index it (its previous shard's contribution taken out)."""
    key = K.feature_shard(exp, shard.prompt_id, fp)
    try:
        old: FeatureShard | None = store.get_record(key, FeatureShard)
    except NotFound:
        old = None
    store.put_json(key, shard)
    index.add(shard, old)


def rebuild(
    store: ObjectStore,
    index: FeatureIndex,
    exp: str,
    fp: str,
    pids: Iterable[str],
    progress: Callable[[Iterable[str]], Iterable[str]] | None = None,
) -> int:
    """Rebuild the Redis side from the stored shards; returns the prompts indexed."""
    index.clear()
    n = 0
    for pid in progress(pids) if progress else pids:
        try:
            shard = store.get_record(K.feature_shard(exp, pid, fp), FeatureShard)
        except NotFound:
            continue
        index.add(shard)
        n += 1
    return n
