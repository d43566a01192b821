"""The recent-failures log on a real Redis: kept in step with the store's failure records by
the pipeline, answered without listing the store, rebuilt by ``reindex``."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis

from common import failure_log
from common.context import Context
from common.errors import PromptFailure
from common.experiment import Experiment
from common.failure_log import FailureLog
from common.index import recent_failures, reindex
from common.pipeline import clear_failure, record_failure
from common.records import Failure, Prompt, Status, utcnow
from common.settings import Settings
from common.store import FsStore
from common.store import keys as K


class ListingStore(FsStore):
    """An FsStore that counts its listings (a status query must make none)."""

    listings = 0

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        self.listings += 1
        return super().list_keys(prefix)


@pytest.fixture
def ctx(tmp_path: Path, experiment: Experiment, redis_client: redis.Redis) -> Context:
    return Context(
        settings=Settings(home=tmp_path / "home"),
        store=ListingStore(tmp_path / "store2"),
        exp=experiment,
        fingerprint=experiment.fingerprint,
        _redis=redis_client,
    )


def _failure(pid: str, step: str, minutes: int) -> Failure:
    return Failure(
        prompt_id=pid,
        step=step,
        reason=f"{step} broke",
        created_at=utcnow() - timedelta(minutes=minutes),
        pipeline_step=step,
    )


def test_newest_first_replace_and_remove(redis_client: redis.Redis) -> None:
    log = FailureLog(redis_client, "exp", "fp1")
    log.add(_failure("a" * 12, "judge", 5), "judge")
    log.add(_failure("b" * 12, "logits", 1), "logits")
    log.add(_failure("c" * 12, "graph-base", 3), "graph-base")
    assert [f.prompt_id for f in log.recent(10)] == ["b" * 12, "c" * 12, "a" * 12]
    assert [f.prompt_id for f in log.recent(2)] == ["b" * 12, "c" * 12]
    log.add(_failure("a" * 12, "judge", 0), "judge")  # the same step failing again
    assert [f.prompt_id for f in log.recent(10)] == ["a" * 12, "b" * 12, "c" * 12]
    log.remove("b" * 12, "logits")
    assert [f.prompt_id for f in log.recent(10)] == ["a" * 12, "c" * 12]
    assert FailureLog(redis_client, "exp", "other-fp").recent(10) == []
    log.replace_all([(_failure("d" * 12, "judge", 2), "judge")])
    assert [(f.prompt_id, f.reason) for f in log.recent(10)] == [("d" * 12, "judge broke")]


def test_only_the_newest_are_kept(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(failure_log, "KEEP", 3)
    log = FailureLog(redis_client, "exp", "fp")
    for i in range(6):
        log.add(_failure(f"{i:012d}", "judge", 10 - i), "judge")
    assert len(log) == 3
    assert [f.prompt_id for f in log.recent(10)] == [f"{i:012d}" for i in (5, 4, 3)]
    assert int(redis_client.hlen(log.record_key)) == 3


def test_pipeline_keeps_log_and_store_in_step(ctx: Context) -> None:
    store = ctx.store
    assert isinstance(store, ListingStore)
    pids = []
    for i in range(4):
        p = Prompt.new(f"prompt {i}", source="test")
        store.put_json(K.prompt(ctx.exp.name, p.id), p)
        pids.append(p.id)
    record_failure(ctx, PromptFailure("judge", "the judge said nothing"), pids[0])
    record_failure(
        ctx, PromptFailure("attribution", "NaN at layer 2"), pids[1], step_name="graph-base"
    )
    before = store.listings
    recent = recent_failures(ctx, 10)
    assert store.listings == before  # no listing of the store
    assert [(f.prompt_id, f.step_name) for f in recent] == [
        (pids[1], "graph-base"),
        (pids[0], "judge"),
    ]
    assert recent[0].reason == "NaN at layer 2"
    assert clear_failure(ctx, pids[1], "graph-base") is True
    assert [f.prompt_id for f in recent_failures(ctx, 10)] == [pids[0]]
    # the log is lost (a new Redis): reindex rebuilds it, with the status index, from the store
    ctx.redis.flushdb()
    assert recent_failures(ctx, 10) == []
    assert reindex(ctx) == 4
    assert [(f.prompt_id, f.step_name) for f in recent_failures(ctx, 10)] == [(pids[0], "judge")]
    assert ctx.queue.status(pids[0]) == Status.failed
