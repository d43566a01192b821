"""The adjudication pages: the list of disputed prompts and one dispute side by side."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, g, jsonify, render_template, request, url_for

from common.prompt_format import turns
from common.store import NotFound
from services.review_ui.adjudication import (
    adjudication_rows,
    dispute_of,
    disputes,
    parse_decision,
)
from services.review_ui.context import ctx
from services.review_ui.guidelines import load_guide
from services.review_ui.review import (
    ClaimedElsewhere,
    InvalidLabel,
    check_claim,
    claim_data,
    load_prompt_view,
    save_label,
    stamp,
    take_claim,
)

bp = Blueprint("adjudication", __name__)


@bp.route("/adjudicate")
def index() -> Any:
    """``GET /adjudicate``: every disputed prompt, oldest dispute first."""
    found = sorted(disputes(ctx().store, ctx().exp), key=lambda d: d.labeled_at)
    return render_template("adjudicate_list.html", disputes=found)


def _next_url(after: str) -> str:
    for d in disputes(ctx().store, ctx().exp):
        if d.pid != after:
            return url_for("adjudication.page", pid=d.pid, saved=after)
    return url_for("adjudication.index", saved=after)


@bp.route("/adjudicate/<pid>")
def page(pid: str) -> Any:
    """``GET /adjudicate/<pid>``: both reviews side by side; 404 if the prompt is not disputed."""
    c = ctx()
    try:
        view = load_prompt_view(c, pid)
    except NotFound:
        abort(404, description=f"no prompt {pid} in experiment {c.exp}")
    dispute = dispute_of(pid, view.consensus)
    if dispute is None:
        abort(404, description=f"prompt {pid} is not disputed ({view.consensus.state})")
    claim = take_claim(c, pid, g.user.name)
    rows = adjudication_rows(view, dispute)
    user, assistant = turns(view.prompt.text)
    data = {
        "pid": pid,
        "rows": [r.to_json() for r in rows],
        "a": dispute.a[1].reviewer,
        "b": dispute.b[1].reviewer,
        "a_bad": dispute.a[1].bad_prompt,
        "b_bad": dispute.b[1].bad_prompt,
        "resolves": [dispute.a[0], dispute.b[0]],
        "submit_url": url_for("adjudication.submit", pid=pid),
        "list_url": url_for("adjudication.index"),
        "claim": claim_data(claim, g.user.name),
        "claim_url": url_for("prompts.renew_claim", pid=pid),
        "release_url": url_for("prompts.release_claim", pid=pid),
        "renew_ms": int(c.experiment.review.claim_s * 1000 / 3),
    }
    return render_template(
        "adjudicate.html",
        view=view,
        dispute=dispute,
        rows=rows,
        claim=data["claim"],
        guide=load_guide(c),
        user_text=user,
        assistant_text=assistant,
        data=data,
        saved=request.args.get("saved", ""),
    )


@bp.route("/api/adjudicate/<pid>", methods=["POST"])
def submit(pid: str) -> Any:
    """Save the adjudicator's decision: it becomes the current label (stored first)."""
    c, me = ctx(), g.user.name
    try:
        view = load_prompt_view(c, pid)
    except NotFound:
        abort(404, description=f"no prompt {pid} in experiment {c.exp}")
    payload = request.get_json(silent=True)
    try:
        claim = check_claim(c, pid, me)
        label = parse_decision(view, payload, adjudicator=me)
    except ClaimedElsewhere as e:
        return jsonify(error=str(e)), 409
    except InvalidLabel as e:
        return jsonify(error=str(e)), 400
    label = stamp(c, pid, label, claim=claim, history=view.history)
    result = save_label(c, pid, label, base_key=view.current_key)
    return jsonify(
        saved=True,
        key=result.key,
        state=result.state,
        warnings=result.warnings,
        next_url=_next_url(pid),
    )
