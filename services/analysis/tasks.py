"""Analysis tasks (queue ``analysis``): thin shells over :mod:`.steps`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from common import tasknames as T
from common.celery_app import app
from common.pipeline import Next, task_step

if TYPE_CHECKING:
    from common.context import Context


@app.task(name=T.ANALYSIS_RANK, bind=True)
def rank_prompt(self: Any, exp: str, prompt_id: str) -> int:
    """Rank the features of every variant of a prompt (cached by labels version)."""
    from services.analysis.steps import step_rank

    return task_step(self, exp, prompt_id, "analysis", lambda ctx: step_rank(ctx, prompt_id))


@app.task(name=T.GPU_STEER, bind=True)
def steer(self: Any, exp: str, spec: dict[str, Any]) -> int:
    """A steering run's sampling (gpu queue, through attribution's runtime); judged next on
    the judge queue, so the GPU slot never waits on a judge model."""
    from services.analysis.steps import step_steering_samples
    from services.attribution.runtime import get_runtime

    def step(ctx: Context) -> list[Next]:
        runtime = get_runtime(ctx.exp, ctx.fingerprint, cache_dir=ctx.settings.cache_dir)
        return step_steering_samples(ctx, runtime, spec)

    return task_step(self, exp, None, "steer", step)


@app.task(name=T.ANALYSIS_STEERING, bind=True)
def steering_result(self: Any, exp: str, spec_hash: str) -> int:
    """A judged steering run's result and plot."""
    from services.analysis.steps import step_steering_result

    return task_step(self, exp, None, "steering", lambda ctx: step_steering_result(ctx, spec_hash))
