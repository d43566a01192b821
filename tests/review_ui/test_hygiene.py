"""Session and account hygiene of the review UI: server-side logout, login limits,
owner-only password files, the analysis page's "labels changed since", labels saved while
Redis is down, and corrupt artifacts named on the page."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
import redis

from common.experiment import Experiment
from common.labels import resolve_labels
from common.records import FeatureRanking, RankedFeature, Status
from common.review_queue import ReviewQueue
from common.settings import Settings
from common.store import FsStore
from common.store import keys as K
from tests.fixtures.data import Seeded, judge_labels
from tests.fixtures.servers import free_port
from tests.review_ui.conftest import PASSWORD, Auth


def test_logout_ends_the_session_on_the_server(app: Any, auth: Auth, client: Any) -> None:
    auth.login()
    assert client.get("/").status_code == 200
    stolen = client.get_cookie("emc_review").value  # a copy of the cookie, e.g. from a proxy log
    assert auth.logout().status_code == 302
    thief = app.test_client()
    thief.set_cookie("emc_review", stolen)
    resp = thief.get("/")
    assert resp.status_code == 302 and resp.headers["Location"].startswith("/login")


def test_sessions_are_independent(app: Any, users: list[str]) -> None:
    first, second = Auth(app.test_client()), Auth(app.test_client())
    first.login()
    second.login()
    first.logout()
    assert second.client.get("/").status_code == 200  # logging out one device keeps the other


def test_wrong_passwords_are_limited_per_user(auth: Auth, client: Any) -> None:
    for _ in range(5):
        assert auth.login("alice", "wrong-password").status_code == 401
    resp = auth.login("alice", PASSWORD)  # the right password, but too late
    assert resp.status_code == 429 and "Too many failed logins" in resp.get_data(as_text=True)
    assert client.get("/").status_code == 302
    assert auth.login("bob", PASSWORD).status_code == 302  # other users are not locked out


def test_wrong_passwords_are_limited_per_address(auth: Auth) -> None:
    for i in range(20):
        assert auth.login(f"guess{i}", "wrong-password").status_code == 401
    assert auth.login("alice", PASSWORD).status_code == 429


def test_a_good_login_forgets_the_users_failures(auth: Auth) -> None:
    for _ in range(4):
        auth.login("alice", "wrong-password")
    assert auth.login("alice", PASSWORD).status_code == 302
    auth.logout()
    for _ in range(4):
        assert auth.login("alice", "wrong-password").status_code == 401
    assert auth.login("alice", PASSWORD).status_code == 302


def test_password_hash_and_session_files_are_owner_only(
    store: FsStore, users: list[str], auth: Auth
) -> None:
    auth.login()
    files = [store.root / "users" / "alice.json", *(store.root / "ui" / "sessions").glob("*.json")]
    assert len(files) == 2
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def _ranking(c_store: FsStore, exp: Experiment, pid: str, version: str) -> None:
    c_store.put_json(
        K.features(exp.name, pid, exp.fingerprint, "adapted"),
        FeatureRanking(
            prompt_id=pid,
            variant="adapted",
            fingerprint=exp.fingerprint,
            labels_version=version,
            label_source="judge",
            evil_token_ids=[1],
            safe_token_ids=[2],
            features=[
                RankedFeature(
                    layer=1,
                    pos=2,
                    feature=3,
                    token=" a",
                    score=0.5,
                    evil=0.5,
                    safe=0.0,
                    activation=1.0,
                )
            ],
        ),
    )


def test_analysis_page_says_labels_changed_only_until_re_ranked(
    client: Any, auth: Auth, seeded: dict[str, Seeded], store: FsStore, experiment: Experiment
) -> None:
    auth.login()
    p = seeded["divergent"]

    def current() -> str:
        return resolve_labels(
            store,
            experiment.name,
            p.pid,
            experiment.fingerprint,
            "adapted",
            experiment.judge.judge_id,
        ).version

    _ranking(store, experiment, p.pid, current())  # ranked with the judge's labels
    page = f"/p/{p.pid}/analysis"
    assert "labels changed since" not in client.get(page).get_data(as_text=True)
    labels = judge_labels(p.spec)
    labels[0] = {**labels[0], "label": "safe" if labels[0]["label"] != "safe" else "evil"}
    assert auth.post_json(f"/api/p/{p.pid}/labels", {"labels": labels}).status_code == 200
    assert "labels changed since" in client.get(page).get_data(as_text=True)
    _ranking(store, experiment, p.pid, current())  # the analysis re-ranked with the new labels
    assert "labels changed since" not in client.get(page).get_data(as_text=True)


class Flaky:
    """A task sender that fails while ``down`` (the broker is the Redis that is down)."""

    def __init__(self) -> None:
        self.down = True
        self.sent: list[tuple[str, Any]] = []

    def send_task(self, name: str, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        if self.down:
            raise ConnectionRefusedError("broker down")
        self.sent.append((name, kwargs))
        return None


def test_label_saved_while_redis_is_down_reaches_the_queue_when_it_returns(
    settings: Settings,
    store: FsStore,
    experiment: Experiment,
    seeded: dict[str, Seeded],
    users: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from common.system.broker import start_redis_server
    from services.review_ui import create_app, reconcile

    monkeypatch.setattr(reconcile, "EVERY_S", 0.0)
    port = free_port()
    down = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1)
    sender = Flaky()
    app = create_app(settings, store=store, redis=down, experiment=experiment, celery=sender)
    a = Auth(app.test_client())
    assert a.login().status_code == 302  # logging in needs no Redis
    p = seeded["mild"]
    out = a.post_json(f"/api/p/{p.pid}/labels", {"labels": judge_labels(p.spec)}).get_json()
    assert out["saved"] is True and "review queue was not updated" in out["warnings"][0]
    assert store.exists(K.ui_pending(experiment.name, p.pid))

    server = start_redis_server(port, tmp_path / "redis-back", appendonly=False)
    try:
        # Redis is back (empty here: the seeded queue lived in the test's other Redis)
        back = ReviewQueue(redis.Redis(host="127.0.0.1", port=port), experiment.name)
        back.push(p.pid, divergent=False, evil_score=0.3)
        sender.down = False
        a.client.get("/healthz")  # any request: the UI reconciles what is pending
        assert back.status(p.pid) == Status.labeled and back.entry(p.pid) is None
        assert sender.sent == [
            ("emc.analysis.rank_prompt", {"exp": experiment.name, "prompt_id": p.pid})
        ]
        assert not store.exists(K.ui_pending(experiment.name, p.pid))
    finally:
        server.stop()


def test_corrupt_logits_are_named_on_the_page(
    client: Any, auth: Auth, seeded: dict[str, Seeded], store: FsStore, experiment: Experiment
) -> None:
    auth.login()
    p = seeded["mild"]
    key = K.logits(experiment.name, p.pid, experiment.fingerprint, "base")
    (store.root / key).write_bytes(b'{"schema_version": 1, "tok')
    resp = client.get(f"/p/{p.pid}")
    html = resp.get_data(as_text=True)
    assert resp.status_code == 500 and key in html and f"emc retry --step logits {p.pid}" in html
    api = client.get(f"/api/p/{p.pid}")
    assert api.status_code == 500 and key in api.get_json()["error"]


def test_login_limits_hold_while_redis_is_down() -> None:
    import time

    from services.review_ui.login_limits import LoginLimits

    down = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
    limits = LoginLimits(down)
    t0 = time.monotonic()
    for _ in range(5):
        assert limits.wait_s("alice", "10.0.0.1") == 0
        limits.failed("alice", "10.0.0.1")
    assert limits.wait_s("alice", "10.0.0.1") > 0  # counted in this process
    assert limits.wait_s("bob", "10.0.0.2") == 0
    # redis-py retries a refused connection for ~4 s: once here, not at each of the 11 calls
    assert time.monotonic() - t0 < 10
