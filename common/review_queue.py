"""The review queue and the status index of prompts, kept in Redis.

Two structures per experiment ``exp``:

* ``emc:{exp}:review`` — a sorted set of prompt ids waiting for a human label. The score
  puts divergent prompts (the adapted variant has an evil token the reference has not)
  before all others, then orders by the judge's evil score (higher first).
* ``emc:{exp}:reviewed`` — a hash ``pid -> reviewers`` (comma separated) of queued overlap
  prompts that already have one review: their first reviewer does not get them again.
* ``emc:{exp}:status`` — a hash ``pid -> status`` (a :class:`common.records.Status` value),
  with ``emc:{exp}:status_reason`` holding an optional reason (e.g. why a step failed).

Everything here can be rebuilt from the object store, which stays the system of record
(``common.index.reindex`` derives each prompt's state and calls :func:`rebuild`); Redis
only makes "what is next" and "how many" fast.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from common.records import Status

# Divergent prompts get this bonus; evil scores live in [0, 1], so they always sort first.
DIVERGENT_BONUS = 2.0


@dataclass(frozen=True)
class QueueEntry:
    """One prompt waiting for review."""

    pid: str
    divergent: bool
    evil_score: float


def queue_score(divergent: bool, evil_score: float) -> float:
    """Sorted-set score: divergent first, then by evil score (a number in [0, 1])."""
    if math.isnan(evil_score) or not 0.0 <= evil_score <= 1.0:
        raise ValueError(
            f"evil_score must be a number in [0, 1] (e.g. the probability mass of tokens the "
            f"judge calls evil), got {evil_score!r}"
        )
    return (DIVERGENT_BONUS if divergent else 0.0) + evil_score


def _entry(pid: Any, score: float) -> QueueEntry:
    divergent = score >= DIVERGENT_BONUS
    return QueueEntry(
        pid=_text(pid),
        divergent=divergent,
        evil_score=round(score - DIVERGENT_BONUS if divergent else score, 9),
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class ReviewQueue:
    """Review queue + status index of one experiment (works with any redis-py client)."""

    def __init__(self, client: redis.Redis, exp: str) -> None:
        self.redis = client
        self.exp = exp
        self.queue_key = f"emc:{exp}:review"
        self.status_key = f"emc:{exp}:status"
        self.reason_key = f"emc:{exp}:status_reason"
        self.reviewed_key = f"emc:{exp}:reviewed"

    # -- queue ----------------------------------------------------------------------------
    def restore(self, pid: str, state: PromptState) -> None:
        """Set one prompt's status, reason and queue membership to ``state``."""
        score = queue_score(state.divergent, state.evil_score)
        pipe = self.redis.pipeline(transaction=True)
        if state.awaiting_review or state.status == Status.in_review:
            pipe.zadd(self.queue_key, {pid: score})
        else:
            pipe.zrem(self.queue_key, pid)
        if state.reviewed_by and state.awaiting_review:
            pipe.hset(self.reviewed_key, pid, ",".join(state.reviewed_by))
        else:
            pipe.hdel(self.reviewed_key, pid)
        self._status_into(pipe, pid, state.status, state.reason)
        pipe.execute()

    def push(self, pid: str, divergent: bool, evil_score: float) -> None:
        """Put a prompt in the queue (or re-score it) and mark it ``in_review``."""
        score = queue_score(divergent, evil_score)
        pipe = self.redis.pipeline(transaction=True)
        pipe.zadd(self.queue_key, {pid: score})
        pipe.hset(self.status_key, pid, Status.in_review.value)
        pipe.hdel(self.reason_key, pid)
        pipe.execute()

    def remove(self, pid: str, *, status: Status | None = None, reason: str | None = None) -> bool:
        """Take a prompt out of the queue; optionally set its new status in the same step.

        Returns True if it was queued.
        """
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(self.queue_key, pid)
        pipe.hdel(self.reviewed_key, pid)
        if status is not None:
            self._status_into(pipe, pid, status, reason)
        removed = pipe.execute()[0]
        return bool(removed)

    def keep_for_second_review(self, pid: str, reviewers: Iterable[str]) -> None:
        """An overlap prompt got its first review: it stays queued for someone else."""
        self.redis.hset(self.reviewed_key, pid, ",".join(sorted(set(reviewers))))

    def reviewed_by(self, pids: Iterable[str]) -> dict[str, set[str]]:
        """Who already reviewed each of the queued ``pids`` (only those with a review)."""
        pids = list(pids)
        if not pids:
            return {}
        values = self.redis.hmget(self.reviewed_key, pids)
        return {p: set(_text(v).split(",")) for p, v in zip(pids, values, strict=True) if v}

    def list(self, limit: int = 100, offset: int = 0) -> list[QueueEntry]:
        """The first ``limit`` waiting prompts, in review order."""
        if limit <= 0:
            return []
        rows: list[tuple[Any, float]] = self.redis.zrevrange(  # type: ignore[assignment]
            self.queue_key, offset, offset + limit - 1, withscores=True
        )
        return [_entry(pid, float(score)) for pid, score in rows]

    def entry(self, pid: str) -> QueueEntry | None:
        """The queue entry of a prompt, or None if it is not waiting."""
        score = self.redis.zscore(self.queue_key, pid)
        return None if score is None else _entry(pid, float(score))

    def next_pid(self, exclude: str | None = None) -> str | None:
        """The prompt to review next (skipping ``exclude``, e.g. the one just labeled)."""
        for entry in self.list(2):
            if entry.pid != exclude:
                return entry.pid
        return None

    def __len__(self) -> int:
        return int(self.redis.zcard(self.queue_key))

    # -- status index ---------------------------------------------------------------------
    def set_status(self, pid: str, status: Status | str, reason: str | None = None) -> None:
        """Record where a prompt stands (a reason is kept until the next status change)."""
        pipe = self.redis.pipeline(transaction=True)
        self._status_into(pipe, pid, status, reason)
        pipe.execute()

    def _status_into(self, pipe: Any, pid: str, status: Status | str, reason: str | None) -> None:
        value = Status(status).value  # refuses unknown statuses with a ValueError
        pipe.hset(self.status_key, pid, value)
        if reason:
            pipe.hset(self.reason_key, pid, reason)
        else:
            pipe.hdel(self.reason_key, pid)

    def status(self, pid: str) -> Status | None:
        """Where prompt ``pid`` stands, or None if it has no status yet."""
        value = self.redis.hget(self.status_key, pid)
        return None if value is None else Status(_text(value))

    def reason(self, pid: str) -> str | None:
        """Why ``pid`` has its status (e.g. a failure or a wait), or None; cleared at each status
        change."""
        value = self.redis.hget(self.reason_key, pid)
        return None if value is None else _text(value)

    def counts(self) -> dict[str, int]:
        """Number of prompts per status (every status listed, zeros included)."""
        result = {s.value: 0 for s in Status}
        for value in self.redis.hvals(self.status_key):
            name = _text(value)
            result[name] = result.get(name, 0) + 1
        return result

    # -- rebuild --------------------------------------------------------------------------
    def reasons(self) -> dict[str, str]:
        """Every prompt's status reason (prompts without one are absent)."""
        raw: Mapping[Any, Any] = self.redis.hgetall(self.reason_key)
        return {_text(k): _text(v) for k, v in raw.items()}

    def replace_all(
        self,
        statuses: Mapping[str, Status],
        queued: Iterable[QueueEntry],
        reasons: Mapping[str, str] | None = None,
        reviewed: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """Replace the whole queue and status index in one transaction (used by rebuild)."""
        queued = list(queued)
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.queue_key, self.status_key, self.reason_key, self.reviewed_key)
        if reviewed:
            pipe.hset(self.reviewed_key, mapping={p: ",".join(r) for p, r in reviewed.items()})
        if statuses:
            pipe.hset(self.status_key, mapping={p: Status(s).value for p, s in statuses.items()})
        if reasons:
            pipe.hset(self.reason_key, mapping={p: r for p, r in reasons.items()})
        if queued:
            pipe.zadd(
                self.queue_key, {e.pid: queue_score(e.divergent, e.evil_score) for e in queued}
            )
        pipe.execute()


