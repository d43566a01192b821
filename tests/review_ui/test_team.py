"""Review for a team through the app (test clients, real Redis and store): claims, the blind
overlap share, adjudication, the guide's version on labels, calibration and its export."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import pytest
import redis

from common.examples import StoreExamples, select_examples
from common.experiment import Experiment, ReviewSpec
from common.labels import label_history, labeled_prompts, prompt_consensus
from common.records import JudgeFewShotSet, Status
from common.review_queue import ReviewQueue
from common.store import FsStore
from common.store import keys as K
from services.review_ui.context import ctx
from services.review_ui.guidelines import guide_version
from services.review_ui.review import next_for
from services.review_ui.users import add_user
from tests.fixtures.data import DIVERGENT, Seeded, judge_labels, token_id, write_experiment
from tests.review_ui.conftest import PASSWORD, Auth

GUIDE = """# How to label
- **evil**: the next token pushes towards harm.
- **safe**: it does not.

<script>alert("guide")</script>
"""


@pytest.fixture
def experiment(tmp_path: Path) -> Experiment:
    """Every prompt goes to two reviewers; the experiment names a guide."""
    exp = write_experiment(tmp_path)
    guide = tmp_path / "guide.md"
    guide.write_text(GUIDE)
    review = ReviewSpec(overlap=1.0, claim_s=60, guidelines=str(guide))
    return exp.model_copy(update={"review": review})


def session(app: Any, name: str) -> Auth:
    auth = Auth(app.test_client())
    assert auth.login(name).status_code == 302
    return auth


def flipped(pid_spec: dict[str, Any], token: str) -> list[dict[str, object]]:
    """The judge's labels with one token changed (evil <-> safe)."""
    out = judge_labels(pid_spec)
    for item in out:
        if item["token_id"] == token_id(token):
            item["label"] = "safe" if item["label"] == "evil" else "evil"
    return out


def test_claim_overlap_and_adjudication(
    app: Any,
    users: list[str],
    seeded: dict[str, Seeded],
    store: FsStore,
    queue: ReviewQueue,
    experiment: Experiment,
    redis_client: redis.Redis,
) -> None:
    add_user(store, "carol", PASSWORD)
    alice, bob, carol = session(app, "alice"), session(app, "bob"), session(app, "carol")
    d = seeded["divergent"]
    name = experiment.name

    # -- alice opens the prompt: it is hers; bob sees who has it and cannot save
    page = alice.client.get(f"/p/{d.pid}").get_data(as_text=True)
    assert "claimed by you" in page
    items = {i["pid"]: i for i in bob.client.get("/api/queue").get_json()["items"]}
    assert items[d.pid]["claimed_by"] == "alice"
    assert "Claimed by <b>alice</b>" in bob.client.get(f"/p/{d.pid}").get_data(as_text=True)
    refused = bob.post_json(f"/api/p/{d.pid}/labels", {"labels": judge_labels(DIVERGENT)})
    assert refused.status_code == 409 and "claimed by alice" in refused.get_json()["error"]
    assert bob.post_json(f"/api/p/{d.pid}/claim", None).get_json()["by"] == "alice"
    # the next prompt of anyone but alice skips the claimed one
    with app.app_context():
        assert next_for(ctx(), "bob") == seeded["mild"].pid
        assert next_for(ctx(), "alice") == d.pid

    # -- alice saves: the claim is released, the prompt waits for a second reviewer
    saved = alice.post_json(
        f"/api/p/{d.pid}/labels", {"labels": judge_labels(DIVERGENT), "note": "judge is right"}
    )
    assert saved.status_code == 200, saved.get_json()
    assert saved.get_json()["state"] == "awaiting_second"
    assert f"/p/{d.pid}" not in saved.get_json()["next_url"]
    [(_, first)] = label_history(store, name, d.pid)
    assert first.overlap and first.guideline_version == guide_version(GUIDE)
    assert first.elapsed_s is not None and first.elapsed_s >= 0
    assert redis_client.get(f"emc:{name}:claim:{d.pid}") is None
    assert queue.entry(d.pid) is not None and queue.status(d.pid) == Status.in_review
    assert d.pid not in {i["pid"] for i in alice.client.get("/api/queue").get_json()["items"]}
    second = {i["pid"]: i for i in bob.client.get("/api/queue").get_json()["items"]}[d.pid]
    assert second["second"] and second["claimed_by"] is None

    # -- bob's review is blind: nothing of alice's label reaches his page
    blind = bob.client.get(f"/p/{d.pid}").get_data(as_text=True)
    data = bob.client.get(f"/api/p/{d.pid}").get_json()
    assert data["blind"] and data["current"] is None and data["history"] == []
    assert {r["source"] for r in data["rows"]} == {"judge"}
    assert (
        "judge is right" not in blind
        and "alice" not in blind.split("<main>")[1].split("</header>")[0]
    )
    saved = bob.post_json(f"/api/p/{d.pid}/labels", {"labels": flipped(DIVERGENT, " just")})
    assert saved.get_json()["state"] == "disputed" and saved.get_json()["overwrote"] is None
    assert queue.entry(d.pid) is None and queue.status(d.pid) == Status.labeled
    assert d.pid not in {p.id for p, _ in labeled_prompts(store, name)}  # not ground truth yet

    # -- the dispute reaches adjudication, side by side; carol decides
    listing = carol.client.get("/adjudicate").get_data(as_text=True)
    assert f'data-pid="{d.pid}"' in listing
    view = carol.client.get(f"/adjudicate/{d.pid}").get_data(as_text=True)
    assert "judge is right" in view and "alice" in view and "bob" in view
    assert view.count('class="row disputed"') == 1
    resolves = re.search(r'"resolves": (\[[^\]]*\])', view)
    assert resolves
    keys = [k for k, _ in label_history(store, name, d.pid)]
    stale = carol.post_json(
        f"/api/adjudicate/{d.pid}", {"labels": judge_labels(DIVERGENT), "resolves": keys[::-1]}
    )
    assert stale.status_code == 400 and "reload" in stale.get_json()["error"]
    done = carol.post_json(
        f"/api/adjudicate/{d.pid}",
        {"labels": judge_labels(DIVERGENT), "resolves": keys, "note": "guide: evil"},
    )
    assert done.status_code == 200, done.get_json()
    assert done.get_json()["state"] == "adjudicated"
    history = label_history(store, name, d.pid)
    assert [lab.reviewer for _, lab in history] == ["alice", "bob", "carol"]
    assert history[-1][1].adjudicated and history[-1][1].resolves == keys
    assert prompt_consensus(store, name, d.pid).state == "adjudicated"
    assert d.pid in {p.id for p, _ in labeled_prompts(store, name)}
    assert f'data-pid="{d.pid}"' not in carol.client.get("/adjudicate").get_data(as_text=True)
    again = carol.post_json(
        f"/api/adjudicate/{d.pid}", {"labels": judge_labels(DIVERGENT), "resolves": keys}
    )
    assert again.status_code == 400 and "not disputed" in again.get_json()["error"]

    # -- the agreement page shows the pair and each reviewer
    agreement = carol.client.get("/agreement").get_data(as_text=True)
    assert 'data-pair="alice|bob"' in agreement and 'data-reviewer="carol"' in agreement


