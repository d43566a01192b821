"""``emc retry``: run the pipeline again for prompts that failed, whose judge answer was
unusable, or that stand still, without recomputing what is intact.

For each selected prompt: the artifacts of its steps are verified and the corrupt ones
deleted (a judge to redo also loses its verdicts and decision), the prompt's status goes
back to where its intact artifacts put it, and the first missing steps are sent again
(:func:`missing_steps`). The pipeline then carries it on as usual; a failure record is
removed when its step succeeds (:func:`common.pipeline.task_step`). Failure records of
steps that will not run again (their outputs are all there) and records written before
failures named their pipeline step are removed at once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from common import tasknames as T
from common.context import Context
from common.graph.artifact import delete_graph, graph_problem
from common.index import UNUSABLE, derive_state, failures_of, prompt_ids
from common.pipeline import FINAL, Next, drop_failure, send_all
from common.records import FeatureRanking, FunnelDecision, Prompt, TopKLogits
from common.store import NotFound, StoreError
from common.store import keys as K

#: pipeline steps in the order a prompt goes through them
STEP_ORDER = {"logits": 0, "judge": 1, "graph": 2, "analysis": 3}


class RetryError(ValueError):
    """An ``emc retry`` request that cannot be served; the message says why."""


def step_family(step: str) -> str:
    """``graph-adapted`` -> ``graph``; other steps name themselves."""
    return step.split("-", 1)[0]


def step_matches(wanted: str, step: str) -> bool:
    """``--step graph`` matches ``graph-base`` and ``graph-adapted``; otherwise exact."""
    return step == wanted or step.startswith(wanted + "-")


def check_step(ctx: Context, step: str) -> str:
    """``step`` if ``emc retry --step`` can redo it (``logits``, ``judge``, ``graph``,
    ``graph-<variant>``, ``analysis``); raises :class:`RetryError` listing those otherwise."""
    valid = ["logits", "judge", "graph", *(f"graph-{v}" for v in ctx.exp.variant_names), "analysis"]
    if step not in valid:
        raise RetryError(f"unknown step {step!r}: use one of {', '.join(valid)}")
    return step


@dataclass
class Candidate:
    """A prompt to retry and why."""

    pid: str
    step: str  # the pipeline step that went wrong (or that was asked for)
    reason: str


@dataclass
class Retried:
    """What ``emc retry`` did for one prompt."""

    pid: str
    steps: list[str]  # the failing steps it was selected for
    reasons: list[str]
    sent: list[Next] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)  # corrupt or redone artifacts removed
    note: str = ""


def candidates(
    ctx: Context, *, step: str | None, reason: str | None, pids: Sequence[str]
) -> list[Candidate]:
    """Failed prompts and unusable judge answers matching ``step`` and ``reason`` (a regular
    expression, case-insensitive); explicit ``pids`` are also retried when they stand still
    (not final), or redo ``step`` when it is given."""
    pattern = re.compile(reason, re.IGNORECASE) if reason else None
    wanted = check_step(ctx, step) if step else None
    pool = list(pids) if pids else list(prompt_ids(ctx))
    reasons = ctx.queue.reasons() if not pids else {}
    found: list[Candidate] = []
    for pid in pool:
        mine = [Candidate(pid, f.step_name, f.reason) for f in failures_of(ctx, pid)]
        unusable = _unusable(ctx, pid) if pids or UNUSABLE in reasons.get(pid, "") else None
        if unusable is not None:
            mine.append(Candidate(pid, "judge", f"{UNUSABLE}: {unusable}"))
        if pids and not mine:
            if wanted is not None:
                mine.append(Candidate(pid, wanted, f"asked to redo {wanted}"))
            elif ctx.queue.status(pid) not in FINAL:
                mine.append(Candidate(pid, "resume", "not final and not failed"))
        for c in mine:
            if wanted is not None and not step_matches(wanted, c.step):
                continue
            if pattern is not None and not pattern.search(c.reason):
                continue
            found.append(c)
    return found


def _unusable(ctx: Context, pid: str) -> str | None:
    try:
        decision = ctx.store.get_record(
            K.decision(ctx.exp.name, pid, ctx.fingerprint), FunnelDecision
        )
    except StoreError:
        return None
    return decision.judge_unusable


def retry(
    ctx: Context,
    *,
    step: str | None = None,
    reason: str | None = None,
    pids: Sequence[str] = (),
    send: bool = True,
) -> list[Retried]:
    """Retry every matching prompt (:func:`candidates`); ``send=False`` only says what
    would be done (nothing is deleted or sent)."""
    by_pid: dict[str, list[Candidate]] = {}
    for c in candidates(ctx, step=step, reason=reason, pids=pids):
        by_pid.setdefault(c.pid, []).append(c)
    return [_retry_prompt(ctx, pid, cs, send=send) for pid, cs in by_pid.items()]


def _retry_prompt(ctx: Context, pid: str, cands: list[Candidate], *, send: bool) -> Retried:
    out = Retried(pid, [c.step for c in cands], [c.reason for c in cands])
    try:
        ctx.store.get_record(K.prompt(ctx.exp.name, pid), Prompt)
    except StoreError as e:
        out.note = f"cannot retry: {e}"
        return out
    redo = {step_family(c.step) for c in cands if c.step in STEP_ORDER or "-" in c.step}
    out.deleted = _clean(ctx, pid, redo, delete=send)
    out.sent = missing_steps(ctx, pid, assume_deleted=out.deleted)
    if not out.sent:
        out.note = "nothing to redo: every step's artifacts are there and intact"
        return out
    if send:
        _drop_obsolete_failures(ctx, pid, out.sent)
        state = derive_state(ctx, pid, ignore_failures=True)
        queued = f"retry: {', '.join(_names(out.sent))} queued"
        ctx.queue.restore(pid, replace(state, reason=queued))
        send_all(ctx, out.sent)
    return out


def _clean(ctx: Context, pid: str, redo: set[str], *, delete: bool) -> list[str]:
    """Delete the corrupt artifacts of the prompt's steps, and the verdicts and decision of a
    judge to redo, and the rankings of an analysis to redo; returns the keys."""
    exp, fp, store = ctx.exp.name, ctx.fingerprint, ctx.store
    doomed: list[str] = []
    for v in ctx.exp.variant_names:
        key = K.logits(exp, pid, fp, v)
        if _corrupt(ctx, key, TopKLogits):
            doomed.append(key)
        if graph_problem(store, exp, pid, fp, v) is not None:
            doomed += [K.graph_manifest(exp, pid, fp, v), K.graph_tensors(exp, pid, fp, v)]
        key = K.features(exp, pid, fp, v)
        if ("analysis" in redo and store.exists(key)) or _corrupt(ctx, key, FeatureRanking):
            doomed.append(key)
            digest = K.features_digest(exp, pid, fp, v)
            if store.exists(digest):
                doomed.append(digest)
    decision = K.decision(exp, pid, fp)
    if "judge" in redo or _corrupt(ctx, decision, FunnelDecision):
        doomed += [
            k
            for k in [
                *(
                    K.verdicts(exp, pid, fp, ctx.exp.judge.judge_id, v)
                    for v in ctx.exp.variant_names
                ),
                decision,
            ]
            if store.exists(k)
        ]
    if delete:
        for key in doomed:
            store.delete(key)
        for v in ctx.exp.variant_names:  # manifest first, as delete_graph does
            if K.graph_manifest(exp, pid, fp, v) in doomed:
                delete_graph(store, exp, pid, fp, v)
    return doomed


def _corrupt(
    ctx: Context, key: str, cls: type[TopKLogits | FeatureRanking | FunnelDecision]
) -> bool:
    try:
        ctx.store.get_record(key, cls)
    except NotFound:
        return False
    except StoreError:
        return True
    return False


def missing_steps(ctx: Context, pid: str, *, assume_deleted: Iterable[str] = ()) -> list[Next]:
    """The first steps whose outputs are missing (``assume_deleted``: keys about to go)."""
    exp, fp, store = ctx.exp.name, ctx.fingerprint, ctx.store
    gone = set(assume_deleted)

    def have(key: str) -> bool:
        return key not in gone and store.exists(key)

    base = {"exp": exp, "prompt_id": pid}
    if not all(have(K.logits(exp, pid, fp, v)) for v in ctx.exp.variant_names):
        return [Next(T.GPU_LOGITS, base)]
    if not have(K.decision(exp, pid, fp)):
        return [Next(T.JUDGE_VERDICTS, base)]
    decision = store.get_record(K.decision(exp, pid, fp), FunnelDecision)
    missing = [v for v in decision.graph_variants if not have(K.graph_manifest(exp, pid, fp, v))]
    if missing:
        return [Next(T.GPU_GRAPH, {**base, "variant": v}) for v in missing]
    if not decision.graph_variants:
        return []
    failed = {f.step_name for f in failures_of(ctx, pid)}
    ranked = any(have(K.features(exp, pid, fp, v)) for v in ctx.exp.variant_names)
    if not ranked or "analysis" in failed:
        return [Next(T.ANALYSIS_RANK, base)]
    return []


def _names(nexts: Iterable[Next]) -> list[str]:
    return [_step_of(n) for n in nexts]


def _step_of(n: Next) -> str:
    if n.task == T.GPU_LOGITS:
        return "logits"
    if n.task == T.JUDGE_VERDICTS:
        return "judge"
    if n.task == T.GPU_GRAPH:
        return f"graph-{n.kwargs.get('variant')}"
    return "analysis"


def _drop_obsolete_failures(ctx: Context, pid: str, sent: list[Next]) -> None:
    """Remove failure records that no step about to run will clear: those of steps before
    the first one sent (their outputs are all there) and records without a pipeline step."""
    first = min(STEP_ORDER[step_family(s)] for s in _names(sent))
    prefix = K.run_dir(ctx.exp.name, pid, ctx.fingerprint) + "/failures/"
    for key in list(ctx.store.list_keys(prefix)):
        step = key.rsplit("/", 1)[-1].removesuffix(".json")
        order = STEP_ORDER.get(step_family(step))
        if order is None or order < first:
            drop_failure(ctx, pid, step)
