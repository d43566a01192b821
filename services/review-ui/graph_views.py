"""A prompt's analysis: feature rankings and emc's own graph viewer, behind the login.

The viewer (``/p/<pid>/graph/``, ``templates/graph.html`` + ``static/graph.js``) draws the
document of :func:`common.graph.view.stored_graph_view`, built from the stored graph
artifacts on request (``/p/<pid>/graph/view.json``). Its only library, d3, ships in
``static/vendor`` (versions, licenses and checksums in ``static/vendor/manifest.json``):
nothing loads from another host, and the graphs blueprint runs under the UI's strictest
content security policy (``app.STRICT_CSP``). Clicking a feature opens its feature page,
``/features/<variant>/<layer>/<feature>``.

circuit-tracer's viewer JSON stays available as a download per variant
(``/p/<pid>/graph/<variant>.circuit-tracer.json``), exported by
``services.attribution.viewer.export_stored`` (imported lazily by name: it needs
circuit-tracer and the model's tokenizer) for Neuronpedia-style tools. circuit-tracer's
frontend itself is not served: it loads its scripts from other hosts.
"""

from __future__ import annotations

import importlib
import logging
import tempfile
from pathlib import Path
from typing import Any

from flask import Blueprint, abort, jsonify, render_template, request, send_file

from common.diff import PromptDiff, prompt_diff
from common.errors import AnalysisError
from common.feature_index import ALIGNED_COSINE
from common.labels import resolve_labels
from common.store import NotFound
from common.store import keys as K
from services.review_ui.context import ReviewContext, ctx
from services.review_ui.features import direction_cosines
from services.review_ui.review import PromptView, load_prompt, load_prompt_view

log = logging.getLogger(__name__)
bp = Blueprint("graphs", __name__)

VIEWER_MODULE = "services.attribution.viewer"
FEATURE_ROWS = 40
#: the feature page of a transcoder feature (another blueprint's URL: the contract)
FEATURE_PAGE = "/features/{variant}/{layer}/{feature}"


class NoGraph(LookupError):
    """No viewer graph for this prompt and variant (yet); the message says why."""


def viewer_graph_file(pid: str, variant: str) -> Path:
    """circuit-tracer's viewer JSON of one graph, exported once per (fingerprint, prompt,
    variant) by the attribution service into ``<home>/cache/viewer`` (graphs never change
    for a fingerprint)."""
    c = ctx()
    if not c.store.exists(K.graph_manifest(c.exp, pid, c.fingerprint, variant)):
        raise NoGraph(f"no graph yet for {pid} / {variant}")
    cached = c.settings.cache_dir / "viewer" / c.exp / c.fingerprint / pid / f"{variant}.json"
    if not cached.is_file():
        try:
            viewer = importlib.import_module(VIEWER_MODULE)
        except ModuleNotFoundError as e:
            if e.name and VIEWER_MODULE.startswith(e.name):
                raise NoGraph(f"no graph viewer export installed ({VIEWER_MODULE})") from e
            raise
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
            try:
                path = viewer.export_stored(
                    c.store, c.experiment, pid, variant, Path(tmp), fingerprint=c.fingerprint
                )
            except NotFound as e:
                raise NoGraph(f"no graph yet for {pid} / {variant}: {e}") from e
            Path(path).replace(cached)
    return cached


def _checked(pid: str) -> None:
    try:
        load_prompt(ctx(), pid)
    except NotFound:
        abort(404, description=f"no prompt {pid} in experiment {ctx().exp}")


def labels_changed(c: ReviewContext, view: PromptView) -> dict[str, bool]:
    """Per variant with a ranking: whether the labels it would use now (human where present,
    else the judge's) differ from those it was ranked with. The same hash on both sides:
    the ranking's ``labels_version`` is :attr:`common.labels.TokenLabels.version`."""
    out: dict[str, bool] = {}
    for v in view.variants:
        if v.features is None:
            continue
        try:
            now = resolve_labels(c.store, c.exp, view.prompt.id, c.fingerprint, v.name, c.judge_id)
        except AnalysisError:  # no labels at all any more: nothing to compare
            continue
        out[v.name] = now.version != v.features.labels_version
    return out


def graph_variants(c: ReviewContext, pid: str) -> list[str]:
    """The variants of a prompt with a stored graph, the reference first."""
    return [
        v
        for v in c.experiment.variant_names
        if c.store.exists(K.graph_manifest(c.exp, pid, c.fingerprint, v))
    ]


def diffs(view: PromptView, top: int = 20) -> list[PromptDiff]:
    """The diff ranking of each ranked variant against the ranked reference (none when the
    reference has no ranking, e.g. nothing to explain there)."""
    ref = next((v for v in view.variants if v.reference), None)
    if ref is None or ref.features is None:
        return []
    return [
        prompt_diff(ref.features, v.features, top=top)
        for v in view.variants
        if not v.reference and v.features is not None
    ]


@bp.route("/p/<pid>/analysis")
def analysis(pid: str) -> Any:
    """``GET /p/<pid>/analysis``: a prompt's rankings, shares and links to its graphs."""
    _checked(pid)
    c = ctx()
    view = load_prompt_view(c, pid, rankings="digest")
    shown = [
        (f.layer, f.feature)
        for v in view.variants
        if v.features is not None
        for f in v.features.features[:FEATURE_ROWS]
    ]
    return render_template(
        "analysis.html",
        view=view,
        cosines=direction_cosines(c.store, c.exp, c.fingerprint, shown),
        aligned_cosine=ALIGNED_COSINE,
        diffs=diffs(view),
        labels_changed=labels_changed(c, view),
        rows=FEATURE_ROWS,
    )


@bp.route("/p/<pid>/graph/")
def viewer(pid: str) -> Any:
    """emc's graph viewer page (its data: :func:`view_data`)."""
    _checked(pid)
    c = ctx()
    return render_template(
        "graph.html",
        prompt=load_prompt(c, pid),
        variants=graph_variants(c, pid),
        feature_url=request.script_root + FEATURE_PAGE,
    )


@bp.route("/p/<pid>/graph/view.json")
def view_data(pid: str) -> Any:
    """The viewer's document: every stored graph of the prompt on the same nodes."""
    _checked(pid)
    from common.graph.view import NoGraphToView, stored_graph_view

    c = ctx()
    try:
        view = stored_graph_view(c.store, c.experiment, pid, fingerprint=c.fingerprint)
    except NoGraphToView as e:
        abort(404, description=str(e))
    except AnalysisError as e:
        abort(409, description=f"the graphs of {pid} cannot be drawn: {e.reason}")
    return jsonify(view.model_dump(mode="json"))


@bp.route("/p/<pid>/graph/<variant>.circuit-tracer.json")
def circuit_tracer_json(pid: str, variant: str) -> Any:
    """circuit-tracer's viewer JSON of one graph, as a download."""
    _checked(pid)
    if variant not in ctx().experiment.variants:
        abort(404, description=f"unknown variant {variant!r}")
    try:
        path = viewer_graph_file(pid, variant)
    except NoGraph as e:
        abort(404, description=str(e))
    except Exception as e:  # the export needs the model's tokenizer and config: say what broke
        log.exception("viewer export of %s/%s failed", pid, variant)
        abort(500, description=f"exporting the graph for circuit-tracer failed: {e}")
    return send_file(
        path,
        mimetype="application/json",
        as_attachment=True,
        download_name=f"{pid}-{variant}.circuit-tracer.json",
        max_age=0,
    )
