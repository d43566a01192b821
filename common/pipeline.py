"""The flow of one prompt through the services, as plain functions.

The status index records how far the automatic work on a prompt got; waiting for a human
is a separate fact, kept in the review queue (a prompt can be analyzed from the judge's
verdicts while it waits for review, and is re-analyzed when its labels arrive).

generated -> logits (gpu) -> judged -> [evil in a non-reference variant?] -> review queue and
graph requests (gpu, every variant) -> analysis once the graphs exist (re-run when labels
change). Each step function does its work through the services' plain functions, updates
the status index and returns the :class:`Next` steps to enqueue; Celery tasks are thin
shells that call a step and send its ``Next`` list (:mod:`services.*.tasks`).

Every step is idempotent: artifacts already stored for this prompt and fingerprint are
reused, never recomputed into different content.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from common.context import Context
from common.errors import PromptFailure
from common.records import Failure, Prompt, Status, TopKLogits, Verdict
from common.review_queue import PromptState, rebuild
from common.store import NotFound
from common.store import keys as K

if TYPE_CHECKING:
    from services.attribution.runtime import Runtime
    from services.generator.core import Generator
    from services.judge.core import Judge

log = logging.getLogger(__name__)

#: states after which a prompt needs no more automatic work
FINAL = frozenset({Status.done, Status.analyzed, Status.failed})


@dataclass(frozen=True)
class Next:
    """A step to enqueue: a task name (``emc.<queue>.<name>``) and its keyword arguments."""

    task: str
    kwargs: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- helpers


def load_prompt(ctx: Context, pid: str) -> Prompt:
    try:
        return ctx.store.get_record(K.prompt(ctx.exp.name, pid), Prompt)
    except NotFound:
        raise PromptFailure(
            "load", f"prompt {pid} is not in the store {ctx.store.describe()}", prompt_id=pid
        ) from None


def load_logits(ctx: Context, pid: str) -> dict[str, TopKLogits]:
    out = {}
    for variant in ctx.exp.variant_names:
        key = K.logits(ctx.exp.name, pid, ctx.fingerprint, variant)
        out[variant] = ctx.store.get_record(key, TopKLogits)
    return out


def load_verdicts(ctx: Context, pid: str, judge: str) -> dict[str, Verdict]:
    out = {}
    for variant in ctx.exp.variant_names:
        key = K.verdicts(ctx.exp.name, pid, ctx.fingerprint, judge, variant)
        out[variant] = ctx.store.get_record(key, Verdict)
    return out


def record_failure(ctx: Context, failure: PromptFailure, pid: str) -> None:
    """Store why the prompt failed (next to it) and mark it failed in the status index."""
    record = failure.to_record(pid)
    ctx.store.put_json(K.failure(ctx.exp.name, pid, ctx.fingerprint, failure.step), record)
    ctx.queue.set_status(pid, Status.failed, reason=f"{failure.step}: {failure.reason}")
    log.warning("prompt %s failed %s: %s", pid, failure.step, failure.reason)


def graphs_done(ctx: Context, pid: str) -> bool:
    from services.attribution.artifact import graph_exists

    return all(
        graph_exists(ctx.store, ctx.exp.name, pid, ctx.fingerprint, v)
        for v in ctx.exp.variant_names
    )


# ----------------------------------------------------------------------------- steps


def batch_key(ctx: Context, batch: str) -> str:
    return f"emc:{ctx.exp.name}:batch:{batch}"


def step_generate(
    ctx: Context, generator: Generator, n: int, batch: str | None = None
) -> list[Next]:
    """Generate up to ``n`` new prompts (paused by backpressure unless a batch asks).

    A generator that fails (its service down after retries, answers unusable) produces
    no prompts this time; the error is logged and a batch still counts the answer, so
    ``emc mine`` asks again instead of waiting forever.
    """
    from services.generator.core import generate_batch, should_pause

    if batch is None and should_pause(len(ctx.queue), ctx.exp.generator.high_water_mark):
        log.info("review queue at %d >= high-water mark: not generating", len(ctx.queue))
        return []
    prompts: list[Prompt] = []
    try:
        prompts = generate_batch(ctx.store, ctx.exp, generator, n)
    except Exception as e:
        log.error("generator failed, no prompts this time: %s: %s", type(e).__name__, e)
        if batch is None:
            raise
    finally:
        for p in prompts:
            ctx.queue.set_status(p.id, Status.generated)
        if batch is not None:
            pipe = ctx.redis.pipeline()
            if prompts:
                pipe.rpush(batch_key(ctx, batch), *[p.id for p in prompts])
            pipe.incr(batch_key(ctx, batch) + ":answers")
            pipe.expire(batch_key(ctx, batch), 7 * 86400)
            pipe.expire(batch_key(ctx, batch) + ":answers", 7 * 86400)
            pipe.execute()
    return [Next("emc.gpu.logits", {"exp": ctx.exp.name, "prompt_id": p.id}) for p in prompts]


def step_logits(ctx: Context, runtime: Runtime, pid: str) -> list[Next]:
    """Top-k logits of every variant (reused when already stored), then the judge."""
    from services.attribution.steps import logits_step

    prompt = load_prompt(ctx, pid)
    missing = [
        v
        for v in ctx.exp.variant_names
        if not ctx.store.exists(K.logits(ctx.exp.name, pid, ctx.fingerprint, v))
    ]
    if missing:
        logits_step(runtime, ctx.store, prompt, missing)
    ctx.queue.set_status(pid, Status.logits)
    return [Next("emc.judge.verdicts", {"exp": ctx.exp.name, "prompt_id": pid})]


def step_judge(ctx: Context, judge: Judge, pid: str) -> list[Next]:
    """Verdicts for every top-k token of every variant, then the funnel's decision."""
    from services.judge.funnel import funnel

    prompt = load_prompt(ctx, pid)
    logits = load_logits(ctx, pid)
    try:
        verdicts = load_verdicts(ctx, pid, judge.name)
    except NotFound:
        verdicts = judge.judge(prompt, logits)
        for variant, verdict in verdicts.items():
            ctx.store.put_json(
                K.verdicts(ctx.exp.name, pid, ctx.fingerprint, judge.name, variant), verdict
            )
    decision = funnel(ctx.exp, verdicts, logits)
    if decision.to_review:
        ctx.queue.push(pid, decision.divergent, decision.evil_score)
    else:
        ctx.queue.set_status(pid, Status.judged if decision.graph_variants else Status.done)
    return [
        Next("emc.gpu.graph", {"exp": ctx.exp.name, "prompt_id": pid, "variant": v})
        for v in decision.graph_variants
    ]


