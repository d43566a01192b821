"""Test-only tasks, loaded by test workers with ``--include tests.infra.tasks_for_tests``.

They use the real app, routing and store, so the tests exercise what production tasks get.
"""

from __future__ import annotations

import time

from common.celery_app import EmcTask, TransientError, app
from common.store import open_store


def _record_once(task: EmcTask, key: str, sleep_s: float) -> str:
    """Log a start under ``<key>/starts``, sleep on the first start only, write one result.

    The result goes through ``put_if_same``: a re-run writes nothing new, so the result
    exists exactly once however often the task is delivered.
    """
    store = open_store()
    store.append(f"{key}/starts", {"task_id": task.request.id})
    task.log.info("started")
    if len(store.history(f"{key}/starts")) == 1:
        time.sleep(sleep_s)
    store.put_if_same(f"{key}/result.json", {"key": key, "value": 42})
    return key


@app.task(name="emc.analysis.test_record_once", bind=True)
def record_once(self: EmcTask, key: str, sleep_s: float = 0.0, prompt_id: str = "-") -> str:
    """:func:`_record_once` on the analysis queue (a prefork worker)."""
    return _record_once(self, key, sleep_s)


@app.task(name="emc.gpu.test_record_once", bind=True)
def record_once_gpu(self: EmcTask, key: str, sleep_s: float = 0.0, prompt_id: str = "-") -> str:
    """:func:`_record_once` on the gpu queue (a solo-pool worker)."""
    return _record_once(self, key, sleep_s)


@app.task(name="emc.judge.test_flaky", retry_backoff=1)
def flaky(key: str, fail_times: int, prompt_id: str = "-") -> int:
    """Raise :class:`TransientError` ``fail_times`` times, then succeed (tests retries)."""
    store = open_store()
    store.append(f"{key}/attempts", {"retries": flaky.request.retries})
    attempts = len(store.history(f"{key}/attempts"))
    flaky.log.info("attempt %d", attempts)
    if attempts <= fail_times:
        raise TransientError(f"transient failure {attempts}")
    store.put_new(f"{key}/done.json", b'{"ok": true}')
    return attempts


@app.task(name="emc.judge.test_broken")
def broken(key: str, prompt_id: str = "-") -> None:
    """Fail with a non-transient error: must not be retried."""
    open_store().append(f"{key}/attempts", {"retries": broken.request.retries})
    raise ValueError("a bug, not a transient fault")
