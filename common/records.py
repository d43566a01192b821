"""Versioned records: everything emc writes as JSON is one of these pydantic models.

Each record carries ``schema_version``; a reader refuses a version it does not know
instead of guessing. Bump the version when a field changes meaning.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Label = Literal["evil", "safe", "unsure"]
LABELS: tuple[Label, ...] = ("evil", "safe", "unsure")


def prompt_id(text: str) -> str:
    """Stable id of a prompt: 12 hex chars of sha256 of the exact text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC (the default of every record's ``created_at``)."""
    return datetime.now(UTC)


class Record(BaseModel):
    """Base of every stored record."""

    model_config = ConfigDict(extra="forbid")
    schema_version: int = 1


class Prompt(Record):
    """A pivotal-token prompt: chat text ending at the pivotal position."""

    id: str
    text: str
    source: str = Field(description="generator that produced it, e.g. template, openai-o3")
    created_at: datetime = Field(default_factory=utcnow)
    meta: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def new(cls, text: str, source: str, **meta: str) -> Prompt:
        """A prompt whose id is derived from ``text`` (:func:`prompt_id`), with ``meta`` as string
        tags."""
        return cls(id=prompt_id(text), text=text, source=source, meta=meta)


class TokenProb(BaseModel):
    """One of the top-k next tokens: its id, text, softmax probability and raw logit."""

    model_config = ConfigDict(extra="forbid")
    token_id: int
    token: str
    prob: float
    logit: float


class TopKLogits(Record):
    """The k most likely next tokens of one variant at the last position of a prompt.

    Computed by the same replacement model and tokenization (BOS included) as the graphs.
    """

    prompt_id: str
    variant: str
    fingerprint: str
    input_ids: list[int]
    tokens: list[TokenProb]


class TokenVerdict(BaseModel):
    """The judge's label of one top-k token, with its reason."""

    model_config = ConfigDict(extra="forbid")
    token_id: int
    token: str
    label: Label
    reason: str = ""


class Verdict(Record):
    """A judge's labels for the top-k tokens of one variant of one prompt."""

    prompt_id: str
    variant: str
    judge: str
    fingerprint: str
    verdicts: list[TokenVerdict]
    created_at: datetime = Field(default_factory=utcnow)
    unusable: str | None = Field(
        default=None,
        description="why the judge's whole answer could not be used (every token is then "
        "unsure with that reason): counted by `emc status`, re-judged by `emc retry`",
    )

    @property
    def evil_tokens(self) -> set[int]:
        """Ids of the tokens the judge labeled evil."""
        return {v.token_id for v in self.verdicts if v.label == "evil"}


class TokenLabel(BaseModel):
    """A reviewer's label of one top-k token of one variant."""

    model_config = ConfigDict(extra="forbid")
    variant: str
    token_id: int
    token: str
    label: Label


LabelRole = Literal["review", "adjudication"]


class HumanLabel(Record):
    """A reviewer's labels for one prompt, plus prompt flags. Stored with history.

    Version 2 adds the provenance of team review: whether the prompt was one of the share
    sent to two reviewers (``overlap``), whether this entry is an adjudicator's decision
    between two disagreeing reviews (``role``, ``resolves``), the labeling guide it was made
    under (``guideline_version``) and how long the reviewer had the prompt open
    (``elapsed_s``). Version 1 labels read as single reviews with none of these.
    """

    schema_version: int = 2
    READS_VERSIONS: ClassVar[tuple[int, ...]] = (1, 2)

    prompt_id: str
    reviewer: str
    created_at: datetime = Field(default_factory=utcnow)
    labels: list[TokenLabel]
    bad_prompt: bool = False
    note: str = ""
    role: LabelRole = "review"
    overlap: bool = Field(
        default=False, description="the prompt was sent to two reviewers, blind to each other"
    )
    resolves: list[str] = Field(
        default_factory=list, description="adjudication: store keys of the reviews it decides"
    )
    guideline_version: str | None = Field(
        default=None, description="content hash of the labeling guide shown to the reviewer"
    )
    elapsed_s: float | None = Field(
        default=None, ge=0, description="seconds from opening (claiming) the prompt to saving"
    )

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data: Any) -> Any:
        """A version 1 label is a single review made without a guide: read it as v2."""
        if isinstance(data, dict) and data.get("schema_version") == 1:
            data = {**data, "schema_version": 2}
        return data

    @property
    def adjudicated(self) -> bool:
        """Whether this label is an adjudicator's decision."""
        return self.role == "adjudication"

    def label_of(self, variant: str, token_id: int) -> Label | None:
        """The reviewer's label of ``token_id`` in ``variant``, or None if that token was not
        labeled."""
        for t in self.labels:
            if t.variant == variant and t.token_id == token_id:
                return t.label
        return None

    def version(self) -> str:
        """Short content hash: changes whenever any label or flag changes."""
        body = (
            "|".join(sorted(f"{t.variant}:{t.token_id}:{t.label}" for t in self.labels))
            + f"|{self.bad_prompt}"
        )
        return hashlib.sha256(body.encode()).hexdigest()[:12]


