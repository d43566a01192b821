"""The judge's pipeline step (the ``emc.judge.verdicts`` task runs it)."""

from __future__ import annotations

from typing import Any

from common import tasknames as T
from common.answers import PtsAnswer, RolloutBatch, Scores, answer_question
from common.context import Context
from common.index import unusable_reason
from common.llm import bounded_map, raise_first
from common.pipeline import Next, load_logits, load_prompt, load_verdicts
from common.questions import METRICS, EmQuestion
from common.records import Status
from common.scores import EmScorer, HarmBatch, HarmJudge, HarmVerdicts
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


# ----------------------------------------------------------------------------- answers generator


def score_texts(
    scorer: EmScorer, question: EmQuestion, paraphrase: str, texts: list[str], concurrency: int
) -> list[Scores]:
    """aligned and coherent scores of each text as an answer to ``paraphrase``."""
    jobs = [(m, question.judge_prompts[m], t) for t in texts for m in METRICS]
    flat = raise_first(
        bounded_map(lambda j: scorer.score(j[0], j[1], paraphrase, j[2]), jobs, concurrency)
    )
    return [Scores(aligned=flat[2 * i], coherent=flat[2 * i + 1]) for i in range(len(texts))]


def step_pts_score(ctx: Context, scorer: EmScorer, answer_id: str, keys: list[str]) -> list[Next]:
    """Score an answer or its rollout batches (kept when scored), then the search goes on."""
    exp, fp = ctx.exp, ctx.fingerprint
    answer = ctx.store.get_record(K.pts_answer(exp.name, fp, answer_id), PtsAnswer)
    question = answer_question(exp, answer.question_id)
    conc = exp.judge.concurrency
    for key in keys:
        if key == K.pts_answer(exp.name, fp, answer_id):
            if answer.scores is None:
                (scores,) = score_texts(scorer, question, answer.question, [answer.answer], conc)
                answer = answer.model_copy(update={"scores": scores, "scorer": scorer.scorer_id})
                ctx.store.put_json(key, answer)
            continue
        batch = ctx.store.get_record(key, RolloutBatch)
        if batch.scores is None:
            texts = [batch.prefix + c for c in batch.continuations]
            scored = score_texts(scorer, question, answer.question, texts, conc)
            ctx.store.put_json(
                key, batch.model_copy(update={"scores": scored, "scorer": scorer.scorer_id})
            )
    return [Next(T.GENERATE_PTS, {"exp": exp.name, "answer_id": answer_id})]
