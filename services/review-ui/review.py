"""Labeling logic of the review UI: what a prompt page shows, what a submission must hold,
and how a label is saved. Views are thin shells around these functions.

Two reviewers on one prompt: the last write wins and the history keeps every earlier
label; the page shows who labeled last and when, and a save that replaced someone
else's newer label says so.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis

from common.labels import current_label_with_key, label_history, missing_tokens
from common.records import (
    LABELS,
    FeatureRanking,
    HumanLabel,
    Label,
    Prompt,
    Status,
    TokenLabel,
    TopKLogits,
    Verdict,
)
from common.review_queue import QueueEntry
from common.store import NotFound, ObjectStore
from common.store import keys as K
from services.review_ui.context import ReviewContext
from services.review_ui.reconcile import mark_pending
from services.review_ui.tasks import RANK_PROMPT, TaskError, enqueue

log = logging.getLogger(__name__)

PID_RE = re.compile(r"^[0-9a-f]{12}$")
MAX_NOTE = 4000


class InvalidLabel(ValueError):
    """A submission that cannot be saved; the message tells the reviewer what is wrong."""


@dataclass
class TokenRow:
    """One top-k token of one variant, with the judge's verdict and the pre-filled label."""

    index: int
    variant: str
    rank: int
    token_id: int
    token: str
    prob: float
    judge: Label | None
    reason: str
    suggestion: Label | None
    source: str | None  # "judge" or "human:<reviewer>" (who the suggestion comes from)
    new: bool  # not among the reference variant's top-k

    def to_json(self) -> dict[str, Any]:
        return {
            "i": self.index,
            "variant": self.variant,
            "rank": self.rank,
            "token_id": self.token_id,
            "token": self.token,
            "prob": self.prob,
            "judge": self.judge,
            "reason": self.reason,
            "suggestion": self.suggestion,
            "source": self.source,
            "new": self.new,
        }


@dataclass
class VariantView:
    name: str
    reference: bool
    logits: TopKLogits | None
    verdict: Verdict | None
    features: FeatureRanking | None
    has_graph: bool
    rows: list[TokenRow] = field(default_factory=list)


@dataclass
class PromptView:
    """Everything the prompt page shows, loaded from the store (and the queue)."""

    prompt: Prompt
    variants: list[VariantView]
    history: list[tuple[str, HumanLabel]]
    status: Status | None
    queue_entry: QueueEntry | None

    @property
    def current(self) -> HumanLabel | None:
        return self.history[-1][1] if self.history else None

    @property
    def current_key(self) -> str | None:
        return self.history[-1][0] if self.history else None

    @property
    def logits(self) -> dict[str, TopKLogits]:
        return {v.name: v.logits for v in self.variants if v.logits is not None}

    @property
    def variant_names(self) -> list[str]:
        return [v.name for v in self.variants]

    @property
    def rows(self) -> list[TokenRow]:
        return [r for v in self.variants for r in v.rows]


def check_pid(pid: str) -> str:
    if not PID_RE.match(pid):
        raise NotFound(f"{pid!r} is not a prompt id (12 hex characters)")
    return pid


def _maybe(store: ObjectStore, key: str, cls: type[Any]) -> Any:
    try:
        return store.get_record(key, cls)
    except NotFound:
        return None


def load_prompt(c: ReviewContext, pid: str) -> Prompt:
    """A prompt record (cached: a prompt id names immutable text); raises NotFound."""
    cached = c.prompt_cache.get(pid)
    if cached is None:
        cached = c.store.get_record(K.prompt(c.exp, check_pid(pid)), Prompt)
        if len(c.prompt_cache) > 5000:
            c.prompt_cache.clear()
        c.prompt_cache[pid] = cached
    prompt: Prompt = cached
    return prompt


def load_prompt_view(c: ReviewContext, pid: str, *, rankings: bool = True) -> PromptView:
    """Load a prompt with its logits, verdicts, labels and analysis; raises NotFound.

    ``rankings=False`` leaves the feature rankings out (``features`` is None): the prompt
    page never shows them, and at thousands of features they cost more than the rest."""
    prompt = load_prompt(c, pid)
    store, exp, fp = c.store, c.exp, c.fingerprint
    history = label_history(store, exp, pid)
    current = history[-1][1] if history else None
    variants: list[VariantView] = []
    for name in c.experiment.variant_names:
        variants.append(
            VariantView(
                name=name,
                reference=name == c.experiment.reference,
                logits=_maybe(store, K.logits(exp, pid, fp, name), TopKLogits),
                verdict=_maybe(store, K.verdicts(exp, pid, fp, c.judge_id, name), Verdict),
                features=(
                    _maybe(store, K.features(exp, pid, fp, name), FeatureRanking)
                    if rankings
                    else None
                ),
                has_graph=store.exists(K.graph_manifest(exp, pid, fp, name)),
            )
        )
    reference = next(v for v in variants if v.reference)
    ref_ids = {t.token_id for t in reference.logits.tokens} if reference.logits else set()
    index = 0
    for v in variants:
        if v.logits is None:
            continue
        judged = {t.token_id: t for t in v.verdict.verdicts} if v.verdict else {}
        for rank, t in enumerate(v.logits.tokens, start=1):
            verdict = judged.get(t.token_id)
            human = current.label_of(v.name, t.token_id) if current else None
            if human is not None and current is not None:
                suggestion, source = human, f"human:{current.reviewer}"
            elif verdict is not None:
                suggestion, source = verdict.label, "judge"
            else:
                suggestion, source = None, None
            v.rows.append(
                TokenRow(
                    index=index,
                    variant=v.name,
                    rank=rank,
                    token_id=t.token_id,
                    token=t.token,
                    prob=t.prob,
                    judge=verdict.label if verdict else None,
                    reason=verdict.reason if verdict else "",
                    suggestion=suggestion,
                    source=source,
                    new=not v.reference and t.token_id not in ref_ids,
                )
            )
            index += 1
    try:
        status, entry = c.queue.status(pid), c.queue.entry(pid)
    except redis.RedisError as e:
        log.warning("redis unavailable while loading %s: %s", pid, e)
        status, entry = None, None
    return PromptView(prompt, variants, history, status, entry)