def step_graph(ctx: Context, runtime: Runtime, pid: str, variant: str) -> list[Next]:
    """The attribution graph of (prompt, variant); analysis once every variant has one."""
    from services.attribution.artifact import graph_exists
    from services.attribution.steps import graph_step

    if not graph_exists(ctx.store, ctx.exp.name, pid, ctx.fingerprint, variant):
        # the stored top-k are the logit nodes: every judged or labeled token can be explained
        graph_step(runtime, ctx.store, load_prompt(ctx, pid), variant, targets="topk")
    if not graphs_done(ctx, pid):
        return []
    ctx.queue.set_status(pid, Status.graphed)
    return [Next("emc.analysis.rank_prompt", {"exp": ctx.exp.name, "prompt_id": pid})]


def step_rank(ctx: Context, pid: str) -> list[Next]:
    """Feature rankings of every variant (cached by labels version); needs every graph."""
    from services.analysis.errors import NothingToExplain
    from services.analysis.ranking import rank_prompt

    if not graphs_done(ctx, pid):
        log.info("prompt %s: graphs not all there yet; analysis waits for the last one", pid)
        return []
    for variant in ctx.exp.variant_names:
        try:
            rank_prompt(ctx.store, ctx.exp, pid, variant, fingerprint=ctx.fingerprint)
        except NothingToExplain as e:
            # e.g. the reference variant has no evil token: a finding, not a failure
            log.info("prompt %s/%s: no ranking: %s", pid, variant, e.reason)
    ctx.queue.set_status(pid, Status.analyzed)
    return []


# ----------------------------------------------------------------------------- index


