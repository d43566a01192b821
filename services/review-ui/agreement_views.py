"""The agreement page: judge vs human confusion matrix, Cohen's kappa, disagreements."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, render_template

from services.review_ui.agreement import agreement_report
from services.review_ui.context import ctx

bp = Blueprint("agreement", __name__)


@bp.route("/agreement")
def index() -> Any:
    """``GET /agreement``: the agreement page of the experiment's judge with the human labels."""
    c = ctx()
    report = agreement_report(c.store, c.exp, c.fingerprint, c.judge_id, c.experiment.variant_names)
    return render_template("agreement.html", report=report, judge=c.judge_id)
