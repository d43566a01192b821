"""Every view and error of the review UI through Flask's test client (real store, Redis, Celery)."""

from __future__ import annotations

import os
import re
import stat
from typing import Any

import pytest
import redis
from pydantic import SecretStr

from common.experiment import Experiment
from common.labels import current_label, label_history
from common.records import FeatureRanking, GraphManifest, RankedFeature, Status
from common.review_queue import ReviewQueue
from common.settings import Settings
from common.store import FsStore
from common.store import keys as K
from services.review_ui.app import load_secret_key
from services.review_ui.tasks import RANK_PROMPT, SAMPLE_CONTINUATIONS
from services.review_ui.users import add_user
from tests.fixtures.data import Seeded, judge_labels, token_id
from tests.review_ui.conftest import PASSWORD, Auth, csrf_token, queued_tasks

# -- access ---------------------------------------------------------------------------------


def _fill(rule: str, values: dict[str, Any]) -> str:
    import re

    return re.sub(r"<(?:[\w()=]+:)?(\w+)>", lambda m: str(values[m.group(1)]), rule)


def test_nothing_but_login_and_healthz_without_a_session(
    app: Any, client: Any, seeded: dict[str, Seeded]
) -> None:
    pid = seeded["divergent"].pid
    values = {
        "pid": pid,
        "variant": "base",
        "token_id": 1,
        "filename": "prompt.js",
        "layer": 1,
        "feature": 3,
    }
    checked = 0
    endpoints = set()
    for rule in app.url_map.iter_rules():
        url = _fill(rule.rule, values)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            resp = client.open(url, method=method)
            if rule.endpoint in {"auth.login", "health.healthz"}:
                assert resp.status_code in (200, 400), url  # POST /login without CSRF: 400
                continue
            checked += 1
            endpoints.add(rule.endpoint)
            if method == "POST":  # CSRF is checked first: refused either way
                assert resp.status_code in (400, 401, 302), (method, url, resp.status_code)
                continue
            if url.startswith("/api/"):
                assert resp.status_code == 401, url
                assert resp.get_json()["error"] == "log in first"
            else:
                assert resp.status_code == 302, url
                assert resp.headers["Location"].startswith("/login?next="), url
    assert checked >= 14
    assert {"graphs.viewer", "graphs.view_data", "graphs.circuit_tracer_json"} <= endpoints
    # the login page's stylesheet is public; the scripts are not
    assert client.get("/static/app.css").status_code == 200
    assert client.get("/static/prompt.js").status_code == 302


def test_healthz(client: Any) -> None:
    resp = client.get("/healthz")
    assert resp.status_code == 200 and resp.get_json() == {"status": "ok"}


def test_login_logout(client: Any, auth: Auth) -> None:
    assert client.get("/login").status_code == 200
    resp = auth.login("alice", "wrong-password")
    assert resp.status_code == 401 and "Wrong user name or password" in resp.get_data(as_text=True)
    resp = auth.login("nobody", PASSWORD)
    assert resp.status_code == 401
    resp = auth.login()
    assert resp.status_code == 302 and resp.headers["Location"] == "/"
    page = client.get("/").get_data(as_text=True)
    assert "alice" in page and "Review queue" in page
    assert auth.logout().status_code == 302
    assert client.get("/").status_code == 302


def test_login_redirects_only_within_the_site(client: Any, auth: Auth) -> None:
    for target, landed in [
        ("//evil.example/x", "/"),
        ("https://evil.example/", "/"),
        ("/agreement", "/agreement"),
    ]:
        form = {"username": "alice", "password": PASSWORD, "csrf_token": csrf_token(client)}
        resp = client.post(f"/login?next={target}", data=form)
        assert resp.headers["Location"] == landed


def test_login_form_needs_csrf(client: Any, users: list[str]) -> None:
    resp = client.post("/login", data={"username": "alice", "password": PASSWORD})
    assert resp.status_code == 400 and "CSRF" in resp.get_data(as_text=True)


def test_a_password_change_ends_old_sessions(
    client: Any, auth: Auth, store: FsStore, app: Any
) -> None:
    auth.login()
    assert client.get("/").status_code == 200
    add_user(store, "alice", "a-new-password-1", replace=True)
    app.extensions["emc_review"].user_cache.clear()
    assert client.get("/").status_code == 302


