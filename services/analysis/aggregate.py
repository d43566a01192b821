"""Across prompts: which ``(layer, feature)`` drive evil tokens, and what the adapter changed.

A feature's key is position-independent: in one prompt its score and activation are summed
over the positions where it is a graph node (the first-order effect of switching the feature
off everywhere), then averaged over prompts. Plain functions over records; no model access.

Everything is a *running* aggregate (:class:`RunningAggregate`, :class:`RunningComparison`):
sums, counts, sign counts and short top lists per ``(layer, feature)``, folded in one prompt
at a time. Memory grows with the number of distinct features, not with prompts x features,
and the state can be stored (:meth:`RunningAggregate.dump`) and extended later with new
prompts (``emc analyze report`` does, :mod:`services.analysis.report`).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from common.diff import NodeChange
from common.graph.model import AttributionGraph
from common.records import FeatureRanking, LayerShares, ScoreShares, node_label
from services.analysis.records import (
    AggregateFeature,
    FeatureAggregate,
    FeatureChange,
    LayerShare,
    SharesAggregate,
    VariantComparison,
)
from services.analysis.shares import error_flag

Key = tuple[int, int]  # (layer, feature id)

#: prompts named per feature (``AggregateFeature.top_prompts``)
TOP_PROMPTS = 3
#: distinct input tokens counted per feature; beyond, the rarest are dropped (the three
#: most frequent, ``AggregateFeature.tokens``, are exact unless a feature fires on more
#: than this many distinct tokens with near-equal counts)
TOKENS_KEPT = 64


@dataclass
class PromptFeatures:
    """One prompt's features of one variant, positions folded: key -> summed values."""

    prompt_id: str
    activations: dict[Key, float]
    scores: dict[Key, float] | None  # None: no ranking for this variant (e.g. no evil logit)
    tokens: dict[Key, list[str]] = field(default_factory=dict)
    shares: ScoreShares | None = None

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
        return cls(r.prompt_id, dict(acts), dict(scores), dict(tokens), r.shares)

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


# ----------------------------------------------------------------------------- features


def _push(best: list[tuple[float, str]], value: float, pid: str) -> None:
    """Keep the TOP_PROMPTS largest ``(value, pid)`` (ties: smaller pid first)."""
    best.append((value, pid))
    best.sort(key=lambda x: (-x[0], x[1]))
    del best[TOP_PROMPTS:]


