"""The generator's pipeline step (the ``emc.generate.*`` tasks run it)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from common import tasknames as T
from common.batches import record_batch
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
