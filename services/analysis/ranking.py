"""Rank the transcoder features of one (prompt, variant) by what they do to evil vs safe tokens.

Direction (chosen and fixed here): the first-order change of the **probability mass moved
from safe to evil**, ``P_evil - P_safe`` with ``P_X = sum_{k in X} p_k``. Since
``dp_k = p_k (dz_k - sum_j p_j dz_j)`` (softmax), a source's effect on ``P_X`` is::

    dP_X[s] = sum_k p_k (1[k in X] - P_X) T[k, s]          (k over the graph's logit nodes)
    score   = dP_evil - dP_safe      (stored as ``evil`` and ``safe``; probability units)

with ``T`` the signed multi-hop influence (:mod:`common.graph.influence`) and ``p`` the
graph's own logit probabilities (full-vocabulary softmax). circuit-tracer's logit nodes are
demeaned logits; tokens that are not logit nodes are taken to move like the mean logit
(their demeaned change is unknown, and counted as 0). Unlabelled and ``unsure`` logit nodes
are in neither group but still take part in the softmax coupling. A positive score: the
feature, at its actual activation, moves probability mass towards the evil tokens.

Why not the log-odds ``log(P_evil / P_safe)`` (each group normalised to weight 1)? It gives
the small safe mass as much weight as the large evil mass, so features that merely push rare
safe tokens down can rank high, and it says nothing about how much probability moves. On one
build of the toy organism ablating the top-10 features of the log-odds ranking removed 79% of
the harmful mass against 86% for this ranking (20 held-out divergent prompts); on a later
build both removed 94%. ``bench/validate_ranking.py`` measures this ranking.

Labels: the current human label of each token when there is one (it wins, ``unsure``
included), the judge's verdict otherwise; ``unsure`` tokens count in neither group. The
ranking is cached per prompt, variant, fingerprint and labels version.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from common.errors import AnalysisError, NothingToExplain
from common.experiment import Experiment
from common.graph.artifact import verified_manifest
from common.graph.model import AttributionGraph
from common.graph.scores import SourceScores as SourceScores
from common.graph.scores import direction_weights as direction_weights
from common.graph.scores import score_sources as score_sources
from common.labels import TokenLabels, resolve_labels
from common.records import FeatureRanking, RankedFeature, RankingDigest
from common.store import CorruptArtifact, NotFound, ObjectStore
from common.store import keys as K
from services.analysis.shares import score_shares

log = logging.getLogger(__name__)

GraphLoader = Callable[[ObjectStore, str, str, str, str], AttributionGraph]


def rank_features(
    graph: AttributionGraph, labels: TokenLabels, scores: SourceScores | None = None
) -> FeatureRanking:
    """The :class:`FeatureRanking` of one graph: every feature node, highest score first.

    ``scores``: :func:`score_sources` of the same graph and labels, if already computed.
    """
    m = graph.manifest
    s = scores or score_sources(graph, labels.labels)
    f = graph.n_features
    feats = graph.features.tolist()
    acts = graph.activations.tolist()
    ranked = [
        RankedFeature(
            layer=int(feats[i][0]),
            pos=int(feats[i][1]),
            feature=int(feats[i][2]),
            token=m.input_tokens[int(feats[i][1])],
            score=float(s.score[i]),
            evil=float(s.evil[i]),
            safe=float(s.safe[i]),
            activation=float(acts[i]),
        )
        for i in range(f)
    ]
    ranked.sort(key=lambda r: (-r.score, r.layer, r.pos, r.feature))
    return FeatureRanking(
        prompt_id=m.prompt_id,
        variant=m.variant,
        fingerprint=m.fingerprint,
        labels_version=labels.version,
        label_source=labels.source,
        evil_token_ids=s.evil_token_ids,
        safe_token_ids=s.safe_token_ids,
        features=ranked,
        shares=score_shares(graph, s.score),
    )


def default_graph_loader() -> GraphLoader:
    """The attribution service's graph reader (imported late: it pulls in safetensors)."""
    from common.graph.artifact import load_graph

    return load_graph


