"""The one retry policy of emc: exponential backoff with full jitter and a total deadline.

Each kind of fault is retried by exactly one layer, so retries never multiply:

- the LLM client (:mod:`common.llm`) retries HTTP 429/5xx, timeouts and connection errors
  of one call until its attempts or its deadline are spent, then raises ``LLMUnavailable``;
  the pipeline does not retry that again: it trips the queue's circuit breaker
  (:mod:`common.breaker`), which pauses the queue until the endpoint answers;
- the pipeline task (:func:`common.pipeline.task_step`) retries the broker or the store
  being unreachable (:data:`TASK_RETRY`).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """Attempt ``i`` (0-based) waits U(0, min(max, base * 2**i)); at most ``max_retries``
    retries, and none that would start after ``deadline_s`` (None: no deadline)."""

    max_retries: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    deadline_s: float | None = None

    def delay(self, retry: int, rng: random.Random, retry_after: float | None = None) -> float:
        """Seconds to wait before retry ``retry`` (0-based), drawn from ``rng``; never less than the
        server's ``retry_after`` (capped at ``max_delay_s``)."""
        cap = min(self.max_delay_s, self.base_delay_s * (2**retry))
        wait = rng.uniform(0, cap)
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_delay_s))
        return wait

    def start(self, now: float | None = None) -> Deadline:
        """The clock of one call chain (its first attempt starts now)."""
        t0 = time.monotonic() if now is None else now
        return Deadline(t0 + self.deadline_s if self.deadline_s is not None else None)


@dataclass(frozen=True)
class Deadline:
    """When a call chain must have finished (monotonic clock; None: never)."""

    at: float | None

    def remaining(self, now: float | None = None) -> float | None:
        """Seconds left (>= 0), or None without a deadline."""
        if self.at is None:
            return None
        return max(0.0, self.at - (time.monotonic() if now is None else now))

    def allows(self, wait_s: float, now: float | None = None) -> bool:
        """Whether a retry after waiting ``wait_s`` would still start before the deadline."""
        left = self.remaining(now)
        return left is None or wait_s < left

    def cap(self, timeout_s: float, now: float | None = None) -> float:
        """An attempt's timeout, cut to what is left of the deadline."""
        left = self.remaining(now)
        return timeout_s if left is None else max(0.001, min(timeout_s, left))


#: Task-level retries (broker or store unreachable): waits of at most 2, 4, 8, 16 and 32 s
#: (full jitter), so a task gives up about a minute after its first failure at the latest.
#: Celery's autoretry of :class:`common.celery_app.EmcTask` follows the same numbers.
TASK_RETRY = RetryPolicy(max_retries=5, base_delay_s=2.0, max_delay_s=32.0)
