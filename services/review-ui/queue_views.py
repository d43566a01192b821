"""The queue page (what waits for review), its JSON feed, and the health check."""

from __future__ import annotations

from typing import Any

import redis
from flask import Blueprint, g, jsonify, render_template, request, url_for

from common.prompt_format import turns
from common.store import NotFound
from services.review_ui.context import ReviewContext, ctx
from services.review_ui.review import load_prompt

bp = Blueprint("queue", __name__)
health = Blueprint("health", __name__)

QUEUE_PAGE = 200
POLL_MS = 3000


def queue_snapshot(c: ReviewContext, limit: int = QUEUE_PAGE, viewer: str = "") -> dict[str, Any]:
    """The queue as ``viewer`` sees it: counts per status and the first ``limit`` prompts,
    less those they already reviewed (overlap prompts waiting for a second reviewer), each
    with who claimed it."""
    entries = c.queue.list(limit)
    reviewed = c.queue.reviewed_by([e.pid for e in entries])
    entries = [e for e in entries if viewer not in reviewed.get(e.pid, ())]
    claims = c.claims.holders([e.pid for e in entries])
    items = []
    for e in entries:
        try:
            prompt = load_prompt(c, e.pid)
            user, assistant = turns(prompt.text)
        except NotFound:
            user, assistant = "(prompt record missing from the store)", ""
        items.append(
            {
                "pid": e.pid,
                "divergent": e.divergent,
                "evil_score": round(e.evil_score, 4),
                "user": user,
                "assistant": assistant,
                "url": url_for("prompts.page", pid=e.pid),
                "claimed_by": claims[e.pid].reviewer if e.pid in claims else None,
                "second": e.pid in reviewed,
            }
        )
    return {"counts": c.queue.counts(), "waiting": len(c.queue), "items": items}


@bp.route("/")
def index() -> Any:
    """``GET /``: the review queue page (it polls :func:`api_queue`)."""
    c = ctx()
    return render_template(
        "queue.html",
        snap=queue_snapshot(c, viewer=g.user.name),
        poll_ms=POLL_MS,
        saved=request.args.get("saved", ""),
    )


@bp.route("/api/queue")
def api_queue() -> Any:
    """``GET /api/queue?limit=N``: the queue snapshot as JSON (``limit`` clamped to 1-1000)."""
    limit = request.args.get("limit", default=QUEUE_PAGE, type=int)
    return jsonify(queue_snapshot(ctx(), max(1, min(limit or QUEUE_PAGE, 1000)), g.user.name))


@health.route("/healthz")
def healthz() -> Any:
    """Liveness for `emc up` and load balancers: 200 when Redis answers, else 503."""
    try:
        ctx().queue.redis.ping()
    except redis.RedisError as e:
        return jsonify(status="degraded", error=f"redis: {type(e).__name__}"), 503
    return jsonify(status="ok")