class JudgeFewShotSet(Record):
    """Prompts pinned as a judge's next few-shot examples (the judge/human disagreements
    exported from the calibration page); the judge takes them first, then its usual pool."""

    judge: str
    prompt_ids: list[str]
    created_by: str
    created_at: datetime = Field(default_factory=utcnow)
    reason: str = ""


def node_label(layer: int, feature: int) -> str:
    """``L3/F1234`` for a transcoder feature, ``L3/adapter`` for an adapter node (negative
    feature ids; ``L3/adapter1`` for a rank-2 LoRA's second component)."""
    if feature >= 0:
        return f"L{layer}/F{feature}"
    j = -feature - 1
    return f"L{layer}/adapter" + (str(j) if j else "")


def feature_cell(feature: int) -> str:
    """The feature column of a table: the id, or ``adapter`` for an adapter node."""
    return str(feature) if feature >= 0 else node_label(0, feature).split("/", 1)[1]


class FeatureNode(BaseModel):
    """A transcoder feature at a position."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    layer: int
    pos: int
    feature: int


class GraphManifest(Record):
    """JSON half of a stored attribution graph (the tensors live in a safetensors file).

    Node order of the adjacency matrix (rows = targets, columns = sources):
    ``[features n_features][errors n_layers*n_pos, layer-major][tokens n_pos][logits n_logits]``.
    """

    prompt_id: str
    variant: str
    fingerprint: str
    prompt_text: str
    input_ids: list[int]
    input_tokens: list[str]
    n_layers: int
    n_pos: int
    n_features: int
    n_logits: int
    logit_token_ids: list[int]
    logit_tokens: list[str]
    logit_probabilities: list[float]
    adjacency_dtype: str
    tensors: dict[str, list[int]] = Field(
        description="name -> shape of each tensor in the safetensors file"
    )
    limits: dict[str, float | int | str | None]
    scan: str | None = None
    elapsed_s: float = 0.0
    tensors_bytes: int | None = Field(
        default=None, description="size of the safetensors file (checked on every read)"
    )
    tensors_sha256: str | None = Field(
        default=None, description="sha256 of the safetensors file (checked on every load)"
    )


class RankedFeature(BaseModel):
    """One feature of a run's ranking: where it is (layer, position, feature id; negative ids are
    adapter nodes), its score and its influence on the evil and safe tokens."""

    model_config = ConfigDict(extra="forbid")
    layer: int
    pos: int
    feature: int
    token: str = Field(description="input token at pos")
    score: float = Field(description="influence on evil tokens minus safe tokens")
    evil: float
    safe: float
    activation: float

    @property
    def is_adapter(self) -> bool:
        """An adapter node (negative feature id), not a transcoder feature."""
        return self.feature < 0

    @property
    def label(self) -> str:
        """``L3/F1234`` for a feature, ``L3/adapter`` for an adapter node."""
        return node_label(self.layer, self.feature)


class LayerShares(BaseModel):
    """Shares of one layer's node kinds (fractions of :attr:`ScoreShares.total`)."""

    model_config = ConfigDict(extra="forbid")

    layer: int
    features: float = Field(description="switching off every feature of the layer")
    errors: float = Field(description="paths starting at the layer's error nodes")
    adapter: float = Field(default=0.0, description="switching off the layer's adapter nodes")
    top_error_pos: int | None = Field(default=None, description="position of its largest error")


class ScoreShares(BaseModel):
    """The split of one (prompt, variant)'s evil-minus-safe score over node kinds and layers
    (:mod:`services.analysis.shares` defines it)."""

    model_config = ConfigDict(extra="forbid")

    total: float = Field(description="sum of the root nodes' scores (probability units)")
    tokens: float
    errors: float = Field(description="all error nodes together")
    adapter: float = Field(description="all adapter nodes together (0 without an adapter)")
    top_feature: float = Field(description="the largest single feature's share (by magnitude)")
    layers: list[LayerShares]
    flag: str | None = Field(
        default=None, description="set when error nodes carry more than features: which layer"
    )


class RankingHead(Record):
    """What a ranking and its digest both say of what was ranked: prompt, variant, run and
    the labels used."""

    prompt_id: str
    variant: str
    fingerprint: str
    labels_version: str
    label_source: Literal["human", "judge", "mixed"]
    evil_token_ids: list[int]
    safe_token_ids: list[int]


