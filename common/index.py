"""The status index and review queue rebuilt from the object store alone (``emc reindex``).

Everything in Redis except queued messages can be rebuilt: a prompt's state follows from
which artifacts exist for the experiment's fingerprint, and the judge step's stored
:class:`~common.records.FunnelDecision` says whether it waits for review.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from common.context import Context
from common.labels import prompt_consensus
from common.records import Failure, FunnelDecision, Status
from common.review_queue import PromptState, rebuild
from common.store import StoreError
from common.store import keys as K


def derive_state(ctx: Context, pid: str, *, ignore_failures: bool = False) -> PromptState:
    """Where a prompt stands, from its artifacts in the store alone (``ignore_failures``:
    where it would stand without its failure records, e.g. when it is retried)."""
    present = set(ctx.store.list_keys(K.run_dir(ctx.exp.name, pid, ctx.fingerprint) + "/"))
    return _state(ctx, pid, present, ignore_failures=ignore_failures)


def _failure_keys(ctx: Context, pid: str, present: Iterable[str]) -> list[str]:
    head = K.run_dir(ctx.exp.name, pid, ctx.fingerprint) + "/failures/"
    return sorted(k for k in present if k.startswith(head))


def _state(
    ctx: Context, pid: str, present: set[str], *, ignore_failures: bool = False
) -> PromptState:
    """:func:`derive_state` from the keys ``present`` under the prompt's run directory."""
    exp, fp = ctx.exp, ctx.fingerprint
    failures = _failure_keys(ctx, pid, present)
    if failures and not ignore_failures:
        return PromptState(Status.failed, reason=_failure_reason(ctx, failures[-1]))
    has_logits = all(K.logits(exp.name, pid, fp, v) in present for v in exp.variant_names)
    if not has_logits:
        return PromptState(Status.generated)
    # the judge step writes its decision last: without it, judging has not finished
    if K.decision(exp.name, pid, fp) not in present:
        return PromptState(Status.logits)
    decision = ctx.store.get_record(K.decision(exp.name, pid, fp), FunnelDecision)
    has_graphs = all(K.graph_manifest(exp.name, pid, fp, v) in present for v in exp.variant_names)
    # the reference variant often has nothing to explain, hence any
    has_features = any(K.features(exp.name, pid, fp, v) in present for v in exp.variant_names)
    agreed = prompt_consensus(ctx.store, exp.name, pid)
    labeled = agreed.state != "unlabeled"
    # an overlap prompt with one review still waits for its second reviewer
    waiting = decision.to_review and agreed.needs_review
    if has_features:
        status = Status.analyzed
    elif has_graphs:
        status = Status.graphed
    elif waiting:
        status = Status.in_review
    elif labeled:
        status = Status.labeled
    else:
        status = Status.judged if decision.graph_variants else Status.done
    reason = unusable_reason(pid, decision.judge_unusable) if decision.judge_unusable else None
    return PromptState(
        status,
        decision.divergent,
        decision.evil_score,
        awaiting_review=waiting,
        reason=reason,
        reviewed_by=tuple(agreed.reviewers) if waiting else (),
    )


#: how a prompt whose judge answer was unusable is marked in the status index
UNUSABLE = "judge answer unusable"


def unusable_reason(pid: str, why: str) -> str:
    """The status reason of a prompt whose judge answer became all-``unsure``."""
    return f"{UNUSABLE} (every token unsure: {why}): re-judge with `emc retry --step judge {pid}`"


def _failure_reason(ctx: Context, key: str) -> str:
    """``step: reason`` of a stored failure, as the pipeline writes it into the index."""
    try:
        f = ctx.store.get_record(key, Failure)
    except StoreError as e:
        return f"failure record unreadable: {e}"
    return f"{f.step_name}: {f.reason}"


def prompt_ids(ctx: Context) -> Iterator[str]:
    """Ids of every stored prompt of the experiment."""
    prefix = K.prompts_prefix(ctx.exp.name)
    for key in ctx.store.list_keys(prefix):
        if key.endswith("/prompt.json"):
            yield key[len(prefix) :].split("/", 1)[0]


def reindex(ctx: Context, progress: Callable[[Iterable[str]], Iterable[str]] | None = None) -> int:
    """Rebuild the review queue, the status index and the recent-failures log in Redis from
    the object store (one listing of each prompt's run directory)."""
    pids: Iterable[str] = list(prompt_ids(ctx))
    if progress is not None:
        pids = progress(pids)
    failures: list[tuple[Failure, str]] = []

    def states() -> Iterator[tuple[str, PromptState]]:
        for pid in pids:
            present = set(ctx.store.list_keys(K.run_dir(ctx.exp.name, pid, ctx.fingerprint) + "/"))
            failures.extend(_read_failures(ctx, pid, _failure_keys(ctx, pid, present)))
            yield pid, _state(ctx, pid, present)

    n = rebuild(ctx.queue, states())
    ctx.failures.replace_all(failures)
    return n


def recent_failures(ctx: Context, limit: int = 10) -> list[Failure]:
    """The latest failure records of this experiment's current fingerprint, from the
    recent-failures log in Redis (:mod:`common.failure_log`; no store listing)."""
    return ctx.failures.recent(limit)


def failures_of(ctx: Context, pid: str) -> list[Failure]:
    """The failure records of a prompt under the current fingerprint (an unreadable one is
    shown as a failure of its own)."""
    prefix = K.run_dir(ctx.exp.name, pid, ctx.fingerprint) + "/failures/"
    return [f for f, _ in _read_failures(ctx, pid, ctx.store.list_keys(prefix))]


def _read_failures(ctx: Context, pid: str, keys: Iterable[str]) -> list[tuple[Failure, str]]:
    """``(record, step of its key)`` of each failure key (unreadable: a failure of its own)."""
    out = []
    for key in keys:
        step = key.rsplit("/", 1)[-1].removesuffix(".json")
        try:
            out.append((ctx.store.get_record(key, Failure), step))
        except StoreError as e:
            reason = f"failure record unreadable: {e}"
            out.append((Failure(prompt_id=pid, step=step, reason=reason), step))
    return out
