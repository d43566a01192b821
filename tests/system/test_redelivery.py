"""A worker killed mid-task: the task comes back to another worker and completes once.

Real worker processes, a real Redis on loopback, the fs store. The first delivery logs
its start in the store and then sleeps; the test SIGKILLs that worker's whole process
group (nothing is acknowledged), starts a fresh worker, and the message returns once its
visibility timeout has passed (lowered for the test, see ``worker_env``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from common.celery_app import make_app
from common.settings import Settings
from common.store.fs import FsStore
from tests.fixtures.servers import WorkerProcess, wait_until, worker_env

VISIBILITY_S = 3.0


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("queue", "task"),
    [("analysis", "emc.analysis.test_record_once"), ("gpu", "emc.gpu.test_record_once")],
    ids=["prefork", "solo-gpu"],
)
def test_killed_worker_task_is_redelivered_and_completes_once(
    queue: str,
    task: str,
    redis_url: str,
    tmp_path: Path,
    celery_worker_factory: Callable[..., WorkerProcess],
) -> None:
    env = worker_env(redis_url, tmp_path, visibility_timeout_s=VISIBILITY_S)
    store = FsStore(tmp_path / "store")
    producer = make_app(Settings(home=tmp_path, broker_url=redis_url))
    key = f"redeliver/{queue}"

    first = celery_worker_factory([queue], env, name="first")
    sent = producer.send_task(task, [key], {"sleep_s": 120.0, "prompt_id": "p-redeliver"})
    wait_until(lambda: len(store.history(f"{key}/starts")) == 1, 20, "the task to start")
    assert not store.exists(f"{key}/result.json")
    first.kill()  # SIGKILL to the worker and its pool child: the message stays unacked
    killed_at = time.monotonic()
    assert not first.alive()

    second = celery_worker_factory([queue], env, name="second")
    wait_until(
        lambda: store.exists(f"{key}/result.json"),
        VISIBILITY_S + 25,
        f"the redelivered task to complete; second worker log:\n{second.log_tail()}",
    )
    elapsed = time.monotonic() - killed_at

    assert len(store.history(f"{key}/starts")) == 2  # ran twice: killed once, completed once
    results = [k for k in store.list_keys(f"{key}/") if "/starts/" not in k]
    assert results == [f"{key}/result.json"]  # exactly one result
    assert store.get_json(f"{key}/result.json") == {"key": key, "value": 42}
    assert f"[task={sent.id} prompt=p-redeliver] started" in second.log()
    # returned after the visibility timeout, not after kombu's default sweep (minutes)
    assert elapsed < VISIBILITY_S + 20, elapsed


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_healthy_task_longer_than_its_lease_runs_once(
    redis_url: str, tmp_path: Path, celery_worker_factory: Callable[..., WorkerProcess]
) -> None:
    """A task running 4x its visibility timeout, with another worker sweeping all along:
    the running worker renews its lease, so the task is never handed out twice."""
    env = worker_env(redis_url, tmp_path, visibility_timeout_s=VISIBILITY_S)
    store = FsStore(tmp_path / "store")
    producer = make_app(Settings(home=tmp_path, broker_url=redis_url))
    key = "lease/long"

    celery_worker_factory(["analysis"], env, name="runner")
    producer.send_task("emc.analysis.test_record_once", [key], {"sleep_s": 4 * VISIBILITY_S})
    wait_until(lambda: len(store.history(f"{key}/starts")) == 1, 20, "the task to start")
    # a second worker on the same queue sweeps for expired leases every 0.5 s
    celery_worker_factory(["analysis"], env, name="sweeper")
    wait_until(lambda: store.exists(f"{key}/result.json"), 4 * VISIBILITY_S + 20, "the result")
    time.sleep(2 * VISIBILITY_S)  # a wrongly restored copy would start in this time

    assert len(store.history(f"{key}/starts")) == 1
