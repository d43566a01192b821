"""Bench-only GPU task, loaded by the benchmark's worker with ``--include bench.worker_tasks``.

It times bare circuit-tracer ``attribute()`` inside the GPU worker process itself, so that
``bench/pipeline_overhead.py`` can compare the pipeline with the same computation in the
same process (same heap, threads and caches) as well as in a plain process.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from common.celery_app import app
from common.experiment import Experiment

#: one graph to attribute: (input ids, variant, logit target ids)
Item = tuple[list[int], str, list[int]]


def bare_attribute(runtime: Any, exp: Experiment, items: list[Item]) -> list[float]:
    """Seconds of ``circuit_tracer.attribute`` per item, the experiment's limits, no emc code
    around it (``runtime`` only supplies the loaded models)."""
    from circuit_tracer import attribute

    lim = exp.attribution
    times = []
    for ids, variant, targets in items:
        t0 = time.perf_counter()
        attribute(
            torch.tensor(ids, dtype=torch.long),
            runtime.variant(variant).model,
            attribution_targets=torch.tensor(targets, dtype=torch.long),
            max_n_logits=lim.max_n_logits,
            desired_logit_prob=lim.desired_logit_prob,
            batch_size=lim.batch_size,
            max_feature_nodes=lim.max_feature_nodes,
            verbose=False,
        )
        times.append(time.perf_counter() - t0)
    return times


@app.task(name="emc.gpu.bench_bare_attribute")
def bench_bare_attribute(items: list[Item], key: str) -> None:
    """Time :func:`bare_attribute` in this worker; the seconds go to ``key`` in the store."""
    from common.context import get_context
    from services.attribution.runtime import get_runtime

    ctx = get_context()
    runtime = get_runtime(ctx.exp, ctx.fingerprint, cache_dir=ctx.settings.cache_dir)
    times = bare_attribute(runtime, ctx.exp, [tuple(i) for i in items])  # type: ignore[misc]
    ctx.store.put_json(key, {"schema_version": 1, "seconds": times})
