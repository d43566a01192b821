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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

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


def record_failure(ctx: Context, failure: PromptFailure, pid: str) -> None:
    """Store why the prompt failed (next to it) and mark it failed in the status index."""
    record = failure.to_record(pid)
    ctx.store.put_json(K.failure(ctx.exp.name, pid, ctx.fingerprint, failure.step), record)
    ctx.queue.set_status(pid, Status.failed, reason=f"{failure.step}: {failure.reason}")
    log.warning("prompt %s failed %s: %s", pid, failure.step, failure.reason)


def send_all(ctx: Context, nexts: Iterable[Next]) -> None:
    """Enqueue steps by task name on the context's broker (never waiting on results)."""
    for nxt in nexts:
        ctx.celery.send_task(nxt.task, kwargs=nxt.kwargs)


def is_transient(err: BaseException) -> bool:
    """Faults worth retrying later: the LLM service unavailable, the broker or store unreachable.

    Never transient: expected failures (:class:`UserError`: a model not in the hub cache
    while offline, an adapter of another base, ...) and the hub's own offline errors (which
    subclass ``ConnectionError``): the same input fails the same way.
    """
    from common.celery_app import TransientError
    from common.llm import LLMUnavailable

    if isinstance(err, UserError) or _is_offline_error(err):
        return False
    if isinstance(err, TransientError | LLMUnavailable | ConnectionError | TimeoutError):
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


def task_step(
    task: Any, exp: str, pid: str | None, step_name: str, step: Callable[[Context], list[Next]]
) -> int:
    """Body of every pipeline task: check the experiment, run the step, enqueue what follows.

    A :class:`PromptFailure` is stored with the prompt and not retried (the same input fails
    the same way). Transient faults are retried with backoff by Celery; when the retries
    are spent, or on any other error, the failure is stored too, so every prompt ends in a
    final state with a reason instead of hanging.
    """
    from common.context import get_context

    ctx = get_context()
    ctx.check_task(exp)
    try:
        nexts = step(ctx)
    except PromptFailure as e:
        if pid is None:
            raise
        record_failure(ctx, e, pid)
        return 0
    except UserError as e:  # e.g. the model is not cached on an offline node: say so, no retry
        if pid is None:
            raise
        record_failure(ctx, PromptFailure(step_name, str(e)), pid)
        return 0
    except Exception as e:
        retries = int(getattr(task.request, "retries", 0) or 0)
        if is_transient(e) and retries < task.max_retries:
            raise task.retry(exc=e, countdown=min(2 ** (retries + 1), 300)) from e
        if pid is None:
            raise
        log.exception("prompt %s: %s failed", pid, step_name)
        what = "gave up after retries" if is_transient(e) else "unexpected error"
        record_failure(ctx, PromptFailure(step_name, f"{what}: {type(e).__name__}: {e}"), pid)
        return 0
    send_all(ctx, nexts)
    return len(nexts)