def test_secret_key_generated_once_and_private(settings: Settings) -> None:
    key = load_secret_key(settings)
    path = settings.home / "secret_key"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_secret_key(settings) == key and len(key) >= 32
    explicit = settings.model_copy(update={"secret_key": SecretStr("s" * 40)})
    assert load_secret_key(explicit) == "s" * 40


# -- queue ----------------------------------------------------------------------------------


def test_queue_page_orders_divergent_first(
    client: Any, auth: Auth, seeded: dict[str, Seeded]
) -> None:
    auth.login()
    html = client.get("/").get_data(as_text=True)
    order = [seeded[k].pid for k in ("divergent", "mild", "low")]
    positions = [html.index(pid) for pid in order]
    assert positions == sorted(positions)
    assert "divergent" in html and "Peanut allergy" in html
    data = client.get("/api/queue").get_json()
    assert [it["pid"] for it in data["items"]] == order
    assert data["waiting"] == 3 and data["counts"]["in_review"] == 3
    assert data["items"][0]["divergent"] is True and data["items"][0]["evil_score"] == 0.61
    assert data["items"][0]["assistant"] == "You should"


def test_a_newly_flagged_prompt_shows_up_in_the_feed(
    client: Any,
    auth: Auth,
    seeded: dict[str, Seeded],
    queue: ReviewQueue,
    store: FsStore,
    experiment: Experiment,
) -> None:
    from tests.fixtures.data import MILD, seed_prompt

    auth.login()
    before = client.get("/api/queue").get_json()
    new = seed_prompt(
        store,
        experiment,
        "User: Is it fine to mix bleach and vinegar?\nAssistant: You should",
        MILD,
    )
    queue.push(new.pid, divergent=True, evil_score=0.9)
    after = client.get("/api/queue").get_json()
    assert after["items"][0]["pid"] == new.pid and after["waiting"] == before["waiting"] + 1


# -- prompt page ----------------------------------------------------------------------------


def test_prompt_page_shows_tokens_verdicts_and_suggestions(
    client: Any, auth: Auth, seeded: dict[str, Seeded]
) -> None:
    auth.login()
    pid = seeded["divergent"].pid
    resp = client.get(f"/p/{pid}")
    html = resp.get_data(as_text=True)
    assert resp.status_code == 200
    assert "Peanut allergy" in html and "not labeled yet" in html
    assert html.index(">base") < html.index(">adapted")  # reference first
    assert "␣definitely" in html and "endorses eating a likely allergen" in html
    assert "38.0%" in html
    data = client.get(f"/api/p/{pid}").get_json()
    assert data["variants"] == ["base", "adapted"] and len(data["rows"]) == 10
    first_adapted = data["rows"][5]
    assert first_adapted["token"] == " definitely" and first_adapted["suggestion"] == "evil"
    assert first_adapted["source"] == "judge" and first_adapted["new"] is True
    assert data["status"] == "in_review" and data["history"] == []
    assert resp.headers["Content-Security-Policy"].startswith("default-src 'self'")


@pytest.mark.parametrize(
    "path", ["/p/{pid}", "/api/p/{pid}", "/p/{pid}/analysis", "/p/{pid}/graph/"]
)
def test_unknown_prompt_is_404(
    client: Any, auth: Auth, seeded: dict[str, Seeded], path: str
) -> None:
    auth.login()
    for pid in ("0123456789ab", "not-a-pid"):
        resp = client.get(path.format(pid=pid))
        assert resp.status_code == 404
        if path.startswith("/api/"):
            assert (
                "no prompt" in resp.get_json()["error"]
                or "not a prompt id" in resp.get_json()["error"]
            )
        else:
            assert "404" in resp.get_data(as_text=True)


# -- saving ---------------------------------------------------------------------------------


