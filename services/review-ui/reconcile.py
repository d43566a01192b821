"""Labels saved while Redis (the review queue) or the broker was down: the store write came
first and succeeded, the queue update or the re-ranking did not. Each such save leaves a
marker (``keys.ui_pending``); once Redis answers again the prompt leaves the review queue as
labeled and its analysis is re-run, and the marker goes."""

from __future__ import annotations

import logging
import time

import redis

from common.labels import Consensus, prompt_consensus
from common.records import Status
from common.store import keys as K
from services.review_ui.context import ReviewContext
from services.review_ui.tasks import RANK_PROMPT, TaskError, enqueue

log = logging.getLogger(__name__)

#: how often one UI process looks for labels to reconcile
EVERY_S = 5.0


def apply_to_queue(c: ReviewContext, pid: str, agreed: Consensus | None = None) -> None:
    """Put a prompt where its labels say: queued for a second review (an overlap prompt's
    first review), else out of the queue as labeled."""
    agreed = agreed or prompt_consensus(c.store, c.exp, pid)
    if agreed.needs_review:
        c.queue.keep_for_second_review(pid, agreed.reviewers)
        c.queue.set_status(pid, Status.in_review)
    else:
        c.queue.remove(pid, status=Status.labeled)


def mark_pending(c: ReviewContext, pid: str, why: str) -> None:
    """Remember that the prompt's saved label is not yet in the queue or not yet re-ranked."""
    c.store.put_json(K.ui_pending(c.exp, pid), {"schema_version": 1, "prompt_id": pid, "why": why})


def reconcile_pending(c: ReviewContext) -> int:
    """Apply every pending label to the queue and re-run its analysis; returns how many.
    Stops at the first one Redis or the broker still refuses (the rest wait)."""
    done = 0
    prefix = K.ui_pending_prefix(c.exp)
    for key in list(c.store.list_keys(prefix)):
        pid = key[len(prefix) :].removesuffix(".json")
        try:
            apply_to_queue(c, pid)
            enqueue(c.tasks, RANK_PROMPT, exp=c.exp, prompt_id=pid)
        except (redis.RedisError, TaskError) as e:
            log.info("pending labels wait: %s", e)
            break
        c.store.delete(key)
        log.warning("%s: label saved while Redis was down is now in the queue", pid)
        done += 1
    return done


def maybe_reconcile(c: ReviewContext) -> None:
    """``reconcile_pending`` at most every :data:`EVERY_S` per process (a before_request hook)."""
    now = time.monotonic()
    if now - c.last_reconcile < EVERY_S:
        return
    c.last_reconcile = now
    try:
        reconcile_pending(c)
    except Exception:  # never break a page for this; the next look tries again
        log.exception("reconciling pending labels failed")
