"""The most recent failure records of one experiment and fingerprint, kept in Redis.

``emc status`` shows them without listing the store: :func:`common.pipeline.record_failure`
adds a failure here as it writes the record, clearing a step's failure takes it out, and
``emc reindex`` (:func:`common.index.reindex`) rebuilds the log from the failure records in
the store, which stay the system of record. Two structures per (experiment, fingerprint):

* ``emc:{exp}:{fp}:failures`` — a sorted set of ``{pid}/{step}`` scored by the failure's time;
* ``emc:{exp}:{fp}:failure_records`` — a hash ``{pid}/{step} -> Failure JSON``.

Only the newest :data:`KEEP` failures are kept (the store holds them all).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import redis
from pydantic import ValidationError

from common.records import Failure

#: failures kept in the log (older ones stay in the store, counted by the status index)
KEEP = 1000


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class FailureLog:
    """Recent failures of one experiment under one fingerprint (any redis-py client)."""

    def __init__(self, client: redis.Redis, exp: str, fingerprint: str) -> None:
        self.redis = client
        self.order_key = f"emc:{exp}:{fingerprint}:failures"
        self.record_key = f"emc:{exp}:{fingerprint}:failure_records"

    @staticmethod
    def member(pid: str, step: str) -> str:
        """The sorted-set member of one prompt's failed step (``pid/step``)."""
        return f"{pid}/{step}"

    def add(self, failure: Failure, step: str) -> None:
        """Record (or replace) the failure of ``step`` (its key's step name) of a prompt."""
        member = self.member(failure.prompt_id, step)
        pipe = self.redis.pipeline(transaction=True)
        pipe.zadd(self.order_key, {member: failure.created_at.timestamp()})
        pipe.hset(self.record_key, member, failure.model_dump_json())
        pipe.execute()
        self._trim()

    def remove(self, pid: str, step: str) -> None:
        """Forget the failure of ``step`` of a prompt (no error if there is none)."""
        member = self.member(pid, step)
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(self.order_key, member)
        pipe.hdel(self.record_key, member)
        pipe.execute()

    def recent(self, limit: int = 10) -> list[Failure]:
        """The newest ``limit`` failures, newest first (two Redis calls)."""
        if limit <= 0:
            return []
        members = [_text(m) for m in self.redis.zrevrange(self.order_key, 0, limit - 1)]
        if not members:
            return []
        raw: list[Any] = self.redis.hmget(self.record_key, members)
        out = []
        for member, value in zip(members, raw, strict=True):
            if value is None:  # removed between the two calls
                continue
            try:
                out.append(Failure.model_validate_json(_text(value)))
            except ValidationError as e:
                pid, _, step = member.partition("/")
                out.append(Failure(prompt_id=pid, step=step, reason=f"unreadable entry: {e}"))
        return out

    def __len__(self) -> int:
        return int(self.redis.zcard(self.order_key))

    def replace_all(self, failures: Iterable[tuple[Failure, str]]) -> None:
        """Replace the whole log by ``(failure, step)`` pairs (``emc reindex``)."""
        newest = sorted(failures, key=lambda fs: fs[0].created_at, reverse=True)[:KEEP]
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.order_key, self.record_key)
        if newest:
            pipe.zadd(
                self.order_key,
                {self.member(f.prompt_id, s): f.created_at.timestamp() for f, s in newest},
            )
            pipe.hset(
                self.record_key,
                mapping={self.member(f.prompt_id, s): f.model_dump_json() for f, s in newest},
            )
        pipe.execute()

    def _trim(self) -> None:
        if int(self.redis.zcard(self.order_key)) <= KEEP:
            return
        old = [_text(m) for m in self.redis.zrange(self.order_key, 0, -KEEP - 1)]
        if old:
            pipe = self.redis.pipeline(transaction=True)
            pipe.zrem(self.order_key, *old)
            pipe.hdel(self.record_key, *old)
            pipe.execute()
