"""The review queue and status index on a real Redis."""

from __future__ import annotations

import pytest
import redis

from common.records import Status
from common.review_queue import (
    PromptState,
    QueueEntry,
    ReviewQueue,
    rebuild,
)


def test_divergent_first_then_by_evil_score(queue: ReviewQueue) -> None:
    queue.push("a" * 12, divergent=False, evil_score=0.9)
    queue.push("b" * 12, divergent=True, evil_score=0.1)
    queue.push("c" * 12, divergent=True, evil_score=0.7)
    queue.push("d" * 12, divergent=False, evil_score=0.0)
    assert [e.pid for e in queue.list(10)] == ["c" * 12, "b" * 12, "a" * 12, "d" * 12]
    assert queue.list(1) == [QueueEntry("c" * 12, True, 0.7)]
    assert queue.list(2, offset=2)[0] == QueueEntry("a" * 12, False, 0.9)
    assert len(queue) == 4
    assert queue.entry("b" * 12) == QueueEntry("b" * 12, True, 0.1)
    assert queue.entry("z" * 12) is None
    assert queue.next_pid(exclude="c" * 12) == "b" * 12


def test_push_rescores_and_marks_in_review(queue: ReviewQueue) -> None:
    queue.push("p1", divergent=False, evil_score=0.2)
    queue.push("p1", divergent=True, evil_score=0.3)
    assert queue.list() == [QueueEntry("p1", True, 0.3)]
    assert queue.status("p1") == Status.in_review


def test_remove_sets_status_and_counts(queue: ReviewQueue) -> None:
    for pid in ("p1", "p2", "p3"):
        queue.push(pid, divergent=False, evil_score=0.5)
    queue.set_status("p4", Status.failed, reason="NaN in layer 3")
    assert queue.remove("p1", status=Status.labeled) is True
    assert queue.remove("p1", status=Status.labeled) is False  # already out: harmless
    assert [e.pid for e in queue.list()] == ["p3", "p2"]
    counts = queue.counts()
    assert counts["in_review"] == 2 and counts["labeled"] == 1 and counts["failed"] == 1
    assert counts["generated"] == 0 and set(counts) >= {s.value for s in Status}
    assert queue.reason("p4") == "NaN in layer 3"
    queue.set_status("p4", Status.generated)
    assert queue.reason("p4") is None


def test_bad_input_is_refused(queue: ReviewQueue) -> None:
    with pytest.raises(ValueError, match=r"evil_score must be a number in \[0, 1\]"):
        queue.push("p1", divergent=True, evil_score=1.5)
    with pytest.raises(ValueError, match="evil_score"):
        queue.push("p1", divergent=True, evil_score=float("nan"))
    with pytest.raises(ValueError):
        queue.set_status("p1", "halfway")
    assert len(queue) == 0 and queue.status("p1") is None


def test_works_with_a_decoding_client(redis_url: str) -> None:
    q = ReviewQueue(redis.Redis.from_url(redis_url, decode_responses=True), "x")
    q.push("p1", divergent=True, evil_score=0.25)
    assert q.list() == [QueueEntry("p1", True, 0.25)] and q.status("p1") == Status.in_review


def test_experiments_are_separate(redis_client: redis.Redis) -> None:
    a, b = ReviewQueue(redis_client, "a"), ReviewQueue(redis_client, "b")
    a.push("p1", divergent=False, evil_score=0.1)
    assert len(b) == 0 and b.counts()["in_review"] == 0


def test_rebuild_replaces_everything(queue: ReviewQueue) -> None:
    queue.push("stale", divergent=True, evil_score=1.0)
    n = rebuild(
        queue,
        [
            ("p1", PromptState(Status.in_review, divergent=True, evil_score=0.4)),
            ("p2", PromptState(Status.labeled)),
            ("p3", PromptState(Status.in_review, evil_score=0.9)),
            ("p4", PromptState(Status.analyzed, evil_score=0.2, awaiting_review=True)),
        ],
    )
    assert n == 4
    assert [e.pid for e in queue.list()] == ["p1", "p3", "p4"]
    assert queue.status("p4") == Status.analyzed  # waiting for review is the queue's fact
    assert queue.status("stale") is None and queue.status("p2") == Status.labeled
