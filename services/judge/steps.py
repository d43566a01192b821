"""The judge's pipeline step (the ``emc.judge.verdicts`` task runs it)."""

from __future__ import annotations

from typing import Any

from common import tasknames as T
from common.context import Context
from common.index import unusable_reason
from common.llm import bounded_map, raise_first
from common.pipeline import Next, load_logits, load_prompt, load_verdicts
from common.records import Status
from common.scores import HarmBatch, HarmJudge, HarmVerdicts
from common.store import NotFound
from common.store import keys as K
from services.judge.core import Judge, JudgeError
from services.judge.funnel import funnel


def step_judge(ctx: Context, judge: Judge, pid: str) -> list[Next]:
    """Verdicts for every top-k token of every variant, then the funnel's decision.

    The decision is stored last (``keys.decision``): its presence marks a judged prompt,
    and ``emc reindex`` reads it instead of re-deciding.
    """
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
    ctx.store.put_json(K.decision(ctx.exp.name, pid, ctx.fingerprint), decision)
    if decision.to_review:
        ctx.queue.push(pid, decision.divergent, decision.evil_score)
    else:
        # an unusable answer is counted and shown as such (`emc status`), not as a plain "done"
        reason = unusable_reason(pid, decision.judge_unusable) if decision.judge_unusable else None
        status = Status.judged if decision.graph_variants else Status.done
        ctx.queue.set_status(pid, status, reason=reason)
    return [
        Next(T.GPU_GRAPH, {"exp": ctx.exp.name, "prompt_id": pid, "variant": v})
        for v in decision.graph_variants
    ]


def step_judge_harm(
    ctx: Context, judge: HarmJudge, batch: str, then: str | None, then_kwargs: dict[str, Any]
) -> list[Next]:
    """Label a batch of continuations harmful/safe/unsure (e.g. a steering run's samples),
    store the verdicts, then send ``then`` (idempotent: stored verdicts are reused)."""
    exp, fp = ctx.exp.name, ctx.fingerprint
    key = K.harm_verdicts(exp, fp, batch)
    if not ctx.store.exists(key):
        items = ctx.store.get_record(K.harm_batch(exp, fp, batch), HarmBatch)
        if judge.judge_id != items.judge:
            raise JudgeError(
                f"batch {batch} asks for harm judge {items.judge!r}, this worker's is "
                f"{judge.judge_id!r}: start the judge worker with the run's experiment"
            )
        verdicts = raise_first(
            bounded_map(
                lambda it: judge.judge(it.prompt, it.continuation),
                items.items,
                ctx.exp.judge.concurrency,
            )
        )
        record = HarmVerdicts(
            experiment=exp, fingerprint=fp, batch=batch, judge=judge.judge_id, verdicts=verdicts
        )
        ctx.store.put_json(key, record)
    return [Next(then, then_kwargs)] if then else []
