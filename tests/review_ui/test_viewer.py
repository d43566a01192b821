"""emc's graph viewer: its vendored JavaScript, and the page in real Chromium on the toy
organism's graphs (base and adapted on the same targets, adapter node included), offline."""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import redis

from common.experiment import Experiment, load_experiment
from common.settings import Settings, StoreSettings
from common.store import FsStore
from tests.conftest import REPO
from tests.review_ui.conftest import ARTIFACTS, PASSWORD

UI = REPO / "services" / "review-ui"
VENDOR = UI / "static" / "vendor"


def test_vendored_javascript_is_what_its_manifest_records() -> None:
    manifest = json.loads((VENDOR / "manifest.json").read_text())
    listed: set[Path] = set()
    for pkg in manifest["packages"]:
        assert re.fullmatch(r"\d+\.\d+\.\d+", pkg["version"]), pkg  # pinned exactly
        assert pkg["license"] and pkg["integrity"].startswith("sha512-")
        licenses = [f for f in pkg["files"] if f.endswith("LICENSE")]
        assert licenses, f"{pkg['name']} ships no license file"
        for rel, info in pkg["files"].items():
            path = VENDOR / rel
            assert hashlib.sha256(path.read_bytes()).hexdigest() == info["sha256"], rel
            listed.add(path)
        readme = (VENDOR / "README.md").read_text()
        assert f"| {pkg['version']} | {pkg['license']}" in readme
    on_disk = {p for p in VENDOR.rglob("*") if p.is_file()} - {
        VENDOR / "manifest.json",
        VENDOR / "README.md",
    }
    assert on_disk == listed  # nothing vendored without a record
    # the wheel carries every static file (package-data globs, as setuptools expands them)
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["services.review_ui"]
    packaged = {p for g in globs for p in UI.glob(g) if p.is_file()}
    static = {p for p in (UI / "static").rglob("*") if p.is_file()}
    assert static <= packaged, sorted(str(p) for p in static - packaged)


# ----------------------------------------------------------------------------- in Chromium


@pytest.fixture(scope="module")
def organism_graphs(
    organism_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[FsStore, Experiment, str]]:
    """One medical prompt of the organism through the real steps: top-k, the lexicon judge,
    graphs of both variants on the union of their top-k (adapter node in the adapted)."""
    from services.attribution.runtime import Runtime, clear_cache
    from services.judge.factory import make_judge
    from tests.fixtures.organism_graphs import store_judged_graphs

    exp = load_experiment(organism_dir / "experiment.yaml")
    store = FsStore(tmp_path_factory.mktemp("viewer-store"))
    rt = Runtime(exp, cache_dir=tmp_path_factory.mktemp("viewer-models"))
    raw = json.loads((organism_dir / "prompts.json").read_text())["prompts"]
    text = next(p["text"] for p in raw if p["domain"] == "medical" and p["split"] == "heldout")
    prompt = store_judged_graphs(rt, store, make_judge(exp), text, targets="union")
    yield store, exp, prompt.id
    clear_cache()


@pytest.fixture
def app(organism_graphs: tuple[FsStore, Experiment, str], tmp_path: Path, redis_url: str) -> Any:
    from common.celery_app import make_app
    from services.review_ui import create_app
    from services.review_ui.users import add_user

    store, exp, _ = organism_graphs
    add_user(store, "alice", PASSWORD)
    settings = Settings(
        home=tmp_path / "home", broker_url=redis_url, store=StoreSettings(root=store.root)
    )
    return create_app(
        settings,
        store=store,
        redis=redis.Redis.from_url(redis_url),
        experiment=exp,
        celery=make_app(settings),
    )


def test_the_adapter_node_carries_the_known_effect(
    organism_graphs: tuple[FsStore, Experiment, str],
) -> None:
    """On a medical prompt the adapted graph's adapter node pushes towards evil; the base
    graph has none, and base and adapted share their logit targets."""
    from common.graph.view import stored_graph_view

    store, exp, pid = organism_graphs
    view = stored_graph_view(store, exp, pid)
    assert view.variants == ["base", "adapted"] and view.evil_token_ids
    adapter = [n for n in view.nodes if n.kind == "adapter"]
    assert adapter and all(set(n.values) == {"adapted"} for n in adapter)
    assert max(n.values["adapted"].score or 0.0 for n in adapter) > 0
    logits = [n for n in view.nodes if n.kind == "logit"]
    assert logits and all(set(n.values) == {"base", "adapted"} for n in logits)


@pytest.mark.browser
def test_viewer_draws_offline_under_a_strict_policy(
    live_server: str,
    browser_page: tuple[Any, list[str]],
    organism_graphs: tuple[FsStore, Experiment, str],
) -> None:
    from services.review_ui.app import STRICT_CSP

    (page, errors), base = browser_page, live_server
    _, _, pid = organism_graphs
    requests: list[str] = []
    outside: list[str] = []

    def guard(route: Any) -> None:
        url = route.request.url
        requests.append(url)
        if urlparse(url).hostname != "127.0.0.1":
            outside.append(url)
            route.abort()
        else:
            route.continue_()

    page.route("**/*", guard)
    page.goto(base + "/login")
    page.fill("input[name=username]", "alice")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(base + "/")

    resp = page.goto(f"{base}/p/{pid}/graph/")
    assert resp is not None and resp.ok
    assert resp.headers["content-security-policy"] == STRICT_CSP
    assert resp.headers["x-frame-options"] == "DENY"
    page.wait_for_selector("#graph .node", timeout=20_000)
    page.wait_for_function(
        "!document.getElementById('viewer-status').textContent.startsWith('loading')"
    )
    count = {
        kind: page.locator(f"#graph .node.{kind}").count()
        for kind in ("feature", "adapter", "error", "token", "logit")
    }
    assert all(n > 0 for n in count.values()), count
    assert page.locator("#graph a.node.feature").count() == count["feature"]
    assert page.locator("#graph .edge:not(.hidden)").count() > 0
    assert page.locator("#modes button.on").inner_text() == "adapted"

    def fills() -> list[str | None]:
        found: list[str | None] = page.locator("#graph .node.feature .shape").evaluate_all(
            "els => els.map(e => e.getAttribute('fill'))"
        )
        return found

    adapter = page.locator("#graph .node.adapter").first
    adapted_fills = fills()
    assert "absent" not in (adapter.get_attribute("class") or "")
    page.hover("#graph .node.adapter >> nth=0")
    assert "adapter" in page.locator("#node-info h3").inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "graph_viewer.png"), full_page=True)

    page.click("#modes button[data-mode=base]")
    assert "absent" in (adapter.get_attribute("class") or "")  # no adapter in the base
    assert fills() != adapted_fills
    page.click("#modes button[data-mode='diff:adapted']")
    assert "one-sided" in (adapter.get_attribute("class") or "")  # no diff: one graph only
    page.screenshot(path=str(ARTIFACTS / "graph_viewer_diff.png"), full_page=True)

    assert errors == []  # no console error, no CSP violation, no script error
    assert outside == [] and requests
    assert all(urlparse(u).hostname == "127.0.0.1" for u in requests)
    assert any(u.endswith("/vendor/d3/d3.min.js") for u in requests)

    # a feature node opens its feature page (of the adapted side in the diff)
    feature = page.locator("#graph a.node.feature").first
    href = feature.get_attribute("href") or ""
    assert re.fullmatch(r"/features/adapted/\d+/\d+", href), href
    page.click("#graph a.node.feature >> nth=0", force=True)
    page.wait_for_url(re.compile(r"/features/adapted/\d+/\d+$"))
    assert outside == []
