"""Generator tasks (queue ``generate``): thin shells over :mod:`common.pipeline`."""

from __future__ import annotations

from typing import Any

from common.celery_app import app
from common.pipeline import step_generate, task_step


@app.task(name="emc.generate.batch")
def generate_batch(exp: str, n: int, batch: str | None = None) -> int:
    """Generate up to ``n`` prompts and enqueue their logits; ``batch`` tracks a `emc mine` run."""
    return task_step(exp, None, lambda ctx: step_generate(ctx, n, batch))


@app.task(name="emc.generate.tick")
def tick() -> int:
    """Beat: keep streaming prompts unless the review queue is above its high-water mark."""
    from common.context import get_context

    ctx = get_context()
    n = ctx.exp.generator.batch_size
    return task_step(ctx.exp.name, None, lambda c: step_generate(c, n))


@app.on_after_finalize.connect
def _schedule(sender: Any, **kwargs: Any) -> None:
    """The streaming schedule (only `celery beat` acts on it; `emc up --stream` runs beat)."""
    from common.settings import get_settings

    every = get_settings().generate_every_s
    # ticks expire so they do not pile up while no generate worker runs
    sender.add_periodic_task(every, tick.s(), name="emc.generate.tick", options={"expires": every})