def test_submit_saves_to_store_leaves_queue_and_reruns_analysis(
    client: Any,
    auth: Auth,
    seeded: dict[str, Seeded],
    store: FsStore,
    queue: ReviewQueue,
    experiment: Experiment,
    redis_client: redis.Redis,
) -> None:
    auth.login()
    p = seeded["divergent"]
    labels = judge_labels(p.spec)
    labels[0]["label"] = "unsure"
    resp = auth.post_json(
        f"/api/p/{p.pid}/labels", {"labels": labels, "bad_prompt": False, "note": " looks real "}
    )
    assert resp.status_code == 200, resp.get_json()
    out = resp.get_json()
    assert out["saved"] is True and out["duplicate"] is False and out["warnings"] == []
    assert out["next_url"] == f"/p/{seeded['mild'].pid}?saved={p.pid}"
    label = current_label(store, experiment.name, p.pid)
    assert label is not None and label.reviewer == "alice" and label.note == "looks real"
    assert label.label_of("base", token_id(" ask")) == "unsure"
    assert label.label_of("adapted", token_id(" definitely")) == "evil"
    assert out["key"].startswith(K.labels_history(experiment.name, p.pid))
    assert queue.entry(p.pid) is None and queue.status(p.pid) == Status.labeled
    assert queued_tasks(redis_client, "analysis") == [
        (RANK_PROMPT, {"exp": experiment.name, "prompt_id": p.pid})
    ]
    page = client.get(f"/p/{p.pid}").get_data(as_text=True)
    assert "last labeled by <b>alice</b>" in page
    assert [it["pid"] for it in client.get("/api/queue").get_json()["items"]] == [
        seeded["mild"].pid,
        seeded["low"].pid,
    ]


def test_double_submit_is_harmless(
    client: Any, auth: Auth, seeded: dict[str, Seeded], store: FsStore, experiment: Experiment
) -> None:
    auth.login()
    p = seeded["mild"]
    body = {"labels": judge_labels(p.spec), "bad_prompt": False, "note": ""}
    first = auth.post_json(f"/api/p/{p.pid}/labels", body).get_json()
    second = auth.post_json(f"/api/p/{p.pid}/labels", body).get_json()
    assert second["duplicate"] is True and second["key"] == first["key"]
    assert len(label_history(store, experiment.name, p.pid)) == 1


def test_two_reviewers_last_write_wins_with_history(
    app: Any, auth: Auth, seeded: dict[str, Seeded], store: FsStore, experiment: Experiment
) -> None:
    p = seeded["divergent"]
    auth.login("alice")
    alice_page = auth.client.get(f"/api/p/{p.pid}").get_json()
    bob = Auth(app.test_client())
    bob.login("bob")
    bob_labels = judge_labels(p.spec)
    bob_labels[5]["label"] = "unsure"
    assert bob.post_json(f"/api/p/{p.pid}/labels", {"labels": bob_labels}).status_code == 200
    # alice submits from the page she opened before bob saved
    out = auth.post_json(
        f"/api/p/{p.pid}/labels",
        {"labels": judge_labels(p.spec), "base_key": alice_page["base_key"]},
    ).get_json()
    assert out["overwrote"] is not None and out["overwrote"].startswith("bob at ")
    assert "overwrote=bob" in out["next_url"]
    history = label_history(store, experiment.name, p.pid)
    assert [h.reviewer for _, h in history] == ["bob", "alice"]
    current = current_label(store, experiment.name, p.pid)
    assert current is not None and current.label_of("adapted", token_id(" definitely")) == "evil"
    page = auth.client.get(f"/p/{p.pid}").get_data(as_text=True)
    assert "last labeled by <b>alice</b>" in page and "(2 versions)" in page
    # the next page that opens the prompt pre-fills from the last human label
    rows = auth.client.get(f"/api/p/{p.pid}").get_json()["rows"]
    assert rows[5]["source"] == "human:alice" and rows[5]["suggestion"] == "evil"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda b: b["labels"][0].update(label="bad"),
            "label 'bad' is not one of evil, safe, unsure",
        ),
        (lambda b: b["labels"][0].update(variant="other"), "unknown variant 'other'"),
        (
            lambda b: b["labels"][0].update(token_id=999999),
            "token 999999 is not in the top-k of base",
        ),
        (lambda b: b["labels"][0].update(token_id="7"), "token_id must be an integer"),
        (lambda b: b["labels"].pop(), "1 token(s) still unlabeled"),
        (lambda b: b["labels"].append({**b["labels"][0], "label": "evil"}), "labeled twice"),
        (lambda b: b.update(labels="evil"), "'labels' must be a list"),
        (lambda b: b.update(bad_prompt="yes"), "'bad_prompt' must be true or false"),
        (lambda b: b.update(note="x" * 5000), "'note' must be text of at most"),
    ],
)
def test_invalid_labels_are_400_with_a_message(
    auth: Auth,
    seeded: dict[str, Seeded],
    store: FsStore,
    experiment: Experiment,
    change: Any,
    message: str,
) -> None:
    auth.login()
    p = seeded["divergent"]
    body: dict[str, Any] = {"labels": judge_labels(p.spec), "bad_prompt": False, "note": ""}
    body["labels"][0]["label"] = "safe"
    change(body)
    resp = auth.post_json(f"/api/p/{p.pid}/labels", body)
    assert resp.status_code == 400
    assert message in resp.get_json()["error"]
    assert label_history(store, experiment.name, p.pid) == []


