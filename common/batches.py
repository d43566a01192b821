"""Batches of `emc mine`: which prompts a batch produced, followed in the status index."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable

from common.context import Context
from common.records import Status

#: a batch's Redis keys expire after a week
BATCH_TTL_S = 7 * 86400


def batch_key(ctx: Context, batch: str) -> str:
    """Redis list of the prompt ids a batch produced (``+ ":answers"``: generator answers)."""
    return f"emc:{ctx.exp.name}:batch:{batch}"


def new_batch_id() -> str:
    """A fresh batch id: 12 random hex characters."""
    return uuid.uuid4().hex[:12]


def record_batch(ctx: Context, batch: str, pids: list[str], *, error: str | None = None) -> None:
    """Count one generator answer for ``batch`` and add the prompts it produced (``error``:
    why the generator produced none, kept for `emc mine` to show)."""
    key = batch_key(ctx, batch)
    pipe = ctx.redis.pipeline()
    if pids:
        pipe.rpush(key, *pids)
    if error:
        pipe.set(key + ":error", error[:500], ex=BATCH_TTL_S)
    pipe.incr(key + ":answers")
    pipe.expire(key, BATCH_TTL_S)
    pipe.expire(key + ":answers", BATCH_TTL_S)
    pipe.execute()


def open_request(ctx: Context, batch: str, jobs: int) -> str:
    """A generate request whose prompts arrive later from ``jobs`` chains (the answers
    generator): the batch counts its answer when the last job closes (:func:`close_job`)."""
    request = new_batch_id()
    ctx.redis.set(f"{batch_key(ctx, batch)}:request:{request}", jobs, ex=BATCH_TTL_S)
    return request


def close_job(ctx: Context, batch: str, request: str, pids: list[str]) -> None:
    """One job of a request is done with these prompts; the last one counts the answer."""
    key = batch_key(ctx, batch)
    if pids:
        ctx.redis.rpush(key, *pids)
        ctx.redis.expire(key, BATCH_TTL_S)
    if int(ctx.redis.decr(f"{key}:request:{request}")) == 0:
        record_batch(ctx, batch, [])


def batch_pids(ctx: Context, batch: str) -> tuple[list[str], int]:
    """(prompt ids generated so far for a batch, number of generator answers received)."""
    pids = ctx.redis.lrange(batch_key(ctx, batch), 0, -1)
    answers = int(ctx.redis.get(batch_key(ctx, batch) + ":answers") or 0)
    return [str(p) for p in pids], answers


def batch_error(ctx: Context, batch: str) -> str | None:
    """The last generator error of a batch, if any."""
    value = ctx.redis.get(batch_key(ctx, batch) + ":error")
    return None if value is None else str(value)


def statuses(ctx: Context, pids: Iterable[str]) -> dict[str, Status | None]:
    """The current status of each prompt in ``pids`` (None for one with no status yet)."""
    return {pid: ctx.queue.status(pid) for pid in pids}


def wait_final(
    ctx: Context,
    pids: list[str],
    *,
    timeout_s: float,
    on_progress: Callable[[int, dict[str, Status | None]], None] | None = None,
    poll_s: float = 0.5,
) -> dict[str, Status | None]:
    """Poll the status index until every prompt is final (done/analyzed/failed) or time is up."""
    from common.pipeline import FINAL

    deadline = time.monotonic() + timeout_s
    while True:
        now = statuses(ctx, pids)
        final = sum(1 for s in now.values() if s in FINAL)
        if on_progress is not None:
            on_progress(final, now)
        if final == len(pids) or time.monotonic() > deadline:
            return now
        time.sleep(poll_s)
