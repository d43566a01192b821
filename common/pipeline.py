"""The runner of the pipeline: what every step shares, none of the steps themselves.

Each service owns its steps (``services/<service>/steps.py``): a step is a plain function
of the process :class:`~common.context.Context` that does its work, updates the status
index and returns the :class:`Next` steps to enqueue. Celery tasks are thin shells that run
a step through :func:`task_step` (check the experiment, run, store a failure with its
reason, retry transient faults, send what follows). The flow, as the steps chain::

    generated -> logits (gpu) -> judged -> [evil in a non-reference variant?] -> review queue
    and graph requests (gpu, every variant) -> analysis once the graphs exist (re-run when
    labels change)

The status index records how far the automatic work on a prompt got; waiting for a human
is a separate fact, kept in the review queue. Every step is idempotent: artifacts already
stored for this prompt and fingerprint are reused, never recomputed into different content.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from common.breaker import Outage
from common.context import Context
from common.errors import PromptFailure, UserError
from common.records import Prompt, Status, TopKLogits, Verdict
from common.store import NotFound
from common.store import keys as K

log = logging.getLogger(__name__)

#: states after which a prompt needs no more automatic work
FINAL = frozenset({Status.done, Status.analyzed, Status.failed})


@dataclass(frozen=True)
class Next:
    """A step to enqueue: a task name (``emc.<queue>.<name>``) and its keyword arguments."""

    task: str
    kwargs: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- loading


def load_prompt(ctx: Context, pid: str) -> Prompt:
    """The stored prompt, or a :class:`PromptFailure` naming the store."""
    try:
        return ctx.store.get_record(K.prompt(ctx.exp.name, pid), Prompt)
    except NotFound:
        raise PromptFailure(
            "load", f"prompt {pid} is not in the store {ctx.store.describe()}", prompt_id=pid
        ) from None


def load_logits(ctx: Context, pid: str) -> dict[str, TopKLogits]:
    """Top-k logits of every variant (raises NotFound if one is missing)."""
    out = {}
    for variant in ctx.exp.variant_names:
        key = K.logits(ctx.exp.name, pid, ctx.fingerprint, variant)
        out[variant] = ctx.store.get_record(key, TopKLogits)
    return out


def load_verdicts(ctx: Context, pid: str, judge: str) -> dict[str, Verdict]:
    """Verdicts of ``judge`` for every variant (raises NotFound if one is missing)."""
    out = {}
    for variant in ctx.exp.variant_names:
        key = K.verdicts(ctx.exp.name, pid, ctx.fingerprint, judge, variant)
        out[variant] = ctx.store.get_record(key, Verdict)
    return out


# ----------------------------------------------------------------------------- running


def record_failure(
    ctx: Context,
    failure: PromptFailure,
    pid: str,
    *,
    step_name: str | None = None,
    retry: Next | None = None,
) -> None:
    """Store why the prompt failed (next to it, under its pipeline step) and mark it failed
    in the status index; ``retry`` is the task that runs the step again (``emc retry``)."""
    step = step_name or failure.step
    record = failure.to_record(pid).model_copy(
        update={
            "pipeline_step": step,
            "task": retry.task if retry else None,
            "task_kwargs": dict(retry.kwargs) if retry else {},
        }
    )
    ctx.store.put_json(K.failure(ctx.exp.name, pid, ctx.fingerprint, step), record)
    ctx.queue.set_status(pid, Status.failed, reason=f"{step}: {failure.reason}")
    ctx.failures.add(record, step)
    log.warning("prompt %s failed %s: %s", pid, step, failure.reason)


def clear_failure(ctx: Context, pid: str, step_name: str) -> bool:
    """Remove the failure record of a step that has now succeeded (True if there was one),
    so ``emc reindex`` no longer counts the prompt failed for it."""
    key = K.failure(ctx.exp.name, pid, ctx.fingerprint, step_name)
    if not ctx.store.exists(key):
        return False
    drop_failure(ctx, pid, step_name)
    return True


def drop_failure(ctx: Context, pid: str, step_name: str) -> None:
    """Delete a step's failure record from the store and from the recent-failures log."""
    ctx.store.delete(K.failure(ctx.exp.name, pid, ctx.fingerprint, step_name))
    ctx.failures.remove(pid, step_name)


def send_all(ctx: Context, nexts: Iterable[Next]) -> None:
    """Enqueue steps by task name on the context's broker (never waiting on results)."""
    for nxt in nexts:
        ctx.celery.send_task(nxt.task, kwargs=nxt.kwargs)