@dataclass(slots=True)
class _FeatureSums:
    score: float = 0.0
    n: int = 0
    n_pos: int = 0
    n_neg: int = 0
    act: float = 0.0
    hi: list[tuple[float, str]] = field(default_factory=list)  # largest scores
    lo: list[tuple[float, str]] = field(default_factory=list)  # most negative, negated
    tokens: Counter[str] = field(default_factory=Counter)

    def add(self, pid: str, score: float, act: float, tokens: Iterable[str]) -> None:
        self.score += score
        self.n += 1
        self.n_pos += score > 0
        self.n_neg += score < 0
        self.act += act
        _push(self.hi, score, pid)
        _push(self.lo, -score, pid)
        self.tokens.update(tokens)
        if len(self.tokens) > TOKENS_KEPT:
            self.tokens = Counter(dict(self.tokens.most_common(TOKENS_KEPT // 2)))

    def row(self, layer: int, feature: int, n_prompts: int) -> AggregateFeature:
        mean = self.score / n_prompts if n_prompts else 0.0
        positive = mean >= 0
        best = self.hi if positive else self.lo
        return AggregateFeature(
            layer=layer,
            feature=feature,
            mean_score=mean,
            mean_score_present=self.score / self.n,
            n_prompts=self.n,
            frac_prompts=self.n / n_prompts if n_prompts else 0.0,
            sign_consistency=(self.n_pos if positive else self.n_neg) / self.n,
            mean_activation=self.act / self.n,
            tokens=[t for t, _ in self.tokens.most_common(3)],
            top_prompts=[pid for _, pid in best],
        )


class RunningShares:
    """Running means of :class:`ScoreShares` over prompts (each prompt counts once)."""

    def __init__(self) -> None:
        self.n = 0
        self.sums: dict[str, float] = defaultdict(float)
        self.layers: dict[int, dict[str, float]] = {}
        self.n_flagged = 0
        self.flagged_layers: Counter[int] = Counter()

    def add(self, s: ScoreShares | None) -> None:
        """Fold in one ranking's shares (rankings stored before shares existed are skipped)."""
        if s is None:  # a ranking stored before shares existed
            return
        self.n += 1
        for name in ("total", "tokens", "errors", "adapter", "top_feature"):
            self.sums[name] += getattr(s, name)
        for row in s.layers:
            acc = self.layers.setdefault(row.layer, defaultdict(float))
            acc["features"] += row.features
            acc["errors"] += row.errors
            acc["adapter"] += row.adapter
        if s.flag:
            self.n_flagged += 1
            self.flagged_layers[max(s.layers, key=lambda r: abs(r.errors)).layer] += 1

    def result(self) -> SharesAggregate | None:
        """Shares averaged over the prompts folded in, with flagged layers; None before any."""
        if not self.n:
            return None
        n = self.n
        mean = ScoreShares(
            total=self.sums["total"] / n,
            tokens=self.sums["tokens"] / n,
            errors=self.sums["errors"] / n,
            adapter=self.sums["adapter"] / n,
            top_feature=self.sums["top_feature"] / n,
            layers=[
                LayerShares(
                    layer=layer,
                    features=acc["features"] / n,
                    errors=acc["errors"] / n,
                    adapter=acc["adapter"] / n,
                )
                for layer, acc in sorted(self.layers.items())
            ],
        )
        return SharesAggregate(
            n_prompts=n,
            mean_total=mean.total,
            shares=mean.model_copy(update={"flag": error_flag(mean)}),
            n_flagged=self.n_flagged,
            flagged_layers=dict(sorted(self.flagged_layers.items())),
        )

    def dump(self) -> dict[str, Any]:
        """The running state as JSON (stored with the report state)."""
        return {
            "n": self.n,
            "sums": dict(self.sums),
            "layers": {str(k): dict(v) for k, v in self.layers.items()},
            "n_flagged": self.n_flagged,
            "flagged_layers": {str(k): v for k, v in self.flagged_layers.items()},
        }

    @classmethod
    def load(cls, d: dict[str, Any]) -> RunningShares:
        """The running state from :meth:`dump`'s JSON."""
        out = cls()
        out.n = int(d["n"])
        out.sums.update({k: float(v) for k, v in d["sums"].items()})
        for k, v in d["layers"].items():
            out.layers[int(k)] = defaultdict(float, {a: float(b) for a, b in v.items()})
        out.n_flagged = int(d["n_flagged"])
        out.flagged_layers.update({int(k): int(v) for k, v in d["flagged_layers"].items()})
        return out


class RunningAggregate:
    """:func:`aggregate`, one ranking at a time (state: O(distinct features))."""

    def __init__(self) -> None:
        self.prompt_ids: list[str] = []
        self.sums: dict[Key, _FeatureSums] = {}
        self.shares = RunningShares()

    def add(self, ranking: FeatureRanking | PromptFeatures) -> None:
        """Fold in one prompt's ranking of this variant."""
        p = ranking if isinstance(ranking, PromptFeatures) else PromptFeatures.from_ranking(ranking)
        if p.scores is None:
            raise ValueError(f"prompt {p.prompt_id} has no scores: it cannot be aggregated")
        self.prompt_ids.append(p.prompt_id)
        for k, s in p.scores.items():
            acc = self.sums.get(k)
            if acc is None:
                acc = self.sums[k] = _FeatureSums()
            acc.add(p.prompt_id, s, p.activations[k], p.tokens.get(k, ()))
        self.shares.add(p.shares)

    def rows(self) -> list[AggregateFeature]:
        """Every feature seen, highest mean score first."""
        n = len(self.prompt_ids)
        rows = [acc.row(layer, feat, n) for (layer, feat), acc in self.sums.items()]
        rows.sort(key=lambda r: (-r.mean_score, r.layer, r.feature))
        return rows

    def result(
        self, *, experiment: str, fingerprint: str, variant: str, top_n: int = 200
    ) -> FeatureAggregate:
        """The aggregate ranking of the prompts folded in so far (top ``top_n`` features)."""
        rows = self.rows()
        return FeatureAggregate(
            experiment=experiment,
            fingerprint=fingerprint,
            variant=variant,
            prompt_ids=sorted(self.prompt_ids),
            n_features_total=len(rows),
            features=_keep_extremes(rows, top_n),
            layers=layer_shares(rows),
            shares=self.shares.result(),
        )

    def dump(self) -> dict[str, Any]:
        """JSON-ready columnar state (floats round-trip exactly through JSON)."""
        keys = list(self.sums)
        accs = [self.sums[k] for k in keys]
        return {
            "prompt_ids": self.prompt_ids,
            "layer": [k[0] for k in keys],
            "feature": [k[1] for k in keys],
            "score": [a.score for a in accs],
            "n": [a.n for a in accs],
            "n_pos": [a.n_pos for a in accs],
            "n_neg": [a.n_neg for a in accs],
            "act": [a.act for a in accs],
            "hi": [a.hi for a in accs],
            "lo": [a.lo for a in accs],
            "tokens": [dict(a.tokens) for a in accs],
            "shares": self.shares.dump(),
        }

    @classmethod
    def load(cls, d: dict[str, Any]) -> RunningAggregate:
        """The running state from :meth:`dump`'s JSON."""
        out = cls()
        out.prompt_ids = list(d["prompt_ids"])
        cols = zip(
            d["layer"],
            d["feature"],
            d["score"],
            d["n"],
            d["n_pos"],
            d["n_neg"],
            d["act"],
            d["hi"],
            d["lo"],
            d["tokens"],
            strict=True,
        )
        for layer, feat, score, n, n_pos, n_neg, act, hi, lo, tokens in cols:
            out.sums[int(layer), int(feat)] = _FeatureSums(
                float(score),
                int(n),
                int(n_pos),
                int(n_neg),
                float(act),
                [(float(v), str(p)) for v, p in hi],
                [(float(v), str(p)) for v, p in lo],
                Counter({str(t): int(c) for t, c in tokens.items()}),
            )
        out.shares = RunningShares.load(d["shares"])
        return out


def aggregate(
    rankings: Iterable[FeatureRanking],
    *,
    experiment: str,
    fingerprint: str,
    variant: str,
    top_n: int = 200,
) -> FeatureAggregate:
    """Mean score, presence, sign consistency per (layer, feature) over the given rankings."""
    running = RunningAggregate()
    for r in rankings:
        running.add(r)
    return running.result(
        experiment=experiment, fingerprint=fingerprint, variant=variant, top_n=top_n
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


# ----------------------------------------------------------------------------- comparison

#: columns of a feature's running comparison sums
_CMP = ("ref_act", "var_act", "ref_score", "var_score", "n")


def _kind_scores(shares: ScoreShares | None) -> dict[str, float]:
    """Score of each non-feature node kind: ``L{l} errors`` per layer and ``tokens``."""
    if shares is None:
        return {}
    out = {"tokens": shares.tokens * shares.total}
    for row in shares.layers:
        out[f"L{row.layer} errors"] = row.errors * shares.total
    return out


class RunningComparison:
    """:func:`compare`, one (reference, variant) pair of one prompt at a time."""

    def __init__(self) -> None:
        self.prompt_ids: list[str] = []
        self.scored_prompt_ids: list[str] = []
        self.sums: dict[Key, list[float]] = {}  # key -> _CMP
        self.kinds: dict[str, list[float]] = {}  # errors/tokens label -> [ref, var] scores

    def add(self, ref: PromptFeatures, var: PromptFeatures) -> None:
        """Fold in one prompt's reference and variant rankings (same prompt)."""
        if ref.prompt_id != var.prompt_id:
            raise ValueError(
                f"compare pairs must be the same prompt: {ref.prompt_id} vs {var.prompt_id}"
            )
        self.prompt_ids.append(ref.prompt_id)
        scored = ref.scores is not None and var.scores is not None
        if scored:
            self.scored_prompt_ids.append(ref.prompt_id)
        for k in {*ref.activations, *var.activations}:
            acc = self.sums.get(k)
            if acc is None:
                acc = self.sums[k] = [0.0, 0.0, 0.0, 0.0, 0]
            acc[0] += ref.activations.get(k, 0.0)
            acc[1] += var.activations.get(k, 0.0)
            if scored:
                acc[2] += (ref.scores or {}).get(k, 0.0)
                acc[3] += (var.scores or {}).get(k, 0.0)
            acc[4] += 1
        if scored:
            rk, vk = _kind_scores(ref.shares), _kind_scores(var.shares)
            for label in {*rk, *vk}:
                pair = self.kinds.setdefault(label, [0.0, 0.0])
                pair[0] += rk.get(label, 0.0)
                pair[1] += vk.get(label, 0.0)

    def changes(self) -> list[FeatureChange]:
        """Every (layer, feature) of either side (see :func:`feature_changes`)."""
        n = len(self.prompt_ids)
        n_scored = len(self.scored_prompt_ids)
        rows = []
        for k in sorted(self.sums):
            ra, va, rs, vs, present = self.sums[k]
            rows.append(
                FeatureChange(
                    layer=k[0],
                    feature=k[1],
                    reference_activation=ra / n,
                    variant_activation=va / n,
                    reference_score=rs / n_scored if n_scored else None,
                    variant_score=vs / n_scored if n_scored else None,
                    n_prompts=int(present),
                )
            )
        return rows

    def diff(self, changes: Sequence[FeatureChange], top: int = 30) -> list[NodeChange]:
        """The aggregated diff ranking: mean scores over the scored prompts, by node kind."""
        n_scored = len(self.scored_prompt_ids)
        if not n_scored:
            return []
        nodes = [
            NodeChange(
                label=node_label(c.layer, c.feature),
                kind="adapter" if c.feature < 0 else "feature",
                layer=c.layer,
                feature=c.feature,
                reference=c.reference_score or 0.0,
                variant=c.variant_score or 0.0,
            )
            for c in changes
        ]
        for label, (r, v) in self.kinds.items():
            layer = None if label == "tokens" else int(label[1:].split(" ", 1)[0])
            kind = "tokens" if label == "tokens" else "errors"
            nodes.append(
                NodeChange(
                    label=label,
                    kind=kind,
                    layer=layer,
                    reference=r / n_scored,
                    variant=v / n_scored,
                )
            )
        nodes.sort(key=lambda x: (-abs(x.change), x.label))
        return nodes[:top]

    def result(
        self, *, experiment: str, fingerprint: str, reference: str, variant: str, top_n: int = 50
    ) -> VariantComparison:
        """The base-vs-variant comparison and diff ranking of the prompts folded in so far."""
        rows = self.changes()
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
            prompt_ids=sorted(self.prompt_ids),
            scored_prompt_ids=sorted(self.scored_prompt_ids),
            by_activation=by_act,
            by_score=by_score,
            diff=self.diff(rows),
        )

    def dump(self) -> dict[str, Any]:
        """The running state as JSON (stored with the report state)."""
        keys = list(self.sums)
        return {
            "prompt_ids": self.prompt_ids,
            "scored_prompt_ids": self.scored_prompt_ids,
            "layer": [k[0] for k in keys],
            "feature": [k[1] for k in keys],
            **{c: [self.sums[k][i] for k in keys] for i, c in enumerate(_CMP)},
            "kinds": self.kinds,
        }

    @classmethod
    def load(cls, d: dict[str, Any]) -> RunningComparison:
        """The running state from :meth:`dump`'s JSON."""
        out = cls()
        out.prompt_ids = list(d["prompt_ids"])
        out.scored_prompt_ids = list(d["scored_prompt_ids"])
        cols = zip(d["layer"], d["feature"], *(d[c] for c in _CMP), strict=True)
        for layer, feat, ra, va, rs, vs, n in cols:
            out.sums[int(layer), int(feat)] = [float(ra), float(va), float(rs), float(vs), int(n)]
        out.kinds = {str(k): [float(v[0]), float(v[1])] for k, v in d["kinds"].items()}
        return out


def _running_comparison(
    pairs: Sequence[tuple[PromptFeatures, PromptFeatures]],
) -> RunningComparison:
    running = RunningComparison()
    for ref, var in pairs:
        running.add(ref, var)
    return running


def feature_changes(pairs: Sequence[tuple[PromptFeatures, PromptFeatures]]) -> list[FeatureChange]:
    """Every (layer, feature) of either side: mean activation and score, reference vs variant.

    Activation means use every pair (absent = 0); score means only the pairs where both
    sides were ranked (None when there is no such pair).
    """
    return _running_comparison(pairs).changes()


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
    changed most (see :func:`feature_changes`), and the diff ranking by node kind."""
    return _running_comparison(pairs).result(
        experiment=experiment,
        fingerprint=fingerprint,
        reference=reference,
        variant=variant,
        top_n=top_n,
    )