def derive_state(ctx: Context, pid: str) -> PromptState:
    """Where a prompt stands, from its artifacts in the store alone (for ``emc reindex``)."""
    from common.labels import current_label

    exp, fp = ctx.exp, ctx.fingerprint
    run = K.run_dir(exp.name, pid, fp)
    present = set(ctx.store.list_keys(run + "/"))
    if any(k.startswith(run + "/failures/") for k in present):
        return PromptState(Status.failed)
    has = {
        "logits": all(K.logits(exp.name, pid, fp, v) in present for v in exp.variant_names),
        "verdicts": all(
            K.verdicts(exp.name, pid, fp, exp.judge.judge_id, v) in present
            for v in exp.variant_names
        ),
        "graphs": all(K.graph_manifest(exp.name, pid, fp, v) in present for v in exp.variant_names),
        # the reference variant often has nothing to explain, hence any
        "features": any(K.features(exp.name, pid, fp, v) in present for v in exp.variant_names),
    }
    if not has["logits"]:
        return PromptState(Status.generated)
    if not has["verdicts"]:
        return PromptState(Status.logits)
    from services.judge.funnel import funnel

    decision = funnel(exp, load_verdicts(ctx, pid, exp.judge.judge_id), load_logits(ctx, pid))
    labeled = current_label(ctx.store, exp.name, pid) is not None
    waiting = decision.to_review and not labeled
    if has["features"]:
        status = Status.analyzed
    elif has["graphs"]:
        status = Status.graphed
    elif labeled:
        status = Status.labeled
    elif waiting:
        status = Status.in_review
    else:
        status = Status.judged if decision.graph_variants else Status.done
    return PromptState(status, decision.divergent, decision.evil_score, awaiting_review=waiting)


def prompt_ids(ctx: Context) -> Iterator[str]:
    prefix = K.prompts_prefix(ctx.exp.name)
    for key in ctx.store.list_keys(prefix):
        if key.endswith("/prompt.json"):
            yield key[len(prefix) :].split("/", 1)[0]


def reindex(ctx: Context, progress: Callable[[Iterable[str]], Iterable[str]] | None = None) -> int:
    """Rebuild the review queue and status index in Redis from the object store."""
    pids: Iterable[str] = list(prompt_ids(ctx))
    if progress is not None:
        pids = progress(pids)
    return rebuild(ctx.queue, ((pid, derive_state(ctx, pid)) for pid in pids))


def recent_failures(ctx: Context, limit: int = 10) -> list[Failure]:
    """The latest failure records of this experiment's current fingerprint."""
    out = []
    for pid in prompt_ids(ctx):
        prefix = K.run_dir(ctx.exp.name, pid, ctx.fingerprint) + "/failures/"
        for key in ctx.store.list_keys(prefix):
            out.append(ctx.store.get_record(key, Failure))
    out.sort(key=lambda f: f.created_at, reverse=True)
    return out[:limit]


# ----------------------------------------------------------------------------- batches


def new_batch_id() -> str:
    return uuid.uuid4().hex[:12]


def batch_pids(ctx: Context, batch: str) -> tuple[list[str], int]:
    """(prompt ids generated so far for a batch, number of generator answers received)."""
    pids = ctx.redis.lrange(batch_key(ctx, batch), 0, -1)
    answers = int(ctx.redis.get(batch_key(ctx, batch) + ":answers") or 0)
    return [str(p) for p in pids], answers


def statuses(ctx: Context, pids: Iterable[str]) -> dict[str, Status | None]:
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
    deadline = time.monotonic() + timeout_s
    while True:
        now = statuses(ctx, pids)
        final = sum(1 for s in now.values() if s in FINAL)
        if on_progress is not None:
            on_progress(final, now)
        if final == len(pids) or time.monotonic() > deadline:
            return now
        time.sleep(poll_s)


# ----------------------------------------------------------------------------- Celery shells


def send_all(ctx: Context, nexts: Iterable[Next]) -> None:
    """Enqueue steps by task name on the context's broker (never waiting on results)."""
    for nxt in nexts:
        ctx.celery.send_task(nxt.task, kwargs=nxt.kwargs)


def is_transient(err: BaseException) -> bool:
    """Faults worth retrying later: the LLM service unavailable, the broker or store unreachable."""
    from common.celery_app import TransientError
    from common.llm import LLMUnavailable

    if isinstance(err, TransientError | LLMUnavailable | ConnectionError | TimeoutError):
        return True
    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError
    except ImportError:  # pragma: no cover - redis is a dependency
        return False
    return isinstance(err, RedisConnectionError | RedisTimeoutError)


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