class FeatureRanking(RankingHead):
    """Features of one (prompt, variant) ranked by signed multi-hop attribution."""

    features: list[RankedFeature]
    shares: ScoreShares | None = Field(
        default=None, description="the score's split into features, errors, adapter, tokens"
    )
    created_at: datetime = Field(default_factory=utcnow)
    graph_sha256: str | None = Field(
        default=None, description="the graph's tensors_sha256: a recomputed graph re-ranks"
    )

    @property
    def n_features(self) -> int:
        """Rows of the ranking (as :attr:`RankingDigest.n_features`)."""
        return len(self.features)

    def node_scores(self) -> list[tuple[tuple[int, int, int], float]]:
        """Every ranked node's ``((layer, pos, feature), score)``, in ranking order."""
        return [((f.layer, f.pos, f.feature), f.score) for f in self.features]


#: rows of a ranking a :class:`RankingDigest` keeps in full (the analysis page shows 40)
DIGEST_ROWS = 100


class RankingDigest(RankingHead):
    """What the analysis page shows of a :class:`FeatureRanking`, small enough to load at any
    ranking size: the same identity (labels version, graph, time), the top rows in full, the
    number of rows, the shares, and every node's score as two columns (for the diff ranking).
    Written next to the ranking; a digest whose identity differs from its ranking's is stale."""

    created_at: datetime
    graph_sha256: str | None = None
    n_features: int
    features: list[RankedFeature] = Field(description="the ranking's first rows")
    nodes: list[tuple[int, int, int]] = Field(description="(layer, pos, feature) of every row")
    scores: list[float] = Field(description="the score of every row, as ``nodes``")
    shares: ScoreShares | None = None

    @classmethod
    def of(cls, ranking: FeatureRanking, rows: int = DIGEST_ROWS) -> RankingDigest:
        """The digest of ``ranking``."""
        head = {n: getattr(ranking, n) for n in RankingHead.model_fields if n != "schema_version"}
        return cls(
            **head,
            created_at=ranking.created_at,
            graph_sha256=ranking.graph_sha256,
            n_features=len(ranking.features),
            features=ranking.features[:rows],
            nodes=[(f.layer, f.pos, f.feature) for f in ranking.features],
            scores=[f.score for f in ranking.features],
            shares=ranking.shares,
        )

    def describes(self, ranking: FeatureRanking) -> bool:
        """Whether this is the digest of ``ranking`` (not of an earlier one)."""
        return (
            self.labels_version == ranking.labels_version
            and self.graph_sha256 == ranking.graph_sha256
            and self.created_at == ranking.created_at
            and self.n_features == len(ranking.features)
        )

    def node_scores(self) -> list[tuple[tuple[int, int, int], float]]:
        """Every ranked node's ``((layer, pos, feature), score)``, in ranking order."""
        return list(zip(self.nodes, self.scores, strict=True))


class FunnelDecision(Record):
    """What the judge step decided for a prompt: review, graphs, or nothing more.

    Stored next to the verdicts (``keys.decision``) so the status index can be rebuilt
    from the store without re-running the judge's rules.
    """

    prompt_id: str
    fingerprint: str
    judge: str
    to_review: bool
    divergent: bool
    evil_score: float
    graph_variants: list[str]
    divergent_tokens: dict[str, list[int]] = Field(
        default_factory=dict,
        description="per non-reference variant, the evil token ids the reference lacks as evil",
    )
    reason: str = ""
    judge_unusable: str | None = Field(
        default=None, description="the judge's answer was unusable (all unsure): why"
    )


class Status(StrEnum):
    """Where a prompt stands in the pipeline."""

    generated = "generated"
    logits = "logits"
    judged = "judged"
    in_review = "in_review"
    labeled = "labeled"
    graphed = "graphed"
    analyzed = "analyzed"
    done = "done"  # judged and needs nothing more (no evil token)
    failed = "failed"


class Failure(Record):
    """Why a prompt failed a step: stored next to the prompt, shown by `emc status`.

    ``pipeline_step`` is the pipeline step it failed in (``logits``, ``judge``,
    ``graph-<variant>``, ``analysis``; it names the key) and ``task``/``task_kwargs`` run that
    step again (``emc retry``); ``step`` says where inside it (e.g. ``health``). The record
    is removed when the step succeeds. Records written before these fields existed lack them.
    """

    prompt_id: str
    step: str
    variant: str | None = None
    reason: str
    created_at: datetime = Field(default_factory=utcnow)
    pipeline_step: str | None = None
    task: str | None = None
    task_kwargs: dict[str, Any] = Field(default_factory=dict)

    @property
    def step_name(self) -> str:
        """The pipeline step (for older records: the step they name)."""
        return self.pipeline_step or self.step
