"""Feature pages: ``/features/<variant>/<layer>/<feature>`` (HTML) and its JSON under ``/api``.

Linked from every ranking and from the graph viewer's feature nodes; a thin shell over
:func:`services.review_ui.features.feature_page`.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, jsonify, render_template

from common.feature_index import FeatureIndex
from common.store import NotFound
from services.review_ui.context import ctx
from services.review_ui.features import FeaturePage, feature_page

bp = Blueprint("features", __name__)


def _page(variant: str, layer: int, feature: int) -> FeaturePage:
    c = ctx()
    if variant not in c.experiment.variant_names:
        abort(404, description=f"no variant {variant!r} in experiment {c.exp}")
    index = FeatureIndex(c.queue.redis, c.exp, c.fingerprint)
    try:
        return feature_page(
            c.store,
            index,
            c.exp,
            c.fingerprint,
            c.experiment.variant_names,
            variant,
            layer,
            feature,
        )
    except NotFound as e:
        abort(404, description=str(e))


@bp.route("/features/<variant>/<int:layer>/<int(signed=True):feature>")
def page(variant: str, layer: int, feature: int) -> Any:
    """``GET /features/<variant>/<layer>/<feature>``: what the feature is; 404 if it never fired."""
    return render_template("feature.html", page=_page(variant, layer, feature))


@bp.route("/api/features/<variant>/<int:layer>/<int(signed=True):feature>")
def api(variant: str, layer: int, feature: int) -> Any:
    """The feature page as JSON."""
    return jsonify(_page(variant, layer, feature).to_json())
