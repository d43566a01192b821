"""The generator's pipeline step (the ``emc.generate.*`` tasks run it)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from common import tasknames as T
from common.batches import close_job, open_request, record_batch
from common.context import Context
from common.pipeline import Next
from common.records import Prompt, Status
from services.generator.core import Generator, generate_batch, should_pause

log = logging.getLogger(__name__)


def step_generate(
    ctx: Context, generator: Callable[[], Generator], n: int, batch: str | None = None
) -> list[Next]:
    """Generate up to ``n`` new prompts (paused by backpressure unless a batch asks).

    ``generator`` returns the process's generator (built on first use). A generator that
    cannot be built or fails (its service down after retries, answers unusable) produces
    no prompts this time; the error is logged and a batch still counts the answer with the
    error, so ``emc mine`` asks again and says why instead of waiting forever.
    """
    if batch is None and should_pause(len(ctx.queue), ctx.exp.generator.high_water_mark):
        log.info("review queue at %d >= high-water mark: not generating", len(ctx.queue))
        return []
    if ctx.exp.generator.kind == "answers":
        return step_schedule_answers(ctx, n, batch)
    prompts: list[Prompt] = []
    error: str | None = None
    try:
        prompts = generate_batch(ctx.store, ctx.exp, generator(), n)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        log.error("generator failed, no prompts this time: %s", error)
        if batch is None:
            raise
    finally:
        for p in prompts:
            ctx.queue.set_status(p.id, Status.generated)
        if batch is not None:
            record_batch(ctx, batch, [p.id for p in prompts], error=error)
    if not prompts:
        return []
    # one task per generated batch: its top-k run in padded forward passes
    return [Next(T.GPU_LOGITS_BATCH, {"exp": ctx.exp.name, "prompt_ids": [p.id for p in prompts]})]


# ----------------------------------------------------------------------------- answers generator


def _slot_counter(ctx: Context) -> str:
    return f"emc:{ctx.exp.name}:pts:{ctx.fingerprint}:next_slot"


def step_schedule_answers(ctx: Context, n: int, batch: str | None) -> list[Next]:
    """Answers generator: claim up to ``n`` answer slots and send them to the gpu queue.

    Its prompts arrive when the searches finish (:func:`step_pts`); a batch counts this
    request's answer when the last of its answers is searched.
    """
    from services.generator.answers import claim_slots

    def claim() -> int:
        return int(ctx.redis.incr(_slot_counter(ctx)))

    jobs = claim_slots(ctx.exp, ctx.fingerprint, ctx.store, claim, n)
    if not jobs:
        if batch is not None:
            record_batch(
                ctx,
                batch,
                [],
                error="every question slot of generator.questions is "
                "answered: raise generator.pts.samples_per_question or add questions",
            )
        return []
    request = None
    if batch is not None:
        request = open_request(ctx, batch, len(jobs) * len(ctx.exp.variant_names))
    log.info("answers generator: %d answer slots to the gpu queue", len(jobs))
    return [
        Next(
            T.GPU_PTS_ANSWERS,
            {
                "exp": ctx.exp.name,
                "job": j.model_copy(update={"batch": batch, "request": request}).model_dump(),
            },
        )
        for j in jobs
    ]


def step_pts(ctx: Context, answer_id: str) -> list[Next]:
    """Advance one answer's pivotal token search: more rollouts, or its prompts (logits next)."""
    from common.store import keys as K
    from common.store.base import dumps
    from services.generator.answers import advance, emit_pivots

    exp, fp = ctx.exp, ctx.fingerprint
    key = K.pts_search(exp.name, fp, answer_id)
    if ctx.store.exists(key):
        return []  # finished before (a repeated message)
    step = advance(ctx.store, exp, fp, answer_id)
    if step.needed:
        return [
            Next(
                T.GPU_PTS_ROLLOUTS,
                {"exp": exp.name, "answer_id": answer_id, "prefixes": step.needed},
            )
        ]
    if step.search is None or step.answer is None:
        return []
    search, prompts = emit_pivots(ctx.store, exp, step.search, step.answer)
    if not ctx.store.put_new(key, dumps(search)):
        return []  # another worker finished it first
    for p in prompts:
        ctx.queue.set_status(p.id, Status.generated)
    answer = step.answer
    if answer.batch is not None and answer.request is not None:
        close_job(ctx, answer.batch, answer.request, [p.id for p in prompts])
    if not prompts:
        return []
    return [Next(T.GPU_LOGITS_BATCH, {"exp": exp.name, "prompt_ids": [p.id for p in prompts]})]
