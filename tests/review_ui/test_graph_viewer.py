"""The circuit-tracer viewer behind our login, on a real stored graph (tiny random model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis

from common.experiment import load_experiment
from common.records import Prompt
from common.settings import Settings, StoreSettings
from common.store import FsStore
from common.store import keys as K
from tests.review_ui.conftest import Auth


@pytest.mark.slow
def test_viewer_serves_a_stored_graph(tmp_path: Path, redis_url: str) -> None:
    from common.celery_app import make_app
    from common.graph.artifact import save_graph
    from services.attribution.runtime import Runtime
    from services.review_ui import create_app
    from services.review_ui.users import add_user
    from tests.fixtures.tiny import PROMPTS, build_tiny

    exp = load_experiment(build_tiny(tmp_path / "tiny") / "experiment.yaml")
    store = FsStore(tmp_path / "store")
    runtime = Runtime(exp, cache_dir=tmp_path / "models")
    text = PROMPTS[2]
    manifest = save_graph(store, exp, runtime.attribute(text, "base"))
    prompt = Prompt.new(text, source="test")
    assert manifest.prompt_id == prompt.id
    store.put_json(K.prompt(exp.name, prompt.id), prompt)
    add_user(store, "alice", "correct-horse-battery")

    settings = Settings(
        home=tmp_path / "home", broker_url=redis_url, store=StoreSettings(root=tmp_path / "store")
    )
    app: Any = create_app(
        settings,
        store=store,
        redis=redis.Redis.from_url(redis_url),
        experiment=exp,
        celery=make_app(settings),
    )
    client = app.test_client()
    Auth(client).login()
    pid = prompt.id

    html = client.get(f"/p/{pid}/analysis").get_data(as_text=True)
    assert "open attribution graph" in html and "no graph yet" in html  # base yes, adapted no
    meta = client.get(f"/p/{pid}/graph/data/graph-metadata.json").get_json()
    assert [g["slug"] for g in meta["graphs"]] == ["base"]
    resp = client.get(f"/p/{pid}/graph/graph_data/base.json")
    assert resp.status_code == 200, resp.get_data(as_text=True)[:500]
    doc = resp.get_json()
    assert doc["metadata"]["slug"] == "base" and doc["metadata"]["prompt"] == text
    assert doc["nodes"] and doc["links"]
    cached = settings.cache_dir / "viewer" / exp.name / exp.fingerprint / pid / "base.json"
    assert cached.is_file()
    assert client.get(f"/p/{pid}/graph/graph_data/base.json").get_json() == doc
    missing = client.get(f"/p/{pid}/graph/graph_data/adapted.json")
    assert missing.status_code == 404 and "no graph yet" in missing.get_data(as_text=True)
    # logged out: neither the viewer nor the graph data
    anon = app.test_client()
    assert anon.get(f"/p/{pid}/graph/graph_data/base.json").status_code == 302
