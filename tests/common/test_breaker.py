"""The circuit breaker of a queue and the worker-side pauser, on a real Redis."""

from __future__ import annotations

import redis

from common.breaker import Breaker, QueuePauser, outages, probe_once, register_probe


def test_trip_keeps_the_first_since_and_says_who_waits(redis_client: redis.Redis) -> None:
    b = Breaker(redis_client, "judge")
    assert b.outage() is None
    first = b.trip("openai-o3 timed out")
    again = b.trip("still timing out")
    assert again.since == first.since and again.reason == "still timing out"
    assert again.waiting.startswith("waiting: judge unavailable since ")
    assert "(still timing out)" in again.waiting
    assert [o.queue for o in outages(redis_client, ["judge", "gpu"])] == ["judge"]
    assert b.close() and b.outage() is None and not b.close()


def test_pauser_pauses_probes_and_resumes(redis_client: redis.Redis) -> None:
    answers = {"up": False}

    def probe() -> None:
        if not answers["up"]:
            raise ConnectionError("refused")

    register_probe("test-q", probe)
    calls: list[tuple[str, str]] = []
    pauser = QueuePauser(
        redis_client,
        lambda: ["test-q"],
        pause=lambda q: calls.append(("pause", q)),
        resume=lambda q: calls.append(("resume", q)),
        probe_every_s=1,
    )
    pauser.check()
    assert calls == []  # closed: nothing to do
    breaker = Breaker(redis_client, "test-q")
    breaker.trip("down")
    pauser.check()
    assert calls == [("pause", "test-q")] and pauser.paused == {"test-q"}
    outage = breaker.outage()
    assert outage is not None and outage.probes == 1 and "refused" in outage.reason
    pauser.check()  # within the probe period: no second probe
    assert breaker.outage() is not None and breaker.outage().probes == 1  # type: ignore[union-attr]
    answers["up"] = True
    redis_client.delete(breaker.probe_lock)  # the probe period is over
    pauser.check()
    assert calls == [("pause", "test-q"), ("resume", "test-q")]
    assert breaker.outage() is None and not pauser.paused


def test_queue_without_a_probe_is_half_opened(redis_client: redis.Redis) -> None:
    breaker = Breaker(redis_client, "no-probe-q")
    breaker.trip("down")
    assert probe_once(breaker, 1) is True
    assert breaker.outage() is None
