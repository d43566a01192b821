"""The attribution service's steps on one prompt, reading and writing the object store.

``compute_*`` are the plain functions (the CLI calls them too); ``step_*`` are the pipeline
steps the ``emc.gpu.*`` tasks run. Each is idempotent: the same prompt and fingerprint write
the same keys with the same content. A step raises :class:`~common.errors.PromptFailure`
(not a zero result) when the model misbehaves.
"""

from __future__ import annotations

import logging
from typing import Literal

from common import tasknames as T
from common.answers import AnswerJob, PtsAnswer, answer_question, slot_answer_id
from common.context import Context
from common.errors import PromptFailure
from common.graph.artifact import delete_graph, graph_exists, graph_problem, graphs_done, save_graph
from common.pipeline import Next, clear_failure, load_prompt, record_failure
from common.prompt_check import InvalidPrompt, check_prompt
from common.records import GraphManifest, Prompt, Status, TopKLogits
from common.store import NotFound, ObjectStore, keys
from common.store.base import dumps
from services.attribution.runtime import Runtime

Targets = Literal["salient", "topk", "union"]

log = logging.getLogger(__name__)


def compute_logits(
    runtime: Runtime, store: ObjectStore, prompt: Prompt, variants: list[str] | None = None
) -> list[TopKLogits]:
    """Top-k next tokens of every variant (reference first), stored at ``keys.logits``."""
    exp = runtime.exp
    out = []
    for variant in variants or exp.variant_names:
        topk = runtime.top_k(prompt.text, variant)
        store.put_json(keys.logits(exp.name, prompt.id, runtime.fingerprint, variant), topk)
        out.append(topk)
    return out


def compute_logits_many(
    runtime: Runtime, store: ObjectStore, prompts: list[Prompt], variants: list[str] | None = None
) -> dict[str, PromptFailure]:
    """:func:`compute_logits` of many prompts in padded batches
    (:meth:`Runtime.top_k_many`): the top-k of every prompt that ran, stored; the failure
    of every prompt that did not, by prompt id (a prompt failing in one variant is not run
    in the next)."""
    exp = runtime.exp
    failed: dict[str, PromptFailure] = {}
    for variant in variants or exp.variant_names:
        todo = [
            p
            for p in prompts
            if p.id not in failed
            and not store.exists(keys.logits(exp.name, p.id, runtime.fingerprint, variant))
        ]
        results = runtime.top_k_many([p.text for p in todo], variant)
        for prompt, result in zip(todo, results, strict=True):
            if isinstance(result, PromptFailure):
                failed[prompt.id] = result
            else:
                store.put_json(
                    keys.logits(exp.name, prompt.id, runtime.fingerprint, variant), result
                )
    return failed


def compute_graph(
    runtime: Runtime,
    store: ObjectStore,
    prompt: Prompt,
    variant: str,
    *,
    targets: Targets = "salient",
) -> GraphManifest:
    """Attribution graph of (prompt, variant), stored at ``keys.graph_tensors``/``graph_manifest``.

    ``targets="union"`` makes the union of every variant's stored top-k tokens the logit
    nodes (computed and stored first if missing): every variant is attributed on the same
    targets, so base and adapted explain the same quantity and every judged token can be
    explained. ``"topk"``: this variant's own top-k only; ``"salient"``: the experiment's
    ``max_n_logits``/``desired_logit_prob``.
    """
    exp = runtime.exp
    target_ids: list[int] | None = None
    if targets != "salient":
        wanted = exp.variant_names if targets == "union" else [variant]
        target_ids = []
        for v in wanted:
            key = keys.logits(exp.name, prompt.id, runtime.fingerprint, v)
            try:
                topk = store.get_record(key, TopKLogits)
            except NotFound:
                topk = compute_logits(runtime, store, prompt, [v])[0]
            target_ids += [t.token_id for t in topk.tokens if t.token_id not in target_ids]
    graph = runtime.attribute(prompt.text, variant, target_token_ids=target_ids)
    return save_graph(store, exp, graph)


def validate_prompt(runtime: Runtime, text: str, max_tokens: int) -> None:
    """Refuse a prompt that cannot run (:func:`common.prompt_check.check_prompt`) before it
    is stored or any model work: tokens counted as the graphs count them (BOS included).
    ``max_tokens``: the experiment's ``attribution.max_prompt_tokens`` (outside the
    fingerprint, so not necessarily the runtime's own experiment's)."""
    variant = runtime.exp.reference
    check_prompt(
        text,
        max_tokens=max_tokens,
        count_tokens=lambda t: len(runtime.tokenize(t, variant)),
        memory_bytes=lambda n: runtime.graph_memory_bytes(n, variant),
    )


def ensure_prompt(store: ObjectStore, exp_name: str, text: str, source: str) -> Prompt:
    """The stored prompt with this exact text (created if absent, never overwritten)."""
    prompt = Prompt.new(text, source=source)
    key = keys.prompt(exp_name, prompt.id)
    if store.put_new(key, dumps(prompt)):
        return prompt
    return store.get_record(key, Prompt)


# ----------------------------------------------------------------------------- pipeline steps


