"""Generator tasks (queue ``generate``): thin shells over :mod:`.steps`."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

from common import tasknames as T
from common.celery_app import app
from common.pipeline import task_step
from services.generator.steps import step_generate

if TYPE_CHECKING:
    from services.generator.core import Generator


@lru_cache(maxsize=1)
def _generator() -> Generator:
    """One generator per worker process: it keeps its order and near-duplicate memory."""
    from common.context import get_context
    from common.examples import StoreExamples
    from services.generator.factory import make_generator

    ctx = get_context()
    return make_generator(ctx.exp, ctx.settings, StoreExamples(ctx.store, ctx.exp))


@app.task(name=T.GENERATE_BATCH, bind=True)
def generate_batch(self: Any, exp: str, n: int, batch: str | None = None) -> int:
    """Generate up to ``n`` prompts and enqueue their logits; ``batch`` tracks a `emc mine` run."""
    return task_step(
        self, exp, None, "generate", lambda ctx: step_generate(ctx, _generator, n, batch)
    )


@app.task(name=T.GENERATE_TICK, bind=True)
def tick(self: Any) -> int:
    """Beat: keep streaming prompts unless the review queue is above its high-water mark."""
    from common.context import get_context

    ctx = get_context()
    n = ctx.exp.generator.batch_size
    return task_step(
        self, ctx.exp.name, None, "generate", lambda c: step_generate(c, _generator, n)
    )


@app.on_after_finalize.connect
def _schedule(sender: Any, **kwargs: Any) -> None:
    """The streaming schedule (only `celery beat` acts on it; `emc up --stream` runs beat)."""
    from common.settings import get_settings

    every = get_settings().generate_every_s
    # ticks expire so they do not pile up while no generate worker runs
    sender.add_periodic_task(every, tick.s(), name=T.GENERATE_TICK, options={"expires": every})


@app.task(name=T.GENERATE_PTS, bind=True)
def pts_step(self: Any, exp: str, answer_id: str) -> int:
    """Answers generator: advance one answer's search (rollouts, or its prompts)."""
    from services.generator.steps import step_pts

    return task_step(self, exp, None, "pts", lambda ctx: step_pts(ctx, answer_id))