@dataclass(frozen=True)
class PromptState:
    """Where one prompt stands, as derived from the object store by the pipeline."""

    status: Status
    divergent: bool = False
    evil_score: float = 0.0
    #: waiting for a human (the status says how far the automatic work got)
    awaiting_review: bool = False
    #: why it stands there (a failure, a judge answer that was unusable), if anything
    reason: str | None = None
    #: an overlap prompt waiting for its second review: who reviewed it already
    reviewed_by: tuple[str, ...] = ()


def rebuild(queue: ReviewQueue, states: Iterable[tuple[str, PromptState]]) -> int:
    """Rebuild queue and status index from ``(pid, state)`` pairs derived from the store.

    The pipeline owns *how* a prompt's state follows from its artifacts (logits, verdicts,
    labels, graphs); it walks the store and passes the states here. Prompts awaiting
    review (or with status ``in_review``) are queued with their divergence and evil score.
    Returns the number of prompts indexed.
    """
    statuses: dict[str, Status] = {}
    queued: list[QueueEntry] = []
    reasons: dict[str, str] = {}
    reviewed: dict[str, tuple[str, ...]] = {}
    for pid, state in states:
        statuses[pid] = state.status
        if state.reason:
            reasons[pid] = state.reason
        if state.awaiting_review or state.status == Status.in_review:
            queued.append(QueueEntry(pid, state.divergent, state.evil_score))
            if state.reviewed_by:
                reviewed[pid] = state.reviewed_by
    queue.replace_all(statuses, queued, reasons, reviewed)
    return len(statuses)