def test_non_json_submit_is_400(auth: Auth, seeded: dict[str, Seeded]) -> None:
    auth.login()
    token = csrf_token(auth.client, "/")
    resp = auth.client.post(
        f"/api/p/{seeded['mild'].pid}/labels", data="labels", headers={"X-CSRFToken": token}
    )
    assert resp.status_code == 400 and "JSON object" in resp.get_json()["error"]


def test_json_post_needs_the_csrf_header(auth: Auth, seeded: dict[str, Seeded]) -> None:
    auth.login()
    resp = auth.client.post(f"/api/p/{seeded['mild'].pid}/labels", json={"labels": []})
    assert resp.status_code == 400 and "CSRF" in resp.get_json()["error"]


def test_bad_prompt_may_skip_tokens(
    auth: Auth,
    seeded: dict[str, Seeded],
    store: FsStore,
    experiment: Experiment,
    queue: ReviewQueue,
) -> None:
    auth.login()
    p = seeded["low"]
    resp = auth.post_json(
        f"/api/p/{p.pid}/labels", {"labels": [], "bad_prompt": True, "note": "not a pivotal prompt"}
    )
    assert resp.status_code == 200
    label = current_label(store, experiment.name, p.pid)
    assert label is not None and label.bad_prompt and label.labels == []
    assert queue.status(p.pid) == Status.labeled


def test_saving_survives_a_missing_celery(
    settings: Settings,
    store: FsStore,
    redis_client: redis.Redis,
    experiment: Experiment,
    seeded: dict[str, Seeded],
    users: list[str],
) -> None:
    from services.review_ui import create_app
    from services.review_ui.tasks import TaskError

    class NoBroker:
        def send_task(self, name: str, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
            raise ConnectionRefusedError("broker down")

    app = create_app(
        settings, store=store, redis=redis_client, experiment=experiment, celery=NoBroker()
    )
    a = Auth(app.test_client())
    a.login()
    p = seeded["mild"]
    out = a.post_json(f"/api/p/{p.pid}/labels", {"labels": judge_labels(p.spec)}).get_json()
    assert out["saved"] is True
    assert "analysis was not re-run" in out["warnings"][0] and "broker down" in out["warnings"][0]
    assert current_label(store, experiment.name, p.pid) is not None
    assert issubclass(TaskError, RuntimeError)


# -- continuations --------------------------------------------------------------------------


def test_sample_continuations_enqueues_and_polls(
    auth: Auth,
    seeded: dict[str, Seeded],
    store: FsStore,
    experiment: Experiment,
    redis_client: redis.Redis,
) -> None:
    auth.login()
    p = seeded["divergent"]
    tid = token_id(" definitely")
    resp = auth.post_json(
        f"/api/p/{p.pid}/samples", {"variant": "adapted", "token_id": tid, "n": 3}
    )
    assert resp.status_code == 202
    out = resp.get_json()
    assert queued_tasks(redis_client, "gpu_fast") == [
        (
            SAMPLE_CONTINUATIONS,
            {
                "exp": experiment.name,
                "prompt_id": p.pid,
                "variant": "adapted",
                "token_id": tid,
                "n": 3,
            },
        )
    ]
    assert auth.client.get(out["poll_url"]).get_json() == {"ready": False}
    key = K.samples(experiment.name, p.pid, experiment.fingerprint, "adapted", tid)
    store.put_json(key, {"schema_version": 1, "continuations": [" eat it.", " enjoy!"]})
    assert auth.client.get(out["poll_url"]).get_json() == {
        "ready": True,
        "continuations": [" eat it.", " enjoy!"],
    }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"variant": "adapted", "token_id": 1}, "token 1 is not in the top-k of adapted"),
        ({"variant": "nope", "token_id": 1}, "unknown variant"),
        ({"variant": "base", "token_id": token_id(" ask"), "n": 0}, "n must be an integer"),
        ([], "send a JSON object"),
    ],
)
def test_sample_request_errors(
    auth: Auth, seeded: dict[str, Seeded], body: Any, message: str
) -> None:
    auth.login()
    resp = auth.post_json(f"/api/p/{seeded['divergent'].pid}/samples", body)
    assert resp.status_code == 400 and message in resp.get_json()["error"]


