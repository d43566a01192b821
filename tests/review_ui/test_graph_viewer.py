"""The graph viewer's data behind our login, on a real stored graph (tiny random model):
emc's own view document and circuit-tracer's viewer JSON as a download."""

from __future__ import annotations

import json
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
    view = client.get(f"/p/{pid}/graph/view.json").get_json()
    assert view["variants"] == ["base"] and view["diffs"] == [] and view["prompt_id"] == pid
    kinds = {n["kind"] for n in view["nodes"]}
    assert {"feature", "token", "logit"} <= kinds and view["edges"]
    assert len([n for n in view["nodes"] if n["kind"] == "token"]) == manifest.n_pos
    resp = client.get(f"/p/{pid}/graph/base.circuit-tracer.json")
    assert resp.status_code == 200, resp.get_data(as_text=True)[:500]
    assert "attachment" in resp.headers["Content-Disposition"]
    doc = json.loads(resp.get_data())
    assert doc["metadata"]["prompt"] == text
    assert doc["nodes"] and doc["links"]
    cached = settings.cache_dir / "viewer" / exp.name / exp.fingerprint / pid / "base.json"
    assert cached.is_file()
    assert json.loads(client.get(f"/p/{pid}/graph/base.circuit-tracer.json").get_data()) == doc
    missing = client.get(f"/p/{pid}/graph/adapted.circuit-tracer.json")
    assert missing.status_code == 404 and "no graph yet" in missing.get_data(as_text=True)
    # logged out: neither the viewer's data nor the download
    anon = app.test_client()
    assert anon.get(f"/p/{pid}/graph/view.json").status_code == 302
    assert anon.get(f"/p/{pid}/graph/base.circuit-tracer.json").status_code == 302
