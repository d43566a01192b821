"""Judge tasks (queue ``judge``): thin shells over :mod:`common.pipeline`."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

from common.celery_app import app
from common.pipeline import step_judge, task_step

if TYPE_CHECKING:
    from services.judge.core import Judge


@lru_cache(maxsize=1)
def _judge() -> Judge:
    """One judge per worker process; its few-shot pool is read from the store per call."""
    from common.context import get_context
    from services.judge.core import make_judge
    from services.judge.examples import StoreExamples

    ctx = get_context()
    return make_judge(ctx.exp, ctx.settings, StoreExamples(ctx.store, ctx.exp))


@app.task(name="emc.judge.verdicts", bind=True)
def verdicts(self: Any, exp: str, prompt_id: str) -> int:
    """Judge every top-k token of every variant; route the prompt (review, graphs, done)."""
    return task_step(
        self, exp, prompt_id, "judge", lambda ctx: step_judge(ctx, _judge(), prompt_id)
    )
