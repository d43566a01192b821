"""A GPU worker serving both lanes takes fast work before waiting graphs: top-k, continuations
and steering samples wait at most for the graph in progress, never for the queue of graphs.

A real solo-pool worker over a real Redis, consuming ``gpu_fast,gpu`` as ``emc up`` runs it
with ``gpu_lanes: shared``; test tasks log the order in which they start.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from common import tasknames as T
from common.celery_app import make_app
from common.settings import Settings
from common.store.fs import FsStore
from tests.fixtures.servers import WorkerProcess, wait_until, worker_env


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_fast_lane_first_on_a_shared_gpu_worker(
    redis_url: str, tmp_path: Path, celery_worker_factory: Callable[..., WorkerProcess]
) -> None:
    env = worker_env(redis_url, tmp_path, visibility_timeout_s=60)
    store = FsStore(tmp_path / "store")
    producer = make_app(Settings(home=tmp_path, broker_url=redis_url))
    key = "lanes"
    celery_worker_factory(list(T.GPU_QUEUES), env, pool="solo", name="gpu")

    def order() -> list[str]:
        return [store.get_json(k)["label"] for k in store.history(f"{key}/order")]

    producer.send_task("emc.gpu.test_log_order", [key, "graph-0"], {"sleep_s": 3.0})
    wait_until(lambda: order() == ["graph-0"], 30, "the first graph to start")
    for i in range(1, 4):
        producer.send_task("emc.gpu.test_log_order", [key, f"graph-{i}"], {"sleep_s": 0.2})
    for i in (1, 2):
        producer.send_task("emc.gpu_fast.test_log_order", [key, f"topk-{i}"], {})
    wait_until(lambda: len(order()) == 6, 60, "every task to run")
    # round robin between the queues would give graph-0, topk-1, graph-1, topk-2
    assert order()[:3] == ["graph-0", "topk-1", "topk-2"], order()
