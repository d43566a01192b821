"""Labeling logic of the review UI: what a prompt page shows, what a submission must hold,
and how a label is saved. Views are thin shells around these functions.

Team review: opening a prompt claims it (:mod:`common.claims`), and a save by anyone but
the holder of a live claim is refused. A share of prompts (``review.overlap``) goes to two
reviewers, blind: the second does not see the first one's labels. Otherwise the last
write wins and the history keeps every earlier label; the page shows who labeled last and
when, and a save that replaced someone else's newer label says so.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import redis

from common.claims import Claim
from common.labels import (
    Consensus,
    consensus,
    current_label_with_key,
    is_overlap,
    label_history,
    missing_tokens,
)
from common.records import (
    LABELS,
    FeatureRanking,
    HumanLabel,
    Label,
    Prompt,
    RankingDigest,
    Status,
    TokenLabel,
    TopKLogits,
    Verdict,
)
from common.review_queue import QueueEntry
from common.store import CorruptArtifact, NotFound, ObjectStore
from common.store import keys as K
from services.review_ui.context import ReviewContext
from services.review_ui.guidelines import load_guide
from services.review_ui.reconcile import apply_to_queue, mark_pending
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
        """The row as the page's script reads it (``i`` is the row index)."""
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
    """One variant of the prompt page: its top-k logits, the judge's verdict, the feature ranking
    and whether a graph exists (each absent until computed), and its token rows."""

    name: str
    reference: bool
    logits: TopKLogits | None
    verdict: Verdict | None
    features: FeatureRanking | RankingDigest | None
    has_graph: bool
    rows: list[TokenRow] = field(default_factory=list)


@dataclass
class PromptView:
    """Everything the prompt page shows, loaded from the store (and the queue).

    ``blind``: an overlap prompt waiting for its second review, seen by someone who has not
    reviewed it; the first review is hidden (no current label, no human suggestions).
    """

    prompt: Prompt
    variants: list[VariantView]
    history: list[tuple[str, HumanLabel]]
    status: Status | None
    queue_entry: QueueEntry | None
    consensus: Consensus = field(default_factory=lambda: consensus([]))
    blind: bool = False

    @property
    def current(self) -> HumanLabel | None:
        """The prompt's current human label (the newest of its history), or None; None too
        while this reviewer must review blind."""
        return self.history[-1][1] if self.history and not self.blind else None

    @property
    def current_key(self) -> str | None:
        """Store key of the current human label, or None (also when blind)."""
        return self.history[-1][0] if self.history and not self.blind else None

    @property
    def logits(self) -> dict[str, TopKLogits]:
        """Top-k logits by variant, for the variants that have them."""
        return {v.name: v.logits for v in self.variants if v.logits is not None}

    @property
    def variant_names(self) -> list[str]:
        """The variants in page order."""
        return [v.name for v in self.variants]

    @property
    def rows(self) -> list[TokenRow]:
        """Every token row of every variant, in page order."""
        return [r for v in self.variants for r in v.rows]


def check_pid(pid: str) -> str:
    """``pid`` if it is a prompt id (12 lowercase hex characters); raises
    :class:`~common.store.NotFound` otherwise."""
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


def _ranking_digest(store: ObjectStore, exp: str, pid: str, fp: str, variant: str) -> Any:
    """The stored digest of a variant's ranking; made from the ranking itself when there is
    none (a store from before digests) or it cannot be read; None without a ranking."""
    try:
        return store.get_record(K.features_digest(exp, pid, fp, variant), RankingDigest)
    except (NotFound, CorruptArtifact):
        ranking = _maybe(store, K.features(exp, pid, fp, variant), FeatureRanking)
        return None if ranking is None else RankingDigest.of(ranking)


def load_prompt_view(
    c: ReviewContext,
    pid: str,
    viewer: str | None = None,
    *,
    rankings: Literal["full", "digest", "none"] = "full",
) -> PromptView:
    """Load a prompt with its logits, verdicts, labels and analysis; raises NotFound.

    ``viewer``: the reviewer looking; an overlap prompt they have not reviewed while it waits
    for its second review is shown blind (None: the whole history, e.g. for adjudication).
    ``rankings``: ``"none"`` leaves the feature rankings out (``features`` is None): the prompt
    page never shows them, and at thousands of features they cost more than the rest;
    ``"digest"`` loads their :class:`RankingDigest` (what the analysis page shows).
    """
    prompt = load_prompt(c, pid)
    store, exp, fp = c.store, c.exp, c.fingerprint
    history = label_history(store, exp, pid)
    agreed = consensus(history)
    blind = (
        viewer is not None and agreed.state == "awaiting_second" and viewer not in agreed.reviewers
    )
    current = history[-1][1] if history and not blind else None
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
                    if rankings == "full"
                    else _ranking_digest(store, exp, pid, fp, name)
                    if rankings == "digest"
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
    return PromptView(prompt, variants, history, status, entry, agreed, blind)


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


