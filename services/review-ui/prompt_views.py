"""The prompt page: tokens side by side, keyboard labeling, saving, sampling continuations."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, g, jsonify, render_template, request, url_for

from common.claims import Claim
from common.prompt_format import turns
from common.store import NotFound
from common.store import keys as K
from services.review_ui.context import ctx
from services.review_ui.guidelines import load_guide
from services.review_ui.origin import load_origin
from services.review_ui.review import (
    ClaimedElsewhere,
    InvalidLabel,
    PromptView,
    check_claim,
    check_pid,
    claim_data,
    load_prompt_view,
    parse_submission,
    save_label,
    stamp,
    take_claim,
)
from services.review_ui.tasks import SAMPLE_CONTINUATIONS, TaskError, enqueue

bp = Blueprint("prompts", __name__)

MAX_SAMPLES = 8


def _view(pid: str) -> PromptView:
    try:
        return load_prompt_view(ctx(), pid, viewer=g.user.name, rankings="none")
    except NotFound:
        abort(404, description=f"no prompt {pid} in experiment {ctx().exp}")


def _bad(message: str) -> Any:
    return jsonify(error=message), 400


def page_data(view: PromptView, claim: Claim | None = None) -> dict[str, Any]:
    """What the page's script needs (embedded as JSON)."""
    pid = view.prompt.id
    current = view.current
    c = ctx()
    return {
        "claim": claim_data(claim, g.user.name),
        "claim_url": url_for("prompts.renew_claim", pid=pid),
        "release_url": url_for("prompts.release_claim", pid=pid),
        "renew_ms": int(c.experiment.review.claim_s * 1000 / 3),
        "blind": view.blind,
        "pid": pid,
        "rows": [r.to_json() for r in view.rows],
        "variants": view.variant_names,
        "base_key": view.current_key,
        "current": None
        if current is None
        else {
            "reviewer": current.reviewer,
            "at": current.created_at.isoformat(),
            "bad_prompt": current.bad_prompt,
            "note": current.note,
        },
        "submit_url": url_for("prompts.submit", pid=pid),
        "samples_url": url_for("prompts.request_samples", pid=pid),
        "queue_url": url_for("queue.index"),
    }


@bp.route("/p/<pid>")
def page(pid: str) -> Any:
    """``GET /p/<pid>``: the labeling page of one prompt."""
    view = _view(pid)
    claim = take_claim(ctx(), pid, g.user.name)
    user, assistant = turns(view.prompt.text)
    return render_template(
        "prompt.html",
        view=view,
        claim=claim_data(claim, g.user.name),
        guide=load_guide(ctx()),
        user_text=user,
        assistant_text=assistant,
        data=page_data(view, claim),
        origin=load_origin(ctx().store, ctx().exp, pid),
        saved=request.args.get("saved", ""),
        overwrote=request.args.get("overwrote", ""),
    )


@bp.route("/api/p/<pid>")
def api_prompt(pid: str) -> Any:
    """``GET /api/p/<pid>``: the page's data as JSON, with the prompt text, status and label
    history."""
    view = _view(pid)
    data = page_data(view)
    data["text"] = view.prompt.text
    data["status"] = view.status.value if view.status else None
    data["history"] = [
        {"key": k, "reviewer": h.reviewer, "at": h.created_at.isoformat(), "version": h.version()}
        for k, h in ([] if view.blind else view.history)
    ]
    data["review_state"] = "awaiting_second" if view.blind else view.consensus.state
    return jsonify(data)


@bp.route("/api/p/<pid>/claim", methods=["POST"])
def renew_claim(pid: str) -> Any:
    """Claim the prompt or renew one's claim (the open page calls this periodically)."""
    check_pid(pid)
    claim = ctx().claims.take(pid, g.user.name)
    return jsonify(claim_data(claim, g.user.name))