def step_logits(ctx: Context, runtime: Runtime, pid: str) -> list[Next]:
    """Top-k logits of every variant (reused when already stored), then the judge. A prompt
    that cannot run fails here with the reason, before any model work."""
    prompt = load_prompt(ctx, pid)
    try:
        validate_prompt(runtime, prompt.text, ctx.exp.attribution.max_prompt_tokens)
    except InvalidPrompt as e:
        raise PromptFailure("validate", str(e)) from None
    missing = [
        v
        for v in ctx.exp.variant_names
        if not ctx.store.exists(keys.logits(ctx.exp.name, pid, ctx.fingerprint, v))
    ]
    if missing:
        compute_logits(runtime, ctx.store, prompt, missing)
    ctx.queue.set_status(pid, Status.logits)
    return [Next(T.JUDGE_VERDICTS, {"exp": ctx.exp.name, "prompt_id": pid})]


def step_logits_batch(ctx: Context, runtime: Runtime, pids: list[str]) -> list[Next]:
    """:func:`step_logits` of a generated batch, in padded forward passes. Each prompt ends
    as the single-prompt step would end it: its top-k stored and the judge next, or its own
    failure recorded (retried, as every failure, by the single-prompt task)."""
    exp = ctx.exp
    prompts: list[Prompt] = []
    for pid in dict.fromkeys(pids):  # a redelivered or duplicated id runs once
        try:
            prompt = load_prompt(ctx, pid)
            validate_prompt(runtime, prompt.text, exp.attribution.max_prompt_tokens)
        except InvalidPrompt as e:
            _record_logits_failure(ctx, PromptFailure("validate", str(e)), pid)
            continue
        except PromptFailure as e:
            _record_logits_failure(ctx, e, pid)
            continue
        prompts.append(prompt)
    failed = compute_logits_many(runtime, ctx.store, prompts)
    nexts = []
    for prompt in prompts:
        if prompt.id in failed:
            _record_logits_failure(ctx, failed[prompt.id], prompt.id)
            continue
        clear_failure(ctx, prompt.id, "logits")
        ctx.queue.set_status(prompt.id, Status.logits)
        nexts.append(Next(T.JUDGE_VERDICTS, {"exp": exp.name, "prompt_id": prompt.id}))
    return nexts


def _record_logits_failure(ctx: Context, failure: PromptFailure, pid: str) -> None:
    retry = Next(T.GPU_LOGITS, {"exp": ctx.exp.name, "prompt_id": pid})
    record_failure(ctx, failure, pid, step_name="logits", retry=retry)


def step_graph(ctx: Context, runtime: Runtime, pid: str, variant: str) -> list[Next]:
    """The attribution graph of (prompt, variant); analysis once every variant has one."""
    exp, fp = ctx.exp, ctx.fingerprint
    problem = graph_problem(ctx.store, exp.name, pid, fp, variant)
    if problem is not None:  # a torn or corrupt graph is recomputed, not reused
        log.warning("prompt %s: stored graph unusable, recomputing: %s", pid, problem)
        delete_graph(ctx.store, exp.name, pid, fp, variant)
    if not graph_exists(ctx.store, exp.name, pid, fp, variant):
        # every variant's stored top-k are the logit nodes of every variant's graph: each
        # judged or labeled token can be explained, and base and adapted on the same targets
        compute_graph(runtime, ctx.store, load_prompt(ctx, pid), variant, targets="union")
    if not graphs_done(ctx.store, exp.name, pid, fp, exp.variant_names):
        return []
    ctx.queue.set_status(pid, Status.graphed)
    return [Next(T.ANALYSIS_RANK, {"exp": exp.name, "prompt_id": pid})]


# ----------------------------------------------------------------------------- answers generator


def step_pts_answers(ctx: Context, runtime: Runtime, job: AnswerJob) -> list[Next]:
    """Every variant's answer to one question slot (kept when stored), then the judge."""
    from services.attribution.rollouts import sample_answer

    spec = ctx.exp.generator
    question = answer_question(ctx.exp, job.question_id)
    nexts = []
    for variant in ctx.exp.variant_names:
        aid = slot_answer_id(ctx.exp, question, job.paraphrase_index, job.sample_index, variant)
        key = keys.pts_answer(ctx.exp.name, ctx.fingerprint, aid)
        if not ctx.store.exists(key):
            answer = sample_answer(
                runtime, question, job.paraphrase_index, job.sample_index, variant, aid, spec.pts
            )
            answer = answer.model_copy(update={"batch": job.batch, "request": job.request})
            ctx.store.put_new(key, dumps(answer))
        nexts.append(
            Next(T.JUDGE_PTS_SCORE, {"exp": ctx.exp.name, "answer_id": aid, "keys": [key]})
        )
    return nexts


def step_pts_rollouts(
    ctx: Context, runtime: Runtime, answer_id: str, prefixes: list[int]
) -> list[Next]:
    """Rollouts from the prefixes a search needs (kept when stored), then the judge."""
    from services.attribution.rollouts import sample_rollouts

    key = keys.pts_answer(ctx.exp.name, ctx.fingerprint, answer_id)
    answer = ctx.store.get_record(key, PtsAnswer)
    done = sample_rollouts(runtime, ctx.store, answer, prefixes, ctx.exp.generator.pts)
    return [Next(T.JUDGE_PTS_SCORE, {"exp": ctx.exp.name, "answer_id": answer_id, "keys": done})]