def _submitted_labels(
    raw: list[Any], tokens: dict[tuple[str, int], str], variants: list[str]
) -> dict[tuple[str, int], Label]:
    """``{(variant, token id): label}`` of a submission's label list; raises InvalidLabel."""
    seen: dict[tuple[str, int], Label] = {}
    for item in raw:
        if not isinstance(item, dict):
            raise InvalidLabel("each label must be an object {variant, token_id, label}")
        variant, token_id, label = item.get("variant"), item.get("token_id"), item.get("label")
        if label not in LABELS:
            raise InvalidLabel(f"label {label!r} is not one of {', '.join(LABELS)}")
        if variant not in variants:
            raise InvalidLabel(f"unknown variant {variant!r}: expected one of {variants}")
        if not isinstance(token_id, int) or isinstance(token_id, bool):
            raise InvalidLabel(f"token_id must be an integer, got {token_id!r}")
        if (variant, token_id) not in tokens:
            raise InvalidLabel(f"token {token_id} is not in the top-k of {variant}")
        if seen.get((variant, token_id), label) != label:
            raise InvalidLabel(f"token {token_id} of {variant} is labeled twice, differently")
        seen[(variant, token_id)] = label
    return seen


def parse_submission(view: PromptView, payload: Any, reviewer: str) -> HumanLabel:
    """Check a submitted label against the prompt's top-k tokens; raises InvalidLabel.

    Every token of every variant must be labeled, unless the prompt is flagged bad.
    """
    if not isinstance(payload, dict):
        raise InvalidLabel("send a JSON object with 'labels', 'bad_prompt' and 'note'")
    raw = payload.get("labels")
    if not isinstance(raw, list):
        raise InvalidLabel("'labels' must be a list of {variant, token_id, label}")
    bad = payload.get("bad_prompt", False)
    note = payload.get("note", "")
    if not isinstance(bad, bool):
        raise InvalidLabel("'bad_prompt' must be true or false")
    if not isinstance(note, str) or len(note) > MAX_NOTE:
        raise InvalidLabel(f"'note' must be text of at most {MAX_NOTE} characters")
    tokens = {(r.variant, r.token_id): r.token for r in view.rows}
    seen = _submitted_labels(raw, tokens, view.variant_names)
    label = HumanLabel(
        prompt_id=view.prompt.id,
        reviewer=reviewer,
        labels=[
            TokenLabel(variant=v, token_id=t, token=tokens[(v, t)], label=lab)
            for (v, t), lab in seen.items()
        ],
        bad_prompt=bad,
        note=note.strip(),
    )
    if not bad:
        missing = missing_tokens(label, view.variant_names, view.logits)
        if missing:
            no_logits = sorted({v for v, t in missing if t is None})
            if no_logits:
                raise InvalidLabel(
                    f"variant(s) {', '.join(no_logits)} have no top-k logits yet: the prompt "
                    "cannot be fully labeled; flag it bad (b) or come back later"
                )
            raise InvalidLabel(
                f"{len(missing)} token(s) still unlabeled (e.g. {missing[0][0]} token "
                f"{tokens[(missing[0][0], missing[0][1] or 0)]!r}): label or confirm every token"
            )
    return label


@dataclass
class SaveResult:
    key: str
    duplicate: bool
    next_pid: str | None
    overwrote: tuple[str, datetime] | None = None
    warnings: list[str] = field(default_factory=list)


def _same(a: HumanLabel, b: HumanLabel) -> bool:
    return (a.reviewer, a.version(), a.note) == (b.reviewer, b.version(), b.note)


def save_label(
    c: ReviewContext, pid: str, label: HumanLabel, base_key: str | None = None
) -> SaveResult:
    """Append the label to the prompt's history (the store write comes first and must
    succeed), then take the prompt out of the review queue and re-run its analysis.

    Saving the same content again (double submit) appends nothing. ``base_key`` is the
    current label the reviewer saw; if someone else saved after it, the result names them.
    """
    found = current_label_with_key(c.store, c.exp, pid)
    if found is not None and _same(found[1], label):
        key, duplicate = found[0], True
    else:
        key, duplicate = c.store.append(K.labels_history(c.exp, pid), label), False
    result = SaveResult(key=key, duplicate=duplicate, next_pid=None)
    stale = found is not None and not duplicate and found[0] != base_key
    if stale and found is not None and found[1].reviewer != label.reviewer:
        result.overwrote = (found[1].reviewer, found[1].created_at)
    try:
        c.queue.remove(pid, status=Status.labeled)
        result.next_pid = c.queue.next_pid(exclude=pid)
    except redis.RedisError as e:
        result.warnings.append(f"label saved, but the review queue was not updated: {e}")
    if not result.warnings:
        try:
            enqueue(c.tasks, RANK_PROMPT, exp=c.exp, prompt_id=pid)
        except TaskError as e:
            result.warnings.append(f"label saved, but the analysis was not re-run: {e}")
    if result.warnings:  # done once Redis and the broker answer again (reconcile.py)
        mark_pending(c, pid, "; ".join(result.warnings))
        result.warnings.append("the queue and the analysis catch up once Redis answers again")
    for w in result.warnings:
        log.warning("%s: %s", pid, w)
    return result