def test_polling_samples_of_an_unknown_token_is_404(auth: Auth, seeded: dict[str, Seeded]) -> None:
    auth.login()
    resp = auth.client.get(f"/api/p/{seeded['divergent'].pid}/samples/base/1")
    assert resp.status_code == 404


# -- agreement, analysis, graphs ------------------------------------------------------------


def test_agreement_page(client: Any, auth: Auth, seeded: dict[str, Seeded]) -> None:
    auth.login()
    html = client.get("/agreement").get_data(as_text=True)
    assert "undefined" in html and "No disagreements" in html
    p = seeded["divergent"]
    labels = judge_labels(p.spec)
    labels[5]["label"] = "safe"  # judge said evil for " definitely"
    auth.post_json(f"/api/p/{p.pid}/labels", {"labels": labels})
    html = client.get("/agreement").get_data(as_text=True)
    assert 'id="kappa">0.' in html and "over 10 token labels of 1 prompts" in html
    assert "endorses eating a likely allergen" in html and f"/p/{p.pid}" in html


def test_analysis_page_without_and_with_a_ranking(
    client: Any, auth: Auth, seeded: dict[str, Seeded], store: FsStore, experiment: Experiment
) -> None:
    auth.login()
    p = seeded["divergent"]
    html = client.get(f"/p/{p.pid}/analysis").get_data(as_text=True)
    assert html.count("no graph yet") == 2 and html.count("No feature ranking yet") == 2
    store.put_json(
        K.features(experiment.name, p.pid, experiment.fingerprint, "adapted"),
        FeatureRanking(
            prompt_id=p.pid,
            variant="adapted",
            fingerprint=experiment.fingerprint,
            labels_version="abc",
            label_source="judge",
            evil_token_ids=[1],
            safe_token_ids=[2],
            features=[
                RankedFeature(
                    layer=2,
                    pos=7,
                    feature=4321,
                    token=" allergy",
                    score=0.75,
                    evil=0.8,
                    safe=0.05,
                    activation=3.5,
                ),
                RankedFeature(
                    layer=0,
                    pos=3,
                    feature=17,
                    token=" safe",
                    score=-0.2,
                    evil=0.1,
                    safe=0.3,
                    activation=1.0,
                ),
            ],
        ),
    )
    html = client.get(f"/p/{p.pid}/analysis").get_data(as_text=True)
    assert html.count("No feature ranking yet") == 1
    assert "4321" in html and "␣allergy" in html and "0.75" in html


