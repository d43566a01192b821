"""A prompt's analysis: feature rankings and the circuit-tracer graph viewer, behind the login.

The viewer's HTML/JS ships inside the installed circuit-tracer package
(``circuit_tracer/frontend/assets``); we serve those files ourselves, under
``/p/<pid>/graph/``, and answer the two data paths the viewer fetches
(``./data/graph-metadata.json`` and ``./graph_data/<slug>.json``) from the object store.
circuit-tracer's own server is never started (it binds every interface, unauthenticated).

The graph JSON comes from ``services.attribution.viewer.export_stored`` (imported lazily:
it needs circuit-tracer and the model's tokenizer); without a stored graph, or without that
module, the page says "no graph yet".
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from flask import Blueprint, abort, jsonify, render_template, send_from_directory

from common.diff import PromptDiff, prompt_diff
from common.errors import AnalysisError
from common.labels import resolve_labels
from common.records import GraphManifest
from common.store import NotFound
from common.store import keys as K
from services.review_ui.context import ReviewContext, ctx
from services.review_ui.review import PromptView, load_prompt, load_prompt_view

log = logging.getLogger(__name__)
bp = Blueprint("graphs", __name__)

VIEWER_MODULE = "services.attribution.viewer"
FEATURE_ROWS = 40


@lru_cache(maxsize=1)
def viewer_assets() -> Path | None:
    """The viewer's asset folder inside the installed circuit-tracer (found without importing
    circuit-tracer, which would pull in torch)."""
    spec = importlib.util.find_spec("circuit_tracer")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "frontend" / "assets"
    return path if (path / "index.html").is_file() else None


class NoGraph(LookupError):
    """No viewer graph for this prompt and variant (yet); the message says why."""


def viewer_graph(pid: str, variant: str) -> dict[str, Any]:
    """The viewer JSON of one graph, exported once per (fingerprint, prompt, variant) by the
    attribution service into ``<home>/cache/viewer`` (graphs never change for a fingerprint)."""
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
    graph: dict[str, Any] = json.loads(cached.read_text())
    return graph


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
    _checked(pid)
    c = ctx()
    view = load_prompt_view(c, pid)
    return render_template(
        "analysis.html",
        view=view,
        diffs=diffs(view),
        labels_changed=labels_changed(c, view),
        rows=FEATURE_ROWS,
        viewer_available=viewer_assets() is not None,
    )


@bp.route("/p/<pid>/graph/")
def viewer_index(pid: str) -> Any:
    _checked(pid)
    assets = viewer_assets()
    if assets is None:
        abort(404, description="circuit-tracer's viewer files are not installed")
    return send_from_directory(assets, "index.html", max_age=0)


@bp.route("/p/<pid>/graph/data/graph-metadata.json")
def viewer_metadata(pid: str) -> Any:
    """The list of graphs the viewer offers: one per variant that has a stored graph."""
    _checked(pid)
    c = ctx()
    prompt = load_prompt(c, pid)
    graphs = []
    for variant in c.experiment.variant_names:
        key = K.graph_manifest(c.exp, pid, c.fingerprint, variant)
        try:
            manifest = c.store.get_record(key, GraphManifest)
        except NotFound:
            continue
        graphs.append(
            {
                "slug": variant,
                "scan": manifest.scan or c.experiment.transcoders.path,
                "prompt": prompt.text,
                "title_prefix": f"[{variant}]",
            }
        )
    return jsonify(graphs=graphs)


@bp.route("/p/<pid>/graph/graph_data/<variant>.json")
def viewer_graph_data(pid: str, variant: str) -> Any:
    _checked(pid)
    if variant not in ctx().experiment.variants:
        abort(404, description=f"unknown variant {variant!r}")
    try:
        graph = viewer_graph(pid, variant)
    except NoGraph as e:
        abort(404, description=str(e))
    except Exception as e:  # the export needs the model's tokenizer and config: say what broke
        log.exception("viewer export of %s/%s failed", pid, variant)
        abort(500, description=f"exporting the graph for the viewer failed: {e}")
    meta = graph.get("metadata")
    if isinstance(meta, dict):
        graph = {**graph, "metadata": {**meta, "slug": variant}}
    return jsonify(graph)


@bp.route("/p/<pid>/graph/<path:asset>")
def viewer_asset(pid: str, asset: str) -> Any:
    _checked(pid)
    assets = viewer_assets()
    if assets is None or asset.endswith(".py"):
        abort(404)
    return send_from_directory(assets, asset)