@bp.route("/api/p/<pid>/claim/release", methods=["POST"])
def release_claim(pid: str) -> Any:
    """Give up one's claim (the page sends this when it is left without saving)."""
    check_pid(pid)
    return jsonify(released=ctx().claims.release(pid, g.user.name))


@bp.route("/api/p/<pid>/labels", methods=["POST"])
def submit(pid: str) -> Any:
    """Save a label: written to the store before this answers 200."""
    view = _view(pid)
    payload = request.get_json(silent=True)
    c, me = ctx(), g.user.name
    try:
        claim = check_claim(c, pid, me)
        label = parse_submission(view, payload, reviewer=me)
    except ClaimedElsewhere as e:
        return jsonify(error=str(e)), 409
    except InvalidLabel as e:
        return _bad(str(e))
    label = stamp(c, pid, label, claim=claim, history=view.history)
    base_key = payload.get("base_key") if isinstance(payload, dict) else None
    result = save_label(c, pid, label, base_key=base_key if isinstance(base_key, str) else None)
    args: dict[str, Any] = {"saved": pid}
    if result.overwrote:
        who, when = result.overwrote
        args["overwrote"] = f"{who} at {when:%Y-%m-%d %H:%M} UTC"
    next_url = (
        url_for("prompts.page", pid=result.next_pid, **args)
        if result.next_pid
        else url_for("queue.index", **args)
    )
    return jsonify(
        saved=True,
        key=result.key,
        duplicate=result.duplicate,
        version=label.version(),
        overwrote=args.get("overwrote"),
        state=result.state,
        warnings=result.warnings,
        next_url=next_url,
    )


def _token_row(view: PromptView, variant: Any, token_id: Any) -> str | None:
    """Error message if (variant, token_id) is not one of the prompt's top-k tokens."""
    if variant not in view.variant_names:
        return f"unknown variant {variant!r}: expected one of {view.variant_names}"
    if not isinstance(token_id, int) or not any(
        r.variant == variant and r.token_id == token_id for r in view.rows
    ):
        return f"token {token_id!r} is not in the top-k of {variant}"
    return None


@bp.route("/api/p/<pid>/samples", methods=["POST"])
def request_samples(pid: str) -> Any:
    """Ask the GPU queue for a few continuations after a chosen token."""
    view = _view(pid)
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict):
        return _bad("send a JSON object {variant, token_id, n}")
    variant, token_id, n = payload.get("variant"), payload.get("token_id"), payload.get("n", 3)
    problem = _token_row(view, variant, token_id)
    if problem:
        return _bad(problem)
    if not isinstance(n, int) or not 1 <= n <= MAX_SAMPLES:
        return _bad(f"n must be an integer from 1 to {MAX_SAMPLES}")
    c = ctx()
    try:
        task_id = enqueue(
            c.tasks,
            SAMPLE_CONTINUATIONS,
            exp=c.exp,
            prompt_id=pid,
            variant=variant,
            token_id=token_id,
            n=n,
        )
    except TaskError as e:
        return jsonify(error=str(e)), 503
    return jsonify(
        queued=True,
        task_id=task_id,
        poll_url=url_for("prompts.samples", pid=pid, variant=variant, token_id=token_id),
    ), 202


@bp.route("/api/p/<pid>/samples/<variant>/<int:token_id>")
def samples(pid: str, variant: str, token_id: int) -> Any:
    """Continuations if the GPU worker has written them, else ``ready: false``."""
    c = ctx()
    check = _token_row(_view(pid), variant, token_id)
    if check:
        abort(404, description=check)
    try:
        doc = c.store.get_json(K.samples(c.exp, check_pid(pid), c.fingerprint, variant, token_id))
    except NotFound:
        return jsonify(ready=False)
    if not isinstance(doc, dict) or doc.get("schema_version") != 1:
        return jsonify(error="stored samples have an unknown schema_version"), 500
    return jsonify(ready=True, continuations=[str(x) for x in doc.get("continuations", [])])