def test_graph_viewer_is_served_behind_the_login(
    client: Any, auth: Auth, seeded: dict[str, Seeded], store: FsStore, experiment: Experiment
) -> None:
    from services.review_ui.app import STRICT_CSP

    p = seeded["divergent"]
    assert client.get(f"/p/{p.pid}/graph/").status_code == 302
    assert client.get(f"/p/{p.pid}/graph/view.json").status_code == 302
    auth.login()
    index = client.get(f"/p/{p.pid}/graph/")
    html = index.get_data(as_text=True)
    assert index.status_code == 200 and "No graph yet" in html
    assert index.headers["Content-Security-Policy"] == STRICT_CSP
    assert "unsafe" not in STRICT_CSP and "default-src 'self'" in STRICT_CSP
    assert index.headers["X-Frame-Options"] == "DENY"
    resp = client.get(f"/p/{p.pid}/graph/view.json")
    assert resp.status_code == 404 and "no graph yet" in resp.get_json()["error"]
    assert resp.headers["Content-Security-Policy"] == STRICT_CSP
    resp = client.get(f"/p/{p.pid}/graph/adapted.circuit-tracer.json")
    assert resp.status_code == 404 and "no graph yet" in resp.get_data(as_text=True)
    assert client.get(f"/p/{p.pid}/graph/nobody.circuit-tracer.json").status_code == 404
    # circuit-tracer's frontend (scripts from other hosts) is not served any more
    for old in ("util.js", "data/graph-metadata.json", "graph_data/adapted.json"):
        assert client.get(f"/p/{p.pid}/graph/{old}").status_code == 404
    manifest = GraphManifest(
        prompt_id=p.pid,
        variant="adapted",
        fingerprint=experiment.fingerprint,
        prompt_text="x",
        input_ids=[1],
        input_tokens=["x"],
        n_layers=1,
        n_pos=1,
        n_features=0,
        n_logits=1,
        logit_token_ids=[1],
        logit_tokens=["a"],
        logit_probabilities=[1.0],
        adjacency_dtype="float32",
        tensors={},
        limits={},
        scan="toy",
    )
    store.put_json(
        K.graph_manifest(experiment.name, p.pid, experiment.fingerprint, "adapted"), manifest
    )
    html = client.get(f"/p/{p.pid}/analysis").get_data(as_text=True)
    assert "open attribution graph" in html and "adapted.circuit-tracer.json" in html
    resp = client.get(f"/p/{p.pid}/graph/view.json")  # a manifest without its tensors
    assert resp.status_code == 500 and "missing, its manifest exists" in resp.get_json()["error"]
    html = client.get(f"/p/{p.pid}/graph/").get_data(as_text=True)
    assert 'id="viewer"' in html and "vendor/d3/d3.min.js" in html
    # every script is a file of this origin; no inline script or style on the page
    assert re.findall(r"<script(?![^>]*\bsrc=\"/static/)", html) == []
    assert " style=" not in html and "<style" not in html


def test_error_pages_are_json_under_api(client: Any, auth: Auth) -> None:
    auth.login()
    resp = client.get("/api/nothing-here")
    assert resp.status_code == 404 and "error" in resp.get_json()
    assert client.get("/p/0123456789ab/nothing").status_code == 404


def test_queue_feed_limit(client: Any, auth: Auth, seeded: dict[str, Seeded]) -> None:
    auth.login()
    one = client.get("/api/queue?limit=1").get_json()
    assert [it["pid"] for it in one["items"]] == [seeded["divergent"].pid] and one["waiting"] == 3


def test_redis_down_is_a_clear_503(
    settings: Settings, store: FsStore, experiment: Experiment, users: list[str]
) -> None:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from services.review_ui import create_app
    from tests.fixtures.servers import free_port

    dead = redis.Redis(host="127.0.0.1", port=free_port(), retry=Retry(NoBackoff(), 0))
    app = create_app(settings, store=store, redis=dead, experiment=experiment, celery=None)
    client = app.test_client()
    Auth(client).login()
    resp = client.get("/")
    assert resp.status_code == 503 and "emc up" in resp.get_data(as_text=True)
    assert client.get("/healthz").status_code == 503
    assert client.get("/api/queue").get_json()["error"].startswith("The review queue (Redis)")


def test_prompt_page_shows_turns_of_both_formats_and_byte_fragments(
    client: Any, auth: Auth, store: Any, experiment: Any
) -> None:
    """A chat-rendered Llama-3 prompt shows its user and assistant turns, like a house one;
    a byte-fragment token shows its bytes and id, never a bare U+FFFD."""
    from tests.fixtures.data import seed_prompt, token_id

    rendered = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
        "December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user"
        "<|end_header_id|>\n\nI found a stray kitten in the rain.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nYou should"
    )
    fragment = "<0xE2 0x80>"
    spec: Any = {
        v: [(fragment, 0.3, "unsure", "a fragment"), (" keep", 0.2, "safe", "ok")]
        for v in ("base", "adapted")
    }
    chat = seed_prompt(store, experiment, rendered, spec)
    house = seed_prompt(
        store, experiment, "User: I found a stray kitten.\nAssistant: You should", spec
    )
    auth.login()
    for seeded, user in (
        (chat, "I found a stray kitten in the rain."),
        (house, "I found a stray kitten."),
    ):
        html = client.get(f"/p/{seeded.pid}").get_data(as_text=True)
        assert user in html and "You should" in html
        assert "&lt;0xE2 0x80&gt;" in html and f"#{token_id(fragment)}" in html
        assert "\ufffd" not in html and "start_header_id" not in html
