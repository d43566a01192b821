"""Ranking features by evil-minus-safe influence: the direction, labels, caching."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.errors import AnalysisError, NothingToExplain
from common.experiment import Experiment, parse_experiment
from common.graph.model import AttributionGraph
from common.labels import TokenLabels, resolve_labels
from common.records import (
    FeatureRanking,
    HumanLabel,
    RankingDigest,
    TokenLabel,
    TokenVerdict,
    Verdict,
)
from common.store import FsStore, ObjectStore
from common.store import keys as K
from services.analysis.ranking import (
    rank_features,
    rank_prompt,
    rank_variants,
    score_sources,
)
from tests.analysis.synthetic import LinearNet, linear_net

FP = "fp-synthetic"


def softmax_net(seed: int = 0, n_logits: int = 4) -> LinearNet:
    """A linear net whose K logits are the whole vocabulary (probabilities = their softmax)."""
    net = linear_net(seed=seed, n_logits=n_logits)
    probs = torch.softmax(net.run(factor=1.0), dim=0).tolist()
    net.graph.manifest = net.graph.manifest.model_copy(update={"logit_probabilities": probs})
    return net


def masses(z: torch.Tensor, evil: list[int], safe: list[int]) -> tuple[float, float]:
    p = torch.softmax(z, dim=0)
    return float(p[evil].sum()), float(p[safe].sum())


def test_score_is_the_derivative_of_evil_minus_safe_mass() -> None:
    """Scaling source s by (1 - eps) moves P_evil by -eps * evil_s and P_safe by -eps * safe_s
    (first order; here the graph's logit nodes are the whole vocabulary)."""
    net = softmax_net(seed=11)
    ids = net.graph.manifest.logit_token_ids
    labels = {ids[0]: "evil", ids[1]: "evil", ids[2]: "safe", ids[3]: "unsure"}
    s = score_sources(net.graph, labels)  # type: ignore[arg-type]
    e0, s0 = masses(net.run(factor=1.0), [0, 1], [2])
    eps = 1e-6
    for src in range(net.graph.token_slice.stop):
        e1, s1 = masses(net.run(off=src, factor=1 - eps), [0, 1], [2])
        assert e1 - e0 == pytest.approx(-eps * float(s.evil[src]), rel=1e-3, abs=1e-11)
        assert s1 - s0 == pytest.approx(-eps * float(s.safe[src]), rel=1e-3, abs=1e-11)
    torch.testing.assert_close(s.score, s.evil - s.safe)
    assert s.evil_token_ids == ids[:2] and s.safe_token_ids == [ids[2]]


def test_ranking_orders_features_and_maps_tokens() -> None:
    net = softmax_net(seed=12)
    ids = net.graph.manifest.logit_token_ids
    labels = TokenLabels.given({ids[0]: "evil", ids[1]: "safe"}, source="judge")
    r = rank_features(net.graph, labels)
    assert len(r.features) == net.graph.n_features
    scores = [f.score for f in r.features]
    assert scores == sorted(scores, reverse=True)
    top = r.features[0]
    i = [tuple(x) for x in net.graph.features.tolist()].index((top.layer, top.pos, top.feature))
    assert top.activation == pytest.approx(float(net.graph.activations[i]))
    assert top.token == net.graph.manifest.input_tokens[top.pos]
    assert top.score == pytest.approx(top.evil - top.safe)
    assert r.label_source == "judge" and r.labels_version == labels.version


def test_no_safe_token_means_evil_part_only() -> None:
    net = softmax_net(seed=13)
    ids = net.graph.manifest.logit_token_ids
    s = score_sources(net.graph, {ids[1]: "evil"})
    assert torch.equal(s.safe, torch.zeros_like(s.safe))
    p = torch.tensor(net.graph.manifest.logit_probabilities, dtype=torch.float64)
    expected = (p * ((torch.arange(len(p)) == 1).double() - p[1])) @ s.influence.total
    torch.testing.assert_close(s.score, expected)


@pytest.mark.parametrize("probs", [[0.9, 0.5, 0.1, 0.0], [float("nan"), 0.1, 0.1, 0.1]])
def test_corrupt_probabilities_are_refused(probs: list[float]) -> None:
    net = softmax_net(seed=14)
    net.graph.manifest = net.graph.manifest.model_copy(update={"logit_probabilities": probs})
    ids = net.graph.manifest.logit_token_ids
    with pytest.raises(AnalysisError, match="not probabilities"):
        score_sources(net.graph, {ids[0]: "evil"})


def test_evil_token_missing_from_graph_is_a_clear_error() -> None:
    net = softmax_net(seed=14)
    with pytest.raises(AnalysisError, match="none of the evil tokens"):
        score_sources(net.graph, {424242: "evil"})


# ------------------------------------------------------------------ labels and the store


def exp() -> Experiment:
    return parse_experiment(
        {"name": "syn", "variants": {"base": {"model": "m"}}, "transcoders": {"path": "t"}},
        base_dir=Path("."),
    )


def put_verdict(store: ObjectStore, pid: str, variant: str, labels: dict[int, str]) -> None:
    v = Verdict(
        prompt_id=pid,
        variant=variant,
        judge="lexicon",
        fingerprint=FP,
        verdicts=[TokenVerdict(token_id=t, token=f"w{t}", label=lab) for t, lab in labels.items()],  # type: ignore[arg-type]
    )
    store.put_json(K.verdicts("syn", pid, FP, "lexicon", variant), v)


def put_human(store: ObjectStore, pid: str, variant: str, labels: dict[int, str]) -> None:
    h = HumanLabel(
        prompt_id=pid,
        reviewer="r",
        labels=[
            TokenLabel(variant=variant, token_id=t, token=f"w{t}", label=lab)  # type: ignore[arg-type]
            for t, lab in labels.items()
        ],
    )
    store.append(K.labels_history("syn", pid), h)


def test_human_labels_win_and_unsure_is_excluded(tmp_path: Path) -> None:
    store = FsStore(tmp_path)
    put_verdict(store, "p1", "adapted", {1: "evil", 2: "safe", 3: "evil"})
    judged = resolve_labels(store, "syn", "p1", FP, "adapted", "lexicon")
    assert judged.source == "judge" and dict(judged.labels) == {1: "evil", 2: "safe", 3: "evil"}
    put_human(store, "p1", "adapted", {3: "unsure", 2: "evil"})
    put_human(store, "p1", "base", {1: "safe"})  # newer label for another variant only...
    mixed = resolve_labels(store, "syn", "p1", FP, "adapted", "lexicon")
    # ...is the current label: it has no adapted tokens, so the judge decides again
    assert mixed.source == "judge"
    put_human(store, "p1", "adapted", {3: "unsure", 2: "evil"})
    mixed = resolve_labels(store, "syn", "p1", FP, "adapted", "lexicon")
    assert dict(mixed.labels) == {1: "evil", 2: "evil"}
    assert mixed.source == "mixed" and mixed.version != judged.version
    with pytest.raises(AnalysisError, match="no labels"):
        resolve_labels(store, "syn", "p2", FP, "adapted", "lexicon")


def test_rank_prompt_is_cached_by_labels_version(tmp_path: Path) -> None:
    store = FsStore(tmp_path)
    net = softmax_net(seed=15)
    ids = net.graph.manifest.logit_token_ids
    pid = net.graph.manifest.prompt_id
    calls: list[str] = []

    def loader(st: ObjectStore, e: str, p: str, fp: str, variant: str) -> AttributionGraph:
        calls.append(p)
        assert (e, p, fp, variant) == ("syn", pid, FP, "adapted")
        return net.graph

    put_verdict(store, pid, "adapted", {ids[0]: "evil", ids[1]: "safe"})
    first = rank_prompt(store, exp(), pid, "adapted", fingerprint=FP, load_graph=loader)
    stored = store.get_record(K.features("syn", pid, FP, "adapted"), FeatureRanking)
    assert stored == first and len(calls) == 1
    again = rank_prompt(store, exp(), pid, "adapted", fingerprint=FP, load_graph=loader)
    assert again == first and len(calls) == 1  # cache hit: the graph was not loaded
    # the digest the analysis page reads is written with the ranking, and a missing or
    # stale one is written again on a cache hit
    digest_key = K.features_digest("syn", pid, FP, "adapted")
    digest = store.get_record(digest_key, RankingDigest)
    assert digest.describes(first) and digest.n_features == len(first.features)
    assert digest.features == first.features[: len(digest.features)]
    store.put_json(digest_key, digest.model_copy(update={"labels_version": "older"}))
    rank_prompt(store, exp(), pid, "adapted", fingerprint=FP, load_graph=loader)
    assert store.get_record(digest_key, RankingDigest).describes(first) and len(calls) == 1
    put_human(store, pid, "adapted", {ids[1]: "evil", ids[2]: "safe"})
    # a run that stops between the new ranking's write and its digest's leaves no digest
    # (pages then read the ranking), never the old labels' digest
    real_put = store.put_json

    def stop_at_digest(key: str, obj: object, **kw: bool) -> None:
        if key == digest_key:
            raise KeyboardInterrupt
        real_put(key, obj, **kw)

    store.put_json = stop_at_digest  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        rank_prompt(store, exp(), pid, "adapted", fingerprint=FP, load_graph=loader)
    store.put_json = real_put  # type: ignore[method-assign]
    assert not store.exists(digest_key) and len(calls) == 2
    relabeled = rank_prompt(store, exp(), pid, "adapted", fingerprint=FP, load_graph=loader)
    assert len(calls) == 2 and relabeled.labels_version != first.labels_version
    assert store.get_record(digest_key, RankingDigest).describes(relabeled)
    assert relabeled.evil_token_ids == [ids[0], ids[1]]
    assert relabeled.label_source == "mixed"


def test_rank_variants_skips_nothing_to_explain_and_raises_real_failures(tmp_path: Path) -> None:
    store = FsStore(tmp_path)
    e = parse_experiment(
        {
            "name": "syn",
            "variants": {"base": {"model": "m"}, "adapted": {"model": "m", "adapter": "a"}},
            "transcoders": {"path": "t"},
        },
        base_dir=Path("."),
    )
    graphs = {v: softmax_net(seed=16).graph for v in ("base", "adapted")}
    for v, g in graphs.items():
        g.manifest = g.manifest.model_copy(update={"variant": v})
    pid = graphs["base"].manifest.prompt_id
    ids = graphs["base"].manifest.logit_token_ids

    def loader(st: ObjectStore, ex: str, p: str, fp: str, variant: str) -> AttributionGraph:
        return graphs[variant]

    put_verdict(store, pid, "adapted", {ids[0]: "evil", ids[1]: "safe"})
    put_verdict(store, pid, "base", {ids[1]: "safe"})
    out = rank_variants(store, e, pid, fingerprint=FP, load_graph=loader)
    assert set(out.rankings) == {"adapted"}
    assert "labelled evil" in out.nothing_to_explain["base"]
    store.delete(K.verdicts("syn", pid, FP, "lexicon", "base"))
    store.delete(K.features("syn", pid, FP, "adapted"))
    with pytest.raises(AnalysisError, match="no labels") as err:
        rank_variants(store, e, pid, fingerprint=FP, load_graph=loader)
    assert not isinstance(err.value, NothingToExplain)
    assert store.exists(K.features("syn", pid, FP, "adapted"))  # the other variant still ran
