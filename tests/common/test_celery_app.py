"""The Celery app: configuration, routing, and real workers over a real Redis."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from celery import Celery

from common.celery_app import EmcTask, TransientError, make_app, route_task
from common.settings import Settings
from common.store.fs import FsStore
from common.tasknames import QUEUES
from tests.conftest import REPO
from tests.fixtures.servers import WorkerProcess, clean_env, free_port, wait_until, worker_env


def test_configuration_from_settings(tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path,
        broker_url="redis://127.0.0.1:1/3",
        visibility_timeout_s=123.0,
        unacked_restore_s=0.5,
        unacked_restore_throttle=2,
    )
    conf = make_app(settings).conf
    assert conf.broker_url == "redis://127.0.0.1:1/3"
    assert conf.broker_transport_options == {
        "visibility_timeout": 123.0,
        "unacked_restore_interval": 0.5,
        "unacked_restore_throttle": 2,
        "queue_order_strategy": "priority",
    }
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.task_ignore_result and not conf.result_backend
    assert sorted(q.name for q in conf.task_queues) == sorted(QUEUES)
    # without EMC_BROKER_URL: the embedded Redis on broker_port
    assert make_app(Settings(home=tmp_path, broker_port=7001)).conf.broker_url == (
        "redis://127.0.0.1:7001/0"
    )


@pytest.mark.parametrize("queue", QUEUES)
def test_routes_by_name_prefix(queue: str) -> None:
    assert route_task(f"emc.{queue}.do_something") == {"queue": queue}


@pytest.mark.parametrize("name", ["emc.nowhere.task", "emc.gpu", "mytask", "other.gpu.x"])
def test_unroutable_names_refused(name: str) -> None:
    with pytest.raises(ValueError, match=r"emc\.<queue>\.<name>"):
        route_task(name)


def test_tasks_get_the_emc_base() -> None:
    from tests.fixtures import tasks_for_tests

    task = tasks_for_tests.flaky
    assert isinstance(task, EmcTask)
    assert task.autoretry_for == (TransientError,)
    assert task.acks_late and task.reject_on_worker_lost


def test_worker_without_broker_says_run_emc_up(tmp_path: Path) -> None:
    env = clean_env({"EMC_HOME": str(tmp_path), "EMC_BROKER_PORT": str(free_port())})
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "common.celery_app", "worker", "-Q", "judge"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "emc up" in proc.stderr and "EMC_BROKER_URL" in proc.stderr, proc.stderr


@pytest.fixture
def producer(redis_url: str, tmp_path: Path) -> Celery:
    """The emc app as a producer on the test broker (what services use to enqueue)."""
    return make_app(Settings(home=tmp_path, broker_url=redis_url))


def test_worker_runs_tasks_retries_transient_only_and_logs_ids(
    redis_url: str,
    tmp_path: Path,
    producer: Celery,
    celery_worker_factory: Callable[..., WorkerProcess],
) -> None:
    worker = celery_worker_factory(["judge", "analysis"], worker_env(redis_url, tmp_path))
    store = FsStore(tmp_path / "store")

    done = producer.send_task("emc.analysis.test_record_once", ["t/ok"], {"prompt_id": "p-ok"})
    positional = producer.send_task("emc.analysis.test_record_once", ["t/pos", 0.0, "p-pos"])
    flaky = producer.send_task("emc.judge.test_flaky", ["t/flaky", 2], {"prompt_id": "p-fl"})
    broken = producer.send_task("emc.judge.test_broken", ["t/broken"], {"prompt_id": "p-br"})

    wait_until(lambda: store.exists("t/ok/result.json"), 20, "the task result")
    wait_until(lambda: store.exists("t/pos/result.json"), 20, "the second task result")
    wait_until(lambda: store.exists("t/flaky/done.json"), 30, "the flaky task to succeed")
    wait_until(lambda: f"{broken.id}] raised unexpected" in worker.log(), 20, "broken to fail")

    assert store.get_json("t/ok/result.json") == {"key": "t/ok", "value": 42}
    # TransientError: retried with backoff until it succeeded (2 failures + 1 success)
    assert [store.get_json(k)["retries"] for k in store.history("t/flaky/attempts")] == [0, 1, 2]
    # any other error: not retried
    assert len(store.history("t/broken/attempts")) == 1
    log = worker.log()
    assert f"[task={done.id} prompt=p-ok] started" in log
    assert f"[task={positional.id} prompt=p-pos] started" in log
    assert f"[task={flaky.id} prompt=p-fl] attempt 3" in log
    assert f"emc.judge.test_broken[{broken.id}] retry" not in log