def is_transient(err: BaseException) -> bool:
    """Faults the task retries later: the broker or the store unreachable.

    An LLM service that stays unavailable is not among them: its client already retried
    within its deadline, and the queue's circuit breaker takes over (:func:`task_step`).
    Never transient either: expected failures (:class:`UserError`: a model not in the hub
    cache while offline, an adapter of another base, ...) and the hub's own offline errors
    (which subclass ``ConnectionError``): the same input fails the same way.
    """
    from common.celery_app import TransientError

    if isinstance(err, UserError) or _is_offline_error(err):
        return False
    if isinstance(err, TransientError | ConnectionError | TimeoutError):
        return True
    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError
    except ImportError:  # pragma: no cover - redis is a dependency
        return False
    return isinstance(err, RedisConnectionError | RedisTimeoutError)


def _is_offline_error(err: BaseException) -> bool:
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return False
    return isinstance(err, OfflineModeIsEnabled | LocalEntryNotFoundError)


def wait_for_service(ctx: Context, pid: str | None, outage: Outage) -> NoReturn:
    """Mark the prompt waiting for the queue's service (its status kept, the reason says
    since when) and give the message back to the queue, where it waits until the breaker
    closes. Raises celery's ``Reject``."""
    from celery.exceptions import Reject

    if pid is not None:
        current = ctx.queue.status(pid) or Status.generated
        ctx.queue.set_status(pid, current, reason=outage.waiting)
    raise Reject(outage.waiting, requeue=True)


def task_step(
    task: Any, exp: str, pid: str | None, step_name: str, step: Callable[[Context], list[Next]]
) -> int:
    """Body of every pipeline task: check the experiment, run the step, enqueue what follows.

    A :class:`PromptFailure` is stored with the prompt and not retried (the same input fails
    the same way). The broker or the store unreachable is retried with backoff
    (:data:`common.retry.TASK_RETRY`); when the retries are spent, or on any other error, the
    failure is stored too, so every prompt ends in a final state with a reason instead of
    hanging. An external service that stays unavailable (``LLMUnavailable``, after its
    client's own retries) trips the queue's circuit breaker instead: the message goes back
    to the paused queue and the prompt waits, it does not fail. A step that succeeds
    removes its earlier failure record.
    """
    from common.breaker import Breaker
    from common.context import get_context
    from common.llm import LLMUnavailable
    from common.retry import TASK_RETRY
    from common.tasknames import queue_of

    ctx = get_context()
    ctx.check_task(exp)
    breaker = Breaker(ctx.redis, queue_of(task.name) or "")
    outage = breaker.outage()
    if outage is not None:  # paused queue: this message was taken before the pause
        time.sleep(1.0)  # no hot loop of give-back-and-take if nothing pauses the queue
        wait_for_service(ctx, pid, outage)
    try:
        nexts = step(ctx)
    except PromptFailure as e:
        if pid is None:
            raise
        record_failure(ctx, e, pid, step_name=step_name, retry=_this_task(task))
        return 0
    except LLMUnavailable as e:
        outage = breaker.trip(str(e))
        log.warning("queue %s paused: %s", breaker.queue, outage.waiting)
        wait_for_service(ctx, pid, outage)
    except UserError as e:  # e.g. the model is not cached on an offline node: say so, no retry
        if pid is None:
            raise
        failure = PromptFailure(step_name, str(e))
        record_failure(ctx, failure, pid, step_name=step_name, retry=_this_task(task))
        return 0
    except Exception as e:
        retries = int(getattr(task.request, "retries", 0) or 0)
        if is_transient(e) and retries < TASK_RETRY.max_retries:
            wait = TASK_RETRY.delay(retries, _RNG)
            raise task.retry(exc=e, countdown=wait) from e
        if pid is None:
            raise
        log.exception("prompt %s: %s failed", pid, step_name)
        what = "gave up after retries" if is_transient(e) else "unexpected error"
        failure = PromptFailure(step_name, f"{what}: {type(e).__name__}: {e}")
        record_failure(ctx, failure, pid, step_name=step_name, retry=_this_task(task))
        return 0
    if pid is not None:
        clear_failure(ctx, pid, step_name)
    send_all(ctx, nexts)
    return len(nexts)


_RNG = random.Random()


def _this_task(task: Any) -> Next | None:
    """The task being run, as a :class:`Next` that runs it again (None without a name)."""
    name = getattr(task, "name", None)
    if not name:
        return None
    request = getattr(task, "request", None)
    kwargs = dict(getattr(request, "kwargs", None) or {})
    args = list(getattr(request, "args", None) or ())
    if args:
        import inspect

        try:
            kwargs = dict(inspect.signature(task.run).bind_partial(*args, **kwargs).arguments)
        except (TypeError, ValueError):
            return None
    return Next(str(name), kwargs)