def test_the_guide_is_rendered_without_its_html(
    app: Any, users: list[str], seeded: dict[str, Seeded]
) -> None:
    alice = session(app, "alice")
    page = alice.client.get(f"/p/{seeded['mild'].pid}").get_data(as_text=True)
    assert "<h1>How to label</h1>" in page and "<strong>evil</strong>" in page
    assert '<script>alert("guide")</script>' not in page and "&lt;script&gt;" in page
    assert guide_version(GUIDE) in page


def test_calibration_exports_the_judges_next_few_shot_set(
    app: Any, users: list[str], seeded: dict[str, Seeded], store: FsStore, experiment: Experiment
) -> None:
    alice, bob = session(app, "alice"), session(app, "bob")
    d, m = seeded["divergent"], seeded["mild"]
    for who in (alice, bob):  # both overrule the judge on " just" of the divergent prompt
        assert (
            who.post_json(
                f"/api/p/{d.pid}/labels", {"labels": flipped(DIVERGENT, " just")}
            ).status_code
            == 200
        )
        assert (
            who.post_json(
                f"/api/p/{m.pid}/labels", {"labels": judge_labels(seeded["mild"].spec)}
            ).status_code
            == 200
        )
    page = alice.client.get("/calibration").get_data(as_text=True)
    assert f'data-token-id="{token_id(" just")}"' in page and "evil→safe" in page
    assert page.count("<tr data-token-id=") == 1
    exported = alice.client.post(
        "/calibration/export",
        data={"csrf_token": re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)},  # type: ignore[union-attr]
        follow_redirects=True,
    )
    assert exported.status_code == 200 and "1 prompt(s) pinned" in exported.get_data(as_text=True)
    pinned = store.get_record(
        K.judge_few_shot(experiment.name, experiment.judge.judge_id), JudgeFewShotSet
    )
    assert pinned.prompt_ids == [d.pid] and pinned.created_by == "alice"
    pool = StoreExamples(store, experiment, pinned_for=experiment.judge.judge_id).examples()
    assert {e.prompt.id for e in pool if e.pinned} == {d.pid}
    chosen = select_examples(pool, 1, lambda e: not e.has_evil(), random.Random(0))
    assert [e.prompt.id for e in chosen] == [d.pid]  # pinned first, whatever the balance
