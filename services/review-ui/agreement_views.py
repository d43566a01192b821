"""The agreement page (judge vs humans, humans vs humans, per-reviewer figures) and the
judge calibration page with its few-shot export."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, flash, g, redirect, render_template, url_for

from services.review_ui.agreement import agreement_report, team_report
from services.review_ui.calibration import (
    calibration_report,
    export_few_shot,
    pinned_set,
    trend_points,
)
from services.review_ui.context import ctx

bp = Blueprint("agreement", __name__)
calibration = Blueprint("calibration", __name__)


@bp.route("/agreement")
def index() -> Any:
    """``GET /agreement``: the agreement page of the experiment's judge with the human labels."""
    c = ctx()
    report = agreement_report(c.store, c.exp, c.fingerprint, c.judge_id, c.experiment.variant_names)
    return render_template(
        "agreement.html",
        report=report,
        team=team_report(c.store, c.exp),
        overlap=c.experiment.review.overlap,
        judge=c.judge_id,
    )


def _calibration() -> Any:
    c = ctx()
    return calibration_report(c.store, c.exp, c.fingerprint, c.judge_id, c.experiment.variant_names)


@calibration.route("/calibration", endpoint="index")
def calibration_page() -> Any:
    """``GET /calibration``: where judge and humans disagree, by token, and the kappa trend."""
    c = ctx()
    report = _calibration()
    return render_template(
        "calibration.html",
        report=report,
        points=trend_points(report.trend),
        pinned=pinned_set(c.store, c.exp, c.judge_id),
        judge=c.judge_id,
    )


@calibration.route("/calibration/export", methods=["POST"])
def export() -> Any:
    """Pin the current disagreements as the judge's next few-shot set (one click)."""
    c = ctx()
    pinned = export_few_shot(c.store, c.exp, c.judge_id, _calibration(), by=g.user.name)
    flash(
        f"{len(pinned.prompt_ids)} prompt(s) pinned as the few-shot set of judge {c.judge_id}: "
        "its next verdicts use them first.",
        "ok",
    )
    return redirect(url_for("calibration.index"))
