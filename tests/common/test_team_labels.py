"""Team review in common: label records v2 (v1 still read), consensus of two reviews, the
overlap share, the few-shot pool of settled prompts only, and claims (real Redis)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis

from common.claims import Claims
from common.context import Context
from common.experiment import Experiment
from common.index import derive_state, reindex
from common.labels import (
    consensus,
    is_overlap,
    label_history,
    labeled_prompts,
    prompt_consensus,
)
from common.records import FunnelDecision, HumanLabel, Label, Status, TokenLabel
from common.settings import Settings, StoreSettings
from common.store import FsStore, SchemaMismatch
from common.store import keys as K
from tests.fixtures.data import (
    DIVERGENT,
    MILD,
    TEXT_DIVERGENT,
    TEXT_MILD,
    Spec,
    seed_prompt,
    token_id,
)


def review(
    pid: str,
    spec: Spec,
    reviewer: str,
    *,
    overlap: bool = True,
    change: dict[str, Label] | None = None,
    role: str = "review",
    resolves: list[str] | None = None,
) -> HumanLabel:
    """A full label agreeing with the judge except on the tokens in ``change``."""
    change = change or {}
    return HumanLabel.model_validate(
        {
            "prompt_id": pid,
            "reviewer": reviewer,
            "labels": [
                TokenLabel(variant=v, token_id=token_id(t), token=t, label=change.get(t, lab))
                for v, rows in spec.items()
                for t, _, lab, _ in rows
            ],
            "overlap": overlap,
            "role": role,
            "resolves": resolves or [],
        }
    )


def test_a_version_1_label_reads_as_a_single_review(store: FsStore, experiment: Experiment) -> None:
    p = seed_prompt(store, experiment, TEXT_DIVERGENT, DIVERGENT)
    v1 = review(p.pid, DIVERGENT, "alice").model_dump(mode="json")
    for field in ("role", "overlap", "resolves", "guideline_version", "elapsed_s"):
        del v1[field]
    v1["schema_version"] = 1
    key = f"{K.labels_history(experiment.name, p.pid)}/20240101T000000000000Z-old.json"
    store.put_bytes(key, json.dumps(v1).encode())
    [(got_key, label)] = label_history(store, experiment.name, p.pid)
    assert got_key == key and label.schema_version == 2
    assert (label.role, label.overlap, label.guideline_version) == ("review", False, None)
    assert label.version() == review(p.pid, DIVERGENT, "alice").version()
    assert prompt_consensus(store, experiment.name, p.pid).state == "single"
    store.put_bytes(key, json.dumps({**v1, "schema_version": 3}).encode())
    with pytest.raises(SchemaMismatch, match="schema_version 3"):
        label_history(store, experiment.name, p.pid)


def test_consensus_of_two_reviews_and_an_adjudication() -> None:
    pid = "0" * 12
    a = ("k1", review(pid, DIVERGENT, "alice"))
    assert consensus([]).state == "unlabeled" and consensus([]).needs_review
    assert consensus([("k0", review(pid, DIVERGENT, "alice", overlap=False))]).state == "single"
    first = consensus([a])
    assert first.state == "awaiting_second" and first.needs_review and not first.settled
    same = ("k2", review(pid, DIVERGENT, "bob"))
    assert consensus([a, same]).state == "agreed"
    # the same reviewer saving twice is still one review
    assert consensus([a, ("k1b", review(pid, DIVERGENT, "alice"))]).state == "awaiting_second"
    other = ("k2", review(pid, DIVERGENT, "bob", change={" just": "safe"}))
    disputed = consensus([a, other])
    assert disputed.state == "disputed" and not disputed.settled and not disputed.needs_review
    assert disputed.reviewers == ["alice", "bob"]
    decision = ("k3", review(pid, DIVERGENT, "carol", role="adjudication", resolves=["k1", "k2"]))
    done = consensus([a, other, decision])
    assert done.state == "adjudicated" and done.settled and done.adjudication == decision
    assert done.reviewers == ["alice", "bob"]  # the adjudicator is not a reviewer
    # a later review reopens the comparison of the last two reviewers
    assert consensus([a, other, decision, ("k4", review(pid, DIVERGENT, "alice"))]).state == (
        "disputed"
    )


def test_the_overlap_share_is_chosen_by_prompt_id() -> None:
    pids = [f"{i:012x}" for i in range(4000)]
    share = sum(is_overlap(p, 0.1) for p in pids) / len(pids)
    assert 0.08 < share < 0.12
    assert not any(is_overlap(p, 0.0) for p in pids) and all(is_overlap(p, 1.0) for p in pids)
    assert [is_overlap(p, 0.1) for p in pids] == [is_overlap(p, 0.1) for p in pids]
    # a larger share keeps every prompt of the smaller one
    assert all(is_overlap(p, 0.3) for p in pids if is_overlap(p, 0.1))


def test_only_settled_prompts_feed_the_few_shot_pool(
    store: FsStore, experiment: Experiment
) -> None:
    name = experiment.name
    d = seed_prompt(store, experiment, TEXT_DIVERGENT, DIVERGENT)
    m = seed_prompt(store, experiment, TEXT_MILD, MILD)
    pool = lambda: sorted(p.id for p, _ in labeled_prompts(store, name))  # noqa: E731
    ka = store.append(K.labels_history(name, d.pid), review(d.pid, DIVERGENT, "alice"))
    store.append(K.labels_history(name, m.pid), review(m.pid, MILD, "alice"))
    assert pool() == []  # both wait for their second review
    store.append(K.labels_history(name, m.pid), review(m.pid, MILD, "bob"))
    kb = store.append(
        K.labels_history(name, d.pid), review(d.pid, DIVERGENT, "bob", change={" just": "safe"})
    )
    assert pool() == [m.pid]  # agreed; the divergent one is disputed
    store.append(
        K.labels_history(name, d.pid),
        review(d.pid, DIVERGENT, "carol", role="adjudication", resolves=[ka, kb]),
    )
    assert pool() == sorted([m.pid, d.pid])
    [label] = [lab for p, lab in labeled_prompts(store, name) if p.id == d.pid]
    assert label.adjudicated and label.reviewer == "carol"
    assert len(label_history(store, name, d.pid)) == 3  # all three kept


def test_claims_lock_expire_and_release(redis_client: redis.Redis) -> None:
    claims = Claims(redis_client, "exp", ttl_s=0.6)
    pid, other = "a" * 12, "b" * 12
    first = claims.take(pid, "alice")
    assert first.held_by("alice") and first.since > 0
    held = claims.take(pid, "bob")  # bob opens it too: alice keeps it
    assert held.reviewer == "alice" and held.since == first.since
    assert 0 < held.expires - time.time() <= 0.6
    assert not claims.release(pid, "bob") and claims.holder(pid) is not None
    time.sleep(0.4)
    assert claims.take(pid, "alice").since == first.since  # renewed, not retaken
    time.sleep(0.4)  # past the first lease, within the renewed one
    assert claims.holder(pid) is not None and claims.holder(pid).reviewer == "alice"  # type: ignore[union-attr]
    assert set(claims.holders([pid, other])) == {pid}
    time.sleep(0.7)  # nobody renewed: it expired on its own
    assert claims.holder(pid) is None
    assert claims.take(pid, "bob").held_by("bob")
    assert claims.release(pid, "bob") and claims.holder(pid) is None


def test_reindex_keeps_an_overlap_prompt_queued_for_its_second_reviewer(
    store: FsStore, experiment: Experiment, redis_client: redis.Redis, tmp_path: Path
) -> None:
    name, fp = experiment.name, experiment.fingerprint
    settings = Settings(home=tmp_path / "home", store=StoreSettings(root=store.root))
    ctx = Context(settings, store, experiment, fp, _redis=redis_client)
    d = seed_prompt(store, experiment, TEXT_DIVERGENT, DIVERGENT)
    store.put_json(
        K.decision(name, d.pid, fp),
        FunnelDecision(
            prompt_id=d.pid,
            fingerprint=fp,
            judge=experiment.judge.judge_id,
            to_review=True,
            divergent=True,
            evil_score=0.6,
            graph_variants=[],
        ),
    )
    assert derive_state(ctx, d.pid).status == Status.in_review
    store.append(K.labels_history(name, d.pid), review(d.pid, DIVERGENT, "alice"))
    state = derive_state(ctx, d.pid)
    assert state.status == Status.in_review and state.awaiting_review
    assert state.reviewed_by == ("alice",)
    assert reindex(ctx) == 1
    assert ctx.queue.entry(d.pid) is not None
    assert ctx.queue.reviewed_by([d.pid]) == {d.pid: {"alice"}}
    store.append(K.labels_history(name, d.pid), review(d.pid, DIVERGENT, "bob"))
    reindex(ctx)
    assert ctx.queue.entry(d.pid) is None and ctx.queue.status(d.pid) == Status.labeled
    assert ctx.queue.reviewed_by([d.pid]) == {}
