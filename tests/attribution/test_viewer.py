"""Viewer export: circuit-tracer's JSON files from a stored graph, offline, parseable."""

from __future__ import annotations

import json
from pathlib import Path

from common.graph.artifact import save_graph
from common.store import FsStore
from services.attribution.runtime import Runtime
from services.attribution.viewer import export_stored
from tests.fixtures.tiny import PROMPTS


def test_export_stored_graph(tiny_rt: Runtime, tmp_path: Path) -> None:
    store = FsStore(tmp_path / "store")
    graph = tiny_rt.attribute(PROMPTS[2], "base")
    m = save_graph(store, tiny_rt.exp, graph)
    out = tmp_path / "viewer"
    path = export_stored(
        store, tiny_rt.exp, m.prompt_id, "base", out, fingerprint=tiny_rt.fingerprint
    )
    assert path == out / f"{m.prompt_id}-base.json"
    doc = json.loads(path.read_text())
    meta = json.loads((out / "graph-metadata.json").read_text())
    assert [g["slug"] for g in meta["graphs"]] == [f"{m.prompt_id}-base"]
    assert doc["metadata"]["prompt"] == PROMPTS[2]
    assert len(doc["metadata"]["prompt_tokens"]) == m.n_pos
    ids = [n["node_id"] for n in doc["nodes"]]
    assert len(ids) == len(set(ids))  # no error/feature id collision (upstream issue 78)
    kinds = {n["feature_type"] for n in doc["nodes"]}
    assert {"embedding", "logit", "cross layer transcoder"} <= kinds
    logits = [n for n in doc["nodes"] if n["feature_type"] == "logit"]
    assert len(logits) == m.n_logits
    assert all(e["source"] in ids and e["target"] in ids for e in doc["links"])
    assert doc["links"], "a pruned graph still has edges"
    errors = [n for n in doc["nodes"] if n["feature_type"] == "mlp reconstruction error"]
    assert all(n["node_id"].split("_")[1] == "-1" for n in errors)
    feature_js = {
        n["jsNodeId"] for n in doc["nodes"] if n["feature_type"] != "mlp reconstruction error"
    }
    assert not feature_js & {n["jsNodeId"] for n in errors}
