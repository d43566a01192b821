"""Fixtures of the review-UI tests: a small experiment with real records in an FsStore,
a real Redis (``redis_url`` from tests/fixtures/servers.py), a real Celery app on it, and
the Flask app with its test client (Flask tutorial style), and for the browser tests the app
on a loopback port and a real Chromium page."""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from werkzeug.serving import make_server

from common.experiment import Experiment
from common.review_queue import ReviewQueue
from common.settings import Settings, StoreSettings
from common.store import FsStore
from tests.conftest import REPO, require
from tests.fixtures.data import (
    DIVERGENT,
    MILD,
    TEXT_DIVERGENT,
    TEXT_LOW,
    TEXT_MILD,
    Seeded,
    seed_prompt,
)

PASSWORD = "correct-horse-battery"


@pytest.fixture
def settings(tmp_path: Path, redis_url: str, experiment: Experiment) -> Settings:
    return Settings(
        home=tmp_path / "home",
        broker_url=redis_url,
        store=StoreSettings(root=tmp_path / "store"),
        experiment=Path(experiment.source or ""),
    )


@pytest.fixture
def seeded(store: FsStore, experiment: Experiment, queue: ReviewQueue) -> dict[str, Seeded]:
    """Three prompts in the review queue: divergent first, then by evil score."""
    prompts = {
        "divergent": seed_prompt(store, experiment, TEXT_DIVERGENT, DIVERGENT),
        "mild": seed_prompt(store, experiment, TEXT_MILD, MILD),
        "low": seed_prompt(store, experiment, TEXT_LOW, MILD),
    }
    queue.push(prompts["low"].pid, divergent=False, evil_score=0.05)
    queue.push(prompts["divergent"].pid, divergent=True, evil_score=0.61)
    queue.push(prompts["mild"].pid, divergent=False, evil_score=0.3)
    return prompts


@pytest.fixture
def app(
    settings: Settings, store: FsStore, redis_client: redis.Redis, experiment: Experiment
) -> Any:
    from common.celery_app import make_app
    from services.review_ui import create_app

    return create_app(
        settings,
        store=store,
        redis=redis_client,
        testing=True,
        experiment=experiment,
        celery=make_app(settings),
    )


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


@pytest.fixture
def users(store: FsStore) -> list[str]:
    from services.review_ui.users import add_user

    for name in ("alice", "bob"):
        add_user(store, name, PASSWORD)
    return ["alice", "bob"]


def csrf_token(client: Any, path: str = "/login") -> str:
    html = client.get(path, follow_redirects=True).get_data(as_text=True)
    found = re.search(r'name="csrf-token" content="([^"]+)"', html)
    assert found, f"no csrf token in {path}"
    return found.group(1)


class Auth:
    """Log in and out through the real login form (CSRF token included)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def login(self, name: str = "alice", password: str = PASSWORD) -> Any:
        token = csrf_token(self.client)
        return self.client.post(
            "/login", data={"username": name, "password": password, "csrf_token": token}
        )

    def logout(self) -> Any:
        token = csrf_token(self.client, "/")
        return self.client.post("/logout", data={"csrf_token": token})

    def post_json(self, path: str, body: Any) -> Any:
        """A JSON POST as the page sends it: CSRF token in the X-CSRFToken header."""
        return self.client.post(
            path, json=body, headers={"X-CSRFToken": csrf_token(self.client, "/")}
        )


@pytest.fixture
def auth(client: Any, users: list[str]) -> Auth:
    return Auth(client)


def queued_tasks(client: redis.Redis, queue: str) -> list[tuple[str, dict[str, Any]]]:
    """(task name, kwargs) of the Celery messages waiting in a Redis-backed queue."""
    out = []
    for raw in client.lrange(queue, 0, -1):
        msg = json.loads(raw)
        args, kwargs, _ = json.loads(base64.b64decode(msg["body"]))
        assert args == []
        out.append((msg["headers"]["task"], kwargs))
    return out


# -- real Chromium (tests marked browser) -------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture
def live_server(app: Any) -> Iterator[str]:
    """The app on a loopback port (werkzeug, threaded), for the browser."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(5)


@pytest.fixture
def chromium() -> Iterator[Any]:
    """A headless Chromium (playwright); each ``new_page`` is a session of its own."""
    require(Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "the playwright package is missing: run `make install`")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def new_page(browser: Any) -> tuple[Any, list[str]]:
    """A page in a fresh browser context (its own cookies: one reviewer's session) and the
    script errors it reports."""
    page = browser.new_context(viewport={"width": 1440, "height": 860}).new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    return page, errors


@pytest.fixture
def browser_page(chromium: Any) -> Iterator[tuple[Any, list[str]]]:
    """A Chromium page and the script errors it reports."""
    page, errors = new_page(chromium)
    yield page, errors
