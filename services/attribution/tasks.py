"""GPU tasks: thin shells over :mod:`.steps` and the runtime.

Two lanes (:data:`common.tasknames.GPU_QUEUES`): ``gpu_fast`` (top-k, continuations) and
``gpu`` (graphs). A GPU worker runs one task at a time (``-c 1``, prefetch 1) and loads each
variant's model once per process (:func:`services.attribution.runtime.get_runtime`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from common import tasknames as T
from common.celery_app import app
from common.pipeline import task_step

if TYPE_CHECKING:
    from common.context import Context
    from services.attribution.runtime import Runtime


def _runtime(ctx: Context) -> Runtime:
    from services.attribution.runtime import get_runtime

    return get_runtime(ctx.exp, ctx.fingerprint, cache_dir=ctx.settings.cache_dir)


@app.task(name=T.GPU_LOGITS, bind=True)
def logits(self: Any, exp: str, prompt_id: str) -> int:
    """Top-k logits of every variant, then the judge."""
    from services.attribution.steps import step_logits

    return task_step(
        self, exp, prompt_id, "logits", lambda ctx: step_logits(ctx, _runtime(ctx), prompt_id)
    )


@app.task(name=T.GPU_LOGITS_BATCH, bind=True)
def logits_batch(self: Any, exp: str, prompt_ids: list[str]) -> int:
    """Top-k logits of a generated batch in padded forward passes, then the judge for each.
    Per-prompt failures are recorded by the step; an error of the whole batch is retried or
    raised as any task's (its prompts stay ``generated``: ``emc retry`` re-drives them)."""
    from services.attribution.steps import step_logits_batch

    return task_step(
        self,
        exp,
        None,
        "logits",
        lambda ctx: step_logits_batch(ctx, _runtime(ctx), list(prompt_ids)),
    )


@app.task(name=T.GPU_GRAPH, bind=True)
def graph(self: Any, exp: str, prompt_id: str, variant: str) -> int:
    """Attribution graph of one variant; analysis once every variant has one."""
    from services.attribution.steps import step_graph

    return task_step(
        self,
        exp,
        prompt_id,
        f"graph-{variant}",
        lambda ctx: step_graph(ctx, _runtime(ctx), prompt_id, variant),
    )


@app.task(name=T.GPU_CONTINUATIONS)
def sample_continuations(exp: str, prompt_id: str, variant: str, token_id: int, n: int = 3) -> int:
    """A few continuations after a chosen top-k token (the review UI's "what follows?")."""
    from common.context import get_context
    from common.pipeline import load_prompt
    from common.store import keys as K
    from services.attribution.runtime import sample_continuations as sample

    ctx = get_context()
    ctx.check_task(exp)
    prompt = load_prompt(ctx, prompt_id)
    texts = sample(
        _runtime(ctx),
        prompt.text,
        variant,
        token_id,
        n,
        max_new_tokens=24,
        temperature=1.0,
        seed=token_id,
    )
    key = K.samples(exp, prompt_id, ctx.fingerprint, variant, token_id)
    ctx.store.put_json(key, {"schema_version": 1, "continuations": texts})
    return len(texts)


@app.task(name=T.GPU_PTS_ANSWERS, bind=True)
def pts_answers(self: Any, exp: str, job: dict[str, Any]) -> int:
    """Answers generator: every variant's answer to one question slot, then the judge."""
    from common.answers import AnswerJob
    from services.attribution.steps import step_pts_answers

    slot = AnswerJob.model_validate(job)
    return task_step(
        self, exp, None, "pts-answers", lambda ctx: step_pts_answers(ctx, _runtime(ctx), slot)
    )


@app.task(name=T.GPU_PTS_ROLLOUTS, bind=True)
def pts_rollouts(self: Any, exp: str, answer_id: str, prefixes: list[int]) -> int:
    """Answers generator: rollouts from the prefixes a search needs, then the judge."""
    from services.attribution.steps import step_pts_rollouts

    return task_step(
        self,
        exp,
        None,
        "pts-rollouts",
        lambda ctx: step_pts_rollouts(ctx, _runtime(ctx), answer_id, prefixes),
    )