def rank_prompt(
    store: ObjectStore,
    exp: Experiment,
    pid: str,
    variant: str,
    *,
    fingerprint: str | None = None,
    labels: TokenLabels | None = None,
    load_graph: GraphLoader | None = None,
) -> FeatureRanking:
    """Rank (and store at ``keys.features``) the features of one prompt and variant.

    Skips the work when a ranking with the same labels version is already stored.
    ``fingerprint`` defaults to ``exp.fingerprint`` (pass it when known: computing it
    hashes the model files); ``labels`` default to :func:`resolve_labels`.
    """
    fp = fingerprint or exp.fingerprint
    if labels is None:
        labels = resolve_labels(store, exp.name, pid, fp, variant, exp.judge.judge_id)
    key = K.features(exp.name, pid, fp, variant)
    cached = _cached_ranking(store, exp.name, pid, fp, variant, labels.version)
    if cached is not None:
        _ensure_digest(store, exp.name, fp, cached)
        return cached
    graph = (load_graph or default_graph_loader())(store, exp.name, pid, fp, variant)
    if graph.manifest.fingerprint != fp:
        raise AnalysisError(
            f"graph was computed under fingerprint {graph.manifest.fingerprint}, not {fp}",
            prompt_id=pid,
            variant=variant,
        )
    ranking = rank_features(graph, labels).model_copy(
        update={"graph_sha256": graph.manifest.tensors_sha256}
    )
    digest_key = K.features_digest(exp.name, pid, fp, variant)
    # Drop the old digest first: a run stopped between the two writes then leaves no digest
    # (pages read the ranking itself, and the next cache hit writes one), never a stale one.
    store.delete(digest_key)
    store.put_json(key, ranking)
    store.put_json(digest_key, RankingDigest.of(ranking))
    log.info(
        "ranked %d features of %s/%s (%s labels)",
        len(ranking.features),
        pid,
        variant,
        labels.source,
    )
    return ranking


def _ensure_digest(store: ObjectStore, exp: str, fp: str, ranking: FeatureRanking) -> None:
    """(Re)write the ranking's digest unless the stored one describes it (a store from before
    digests, or a run stopped after the ranking's write)."""
    key = K.features_digest(exp, ranking.prompt_id, fp, ranking.variant)
    try:
        if store.get_record(key, RankingDigest).describes(ranking):
            return
    except (NotFound, CorruptArtifact):
        pass
    store.put_json(key, RankingDigest.of(ranking))


def _cached_ranking(
    store: ObjectStore, exp: str, pid: str, fp: str, variant: str, labels_version: str
) -> FeatureRanking | None:
    """The stored ranking if it was made from these labels and from the graph stored now
    (whose tensors still have their size); None if it must be recomputed. A graph that
    became corrupt raises :class:`CorruptArtifact` even when its ranking is cached."""
    try:
        cached = store.get_record(K.features(exp, pid, fp, variant), FeatureRanking)
    except NotFound:
        return None
    except CorruptArtifact as e:
        log.warning("recomputing the ranking of %s/%s: %s", pid, variant, e)
        return None
    if cached.labels_version != labels_version or cached.fingerprint != fp:
        return None
    try:
        manifest = verified_manifest(store, exp, pid, fp, variant, full=False)
    except NotFound:  # no stored graph (the caller loads its own): nothing to compare
        return cached
    if cached.graph_sha256 is not None and cached.graph_sha256 != manifest.tensors_sha256:
        return None  # the graph was recomputed since
    return cached


@dataclass
class PromptRankings:
    """Every variant of one prompt: its ranking, or why there is nothing to explain."""

    rankings: dict[str, FeatureRanking]
    nothing_to_explain: dict[str, str]  # variant -> reason (not a failure)


def rank_variants(
    store: ObjectStore,
    exp: Experiment,
    pid: str,
    *,
    fingerprint: str | None = None,
    variants: list[str] | None = None,
    load_graph: GraphLoader | None = None,
) -> PromptRankings:
    """:func:`rank_prompt` for every variant (reference first). A variant with nothing to
    explain (:class:`NothingToExplain`, e.g. the reference of a divergent prompt) is recorded
    and skipped; any other :class:`AnalysisError` is raised after the other variants ran."""
    fp = fingerprint or exp.fingerprint
    out = PromptRankings({}, {})
    failure: AnalysisError | None = None
    for v in variants or exp.variant_names:
        try:
            out.rankings[v] = rank_prompt(store, exp, pid, v, fingerprint=fp, load_graph=load_graph)
        except NothingToExplain as e:
            out.nothing_to_explain[v] = e.reason
        except AnalysisError as e:
            failure = failure or e
    if failure is not None:
        raise failure
    return out
