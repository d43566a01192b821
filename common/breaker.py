"""A circuit breaker per queue whose tasks depend on an external service (the judge queue on
its LLM endpoint): while the service is down the queue is paused, nothing fails, and work
resumes by itself once the service answers.

- A task whose call chain ran out of retries (``LLMUnavailable``) *trips* the breaker of its
  queue (a Redis hash ``emc:breaker:<queue>``: since when, why) and gives its message back
  to the queue; the prompt keeps its status with the reason ``waiting: judge unavailable
  since ...`` (what ``emc status`` shows), never ``failed``.
- Every worker consuming that queue sees the breaker open within a second
  (:class:`QueuePauser`, a thread in the worker's main process) and stops consuming the
  queue: its messages wait in Redis, none is taken and retried in a loop.
- While it is open, one worker at a time *probes* the service every ``breaker_probe_s``
  with one short request (the probe the service's task module registered with
  :func:`register_probe`); the first answer closes the breaker and every worker resumes
  consuming. A queue without a registered probe is resumed after ``breaker_probe_s`` (the
  next task is the probe: if it fails too, the breaker trips again).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

log = logging.getLogger(__name__)

#: what each guarded queue waits for, in status messages
SERVICES: dict[str, str] = {"judge": "judge", "generate": "generator"}

Probe = Callable[[], None]
_PROBES: dict[str, Probe] = {}


def register_probe(queue: str, probe: Probe) -> None:
    """Ask ``probe()`` whether ``queue``'s service answers again (raise if it does not)."""
    _PROBES[queue] = probe


def service_of(queue: str) -> str:
    """The name of the service ``queue`` waits for, in status messages (the queue name if
    unlisted)."""
    return SERVICES.get(queue, queue)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Outage:
    """An open breaker: the queue's service has been unavailable since ``since``."""

    queue: str
    since: datetime
    reason: str
    probes: int = 0
    last_probe: datetime | None = None

    @property
    def waiting(self) -> str:
        """The status reason of a prompt waiting for the service."""
        return (
            f"waiting: {service_of(self.queue)} unavailable since "
            f"{self.since:%Y-%m-%d %H:%M:%S} UTC ({self.reason})"
        )


class Breaker:
    """The breaker of one queue, in Redis (shared by every worker and command)."""

    def __init__(self, client: redis.Redis, queue: str) -> None:
        self.redis = client
        self.queue = queue
        self.key = f"emc:breaker:{queue}"
        self.probe_lock = self.key + ":probe"

    def outage(self) -> Outage | None:
        """The current outage, or None while the breaker is closed."""
        raw = {_text(k): _text(v) for k, v in self.redis.hgetall(self.key).items()}
        if "since" not in raw:
            return None
        last = raw.get("last_probe")
        return Outage(
            queue=self.queue,
            since=datetime.fromtimestamp(float(raw["since"]), UTC),
            reason=raw.get("reason", ""),
            probes=int(raw.get("probes", 0)),
            last_probe=datetime.fromtimestamp(float(last), UTC) if last else None,
        )

    def trip(self, reason: str) -> Outage:
        """Open the breaker (it keeps its first ``since``); returns the outage."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hsetnx(self.key, "since", repr(time.time()))
        pipe.hset(self.key, "reason", reason[:300])
        pipe.execute()
        outage = self.outage()
        assert outage is not None
        return outage

    def close(self) -> bool:
        """Close the breaker; True if it was open."""
        return bool(self.redis.delete(self.key))

    def note_probe(self, error: str) -> None:
        """Count one failed probe and keep its error (first 300 characters) as the outage's
        reason."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hincrby(self.key, "probes", 1)
        pipe.hset(self.key, mapping={"last_probe": repr(time.time()), "reason": error[:300]})
        pipe.execute()

    def may_probe(self, every_s: float) -> bool:
        """Whether this process should probe now (one prober per ``every_s``, any worker)."""
        return bool(self.redis.set(self.probe_lock, "1", nx=True, ex=max(1, round(every_s))))


def outages(client: redis.Redis, queues: Iterable[str]) -> list[Outage]:
    """The open breakers among ``queues`` (what ``emc status`` shows)."""
    found = (Breaker(client, q).outage() for q in queues)
    return [o for o in found if o is not None]


def probe_once(breaker: Breaker, every_s: float) -> bool:
    """Probe the queue's service if it is this process's turn; close the breaker when the
    service answers. Returns True if the breaker was closed."""
    if breaker.outage() is None or not breaker.may_probe(every_s):
        return False
    probe = _PROBES.get(breaker.queue)
    if probe is None:  # no probe: half-open, the next task tries the service
        log.info("queue %s: no probe registered; resuming to try again", breaker.queue)
        return breaker.close()
    try:
        probe()
    except Exception as e:
        breaker.note_probe(f"{type(e).__name__}: {e}")
        log.info("queue %s: %s still unavailable: %s", breaker.queue, service_of(breaker.queue), e)
        return False
    log.warning("queue %s: %s answers again: resuming", breaker.queue, service_of(breaker.queue))
    return breaker.close()


class QueuePauser:
    """A worker-side thread: stops consuming a queue while its breaker is open, probes the
    service, resumes when it answers.

    ``pause(queue)`` / ``resume(queue)`` are called from this thread and must hand the work
    to the worker's event loop (``consumer.call_soon``).
    """

    def __init__(
        self,
        client: redis.Redis,
        queues: Callable[[], Iterable[str]],
        pause: Callable[[str], None],
        resume: Callable[[str], None],
        *,
        probe_every_s: float,
        poll_s: float = 0.5,
    ) -> None:
        self.client = client
        self.queues = queues
        self.pause = pause
        self.resume = resume
        self.probe_every_s = probe_every_s
        self.poll_s = poll_s
        self.paused: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="emc-queue-pauser", daemon=True)

    def start(self) -> None:
        """Start the polling thread (a daemon: it never keeps the worker alive)."""
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end (at once, or after its current round); paused queues stay
        paused."""
        self._stop.set()

    def check(self) -> None:
        """One round: pause queues whose breaker opened, probe, resume closed ones."""
        for queue in set(self.queues()) | self.paused:
            breaker = Breaker(self.client, queue)
            outage = breaker.outage()
            if outage is not None and queue not in self.paused:
                log.warning("pausing queue %s: %s", queue, outage.waiting)
                self.pause(queue)
                self.paused.add(queue)
            if outage is not None:
                probe_once(breaker, self.probe_every_s)
                outage = breaker.outage()
            if outage is None and queue in self.paused:
                log.warning("resuming queue %s", queue)
                self.resume(queue)
                self.paused.discard(queue)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except redis.RedisError as e:
                log.warning("queue pauser: Redis unavailable: %s", e)
            except Exception:
                log.exception("queue pauser: unexpected error")