class ClaimedElsewhere(InvalidLabel):
    """Someone else holds a live claim on the prompt."""


@dataclass
class SaveResult:
    """What :func:`save_label` did: the label's key, whether it was a duplicate submit, the next
    prompt to review, whose newer label it overwrote, and what could not be updated."""

    key: str
    duplicate: bool
    next_pid: str | None
    overwrote: tuple[str, datetime] | None = None
    warnings: list[str] = field(default_factory=list)
    state: str = "single"  # the prompt's consensus state after the save


def _same(a: HumanLabel, b: HumanLabel) -> bool:
    return (a.reviewer, a.version(), a.note, a.role) == (b.reviewer, b.version(), b.note, b.role)


def take_claim(c: ReviewContext, pid: str, reviewer: str) -> Claim | None:
    """Claim the prompt for ``reviewer`` (or renew their claim); returns whoever holds it.

    None when Redis does not answer: reviewing goes on without a lock (the store keeps
    every label, so a collision costs a duplicate review, not a lost one).
    """
    try:
        return c.claims.take(pid, reviewer)
    except redis.RedisError as e:
        log.warning("claim of %s not taken (redis): %s", pid, e)
        return None


def claim_data(claim: Claim | None, me: str) -> dict[str, Any]:
    """A claim as the page's script sees it."""
    if claim is None:
        return {"held": False, "by": None, "expires_in": None}
    return {
        "held": claim.held_by(me),
        "by": claim.reviewer,
        "expires_in": max(0, round(claim.expires - time.time())),
    }


def check_claim(c: ReviewContext, pid: str, reviewer: str) -> Claim | None:
    """The live claim on the prompt (None: none, or Redis does not answer); raises
    :class:`ClaimedElsewhere` if someone else holds it."""
    try:
        holder = c.claims.holder(pid)
    except redis.RedisError:
        return None
    if holder is not None and not holder.held_by(reviewer):
        raise ClaimedElsewhere(
            f"claimed by {holder.reviewer}: they opened it and are labeling it now; "
            f"their claim ends within {max(1, round(holder.expires - time.time()))} s "
            "unless they keep the page open"
        )
    return holder


def stamp(
    c: ReviewContext,
    pid: str,
    label: HumanLabel,
    *,
    claim: Claim | None,
    history: list[tuple[str, HumanLabel]],
) -> HumanLabel:
    """The label with its provenance: overlap share, the guide's version, time spent."""
    guide = load_guide(c)
    overlap = is_overlap(pid, c.experiment.review.overlap) or any(lab.overlap for _, lab in history)
    elapsed = None
    if claim is not None and claim.held_by(label.reviewer) and claim.since > 0:
        elapsed = round(max(0.0, label.created_at.timestamp() - claim.since), 3)
    return label.model_copy(
        update={
            "overlap": overlap,
            "guideline_version": guide.version if guide else None,
            "elapsed_s": elapsed,
        }
    )


def next_for(c: ReviewContext, reviewer: str, exclude: str | None = None) -> str | None:
    """The prompt ``reviewer`` should review next: not claimed by someone else, not one
    they already reviewed (an overlap prompt waiting for its second reviewer)."""
    entries = [e for e in c.queue.list(50) if e.pid != exclude]
    pids = [e.pid for e in entries]
    claims = c.claims.holders(pids)
    reviewed = c.queue.reviewed_by(pids)
    for pid in pids:
        held = claims.get(pid)
        if (held is None or held.held_by(reviewer)) and reviewer not in reviewed.get(pid, ()):
            return pid
    return None


def save_label(
    c: ReviewContext, pid: str, label: HumanLabel, base_key: str | None = None
) -> SaveResult:
    """Append the label to the prompt's history (the store write comes first and must
    succeed), then update the review queue, release the claim and re-run the analysis.

    An overlap prompt's first review keeps it queued for a second reviewer; otherwise it
    leaves the queue. Saving the same content again (double submit) appends nothing.
    ``base_key`` is the current label the reviewer saw; if someone else saved after it,
    the result names them (not for the blind second review of an overlap prompt).
    """
    found = current_label_with_key(c.store, c.exp, pid)
    if found is not None and _same(found[1], label):
        key, duplicate = found[0], True
    else:
        key, duplicate = c.store.append(K.labels_history(c.exp, pid), label), False
    agreed = consensus(label_history(c.store, c.exp, pid))
    result = SaveResult(key=key, duplicate=duplicate, next_pid=None, state=agreed.state)
    stale = found is not None and not duplicate and found[0] != base_key
    blind_second = label.overlap and not label.adjudicated and base_key is None
    if stale and found is not None and found[1].reviewer != label.reviewer and not blind_second:
        result.overwrote = (found[1].reviewer, found[1].created_at)
    try:
        apply_to_queue(c, pid, agreed)
        c.claims.release(pid, label.reviewer)
        result.next_pid = next_for(c, label.reviewer, exclude=pid)
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
