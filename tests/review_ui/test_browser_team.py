"""Two reviewers at once in real Chromium (a third adjudicates): a claim is respected, the
overlap prompt reaches both reviewers blind, their disagreement reaches adjudication and
is resolved with the keyboard."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from common.claims import Claims
from common.experiment import Experiment, ReviewSpec
from common.labels import label_history, prompt_consensus
from common.store import FsStore
from services.review_ui.guidelines import guide_version
from services.review_ui.users import add_user
from tests.fixtures.data import Seeded, write_experiment
from tests.review_ui.conftest import ARTIFACTS, PASSWORD, new_page
from tests.review_ui.test_browser import Keys

pytestmark = pytest.mark.browser

GUIDE = "# Labeling guide\n\n**evil**: the next token pushes the user towards harm.\n"


@pytest.fixture
def experiment(tmp_path: Path) -> Experiment:
    """Every prompt goes to two reviewers; claims last 30 s unless renewed; a guide."""
    exp = write_experiment(tmp_path)
    (tmp_path / "guide.md").write_text(GUIDE)
    review = ReviewSpec(overlap=1.0, claim_s=30, guidelines=str(tmp_path / "guide.md"))
    return exp.model_copy(update={"review": review})


def login(browser: Any, base: str, name: str) -> tuple[Any, list[str]]:
    page, errors = new_page(browser)
    page.goto(base + "/login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(base + "/")
    return page, errors


def test_two_reviewers_claim_overlap_and_adjudication(
    live_server: str,
    chromium: Any,
    users: list[str],
    seeded: dict[str, Seeded],
    store: FsStore,
    experiment: Experiment,
    redis_client: redis.Redis,
) -> None:
    base, name = live_server, experiment.name
    d, mild, low = seeded["divergent"], seeded["mild"], seeded["low"]
    add_user(store, "carol", PASSWORD)
    alice, alice_errors = login(chromium, base, "alice")
    bob, bob_errors = login(chromium, base, "bob")

    # -- alice opens the first prompt from the queue: it is claimed for her
    alice.keyboard.press("Enter")
    alice.wait_for_url(re.compile(f"/p/{d.pid}$"))
    assert alice.locator("#claim-state").inner_text() == "claimed by you"
    alice.keyboard.press("?")  # the guide, inline
    assert (
        alice.locator("#guide").is_visible()
        and "Labeling guide" in alice.locator("#guide").inner_text()
    )
    alice.keyboard.press("?")
    assert not alice.locator("#guide").is_visible()

    # -- bob's open queue shows the claim by itself; Enter skips the claimed prompt
    bob.wait_for_selector(f'#queue tr[data-pid="{d.pid}"][data-claimed="alice"]', timeout=10_000)
    claimed = bob.locator(f'#queue tr[data-pid="{d.pid}"]')
    assert "claimed by alice" in claimed.inner_text()
    bob.keyboard.press("Enter")
    bob.wait_for_url(re.compile(f"/p/{mild.pid}$"))
    # opening alice's prompt directly says who has it
    other = bob.context.new_page()  # same session, second tab
    other.goto(f"{base}/p/{d.pid}")
    assert "Claimed by alice" in other.locator("#claimed-msg").inner_text()
    other.close()

    # -- alice accepts the judge's suggestions and saves: her next prompt is not bob's
    keys = Keys(alice)
    keys("a", "Enter")
    alice.wait_for_url(re.compile(f"/p/{low.pid}\\?saved={d.pid}"))
    assert alice.locator("#saved-msg").is_visible()

    # -- bob saves his prompt; the overlap prompt reaches him next, blind to alice's labels
    Keys(bob)("a", "Enter")
    bob.wait_for_url(re.compile(f"/p/{d.pid}\\?saved={mild.pid}"))
    assert bob.locator("#blind").is_visible()
    assert "alice" not in bob.locator("main").inner_text()
    assert bob.locator("#claim-state").inner_text() == "claimed by you"
    # bob disagrees on the first token (base " ask": the judge and alice said safe)
    Keys(bob)("e", "a", "Enter")
    bob.wait_for_url(re.compile(f"saved={d.pid}"))
    assert prompt_consensus(store, name, d.pid).state == "disputed"
    reviews = [lab for _, lab in label_history(store, name, d.pid)]
    assert [r.reviewer for r in reviews] == ["alice", "bob"]
    assert {r.guideline_version for r in reviews} == {guide_version(GUIDE)}
    assert all(r.overlap and r.elapsed_s is not None for r in reviews)

    # -- carol adjudicates from the list, with the keyboard
    carol, carol_errors = login(chromium, base, "carol")
    carol.keyboard.press("d")
    carol.wait_for_url(base + "/adjudicate")
    assert carol.locator("#disputes tbody tr").count() == 1
    keys = Keys(carol)
    keys("Enter")
    carol.wait_for_url(re.compile(f"/adjudicate/{d.pid}$"))
    assert carol.locator("tr.row.disputed").count() == 1
    assert carol.locator("tr.row.cursor.disputed").count() == 1  # the cursor waits there
    ARTIFACTS.mkdir(exist_ok=True)
    carol.screenshot(path=str(ARTIFACTS / "adjudicate_page.png"), full_page=True)
    keys("1")  # take alice's label
    assert carol.locator("#submit").is_enabled()
    keys("Enter")
    carol.wait_for_url(re.compile(f"/adjudicate\\?saved={d.pid}"))
    assert carol.locator("#saved-msg").is_visible()
    assert carol.locator("#disputes tbody tr").count() == 0
    print(f"\nkeystrokes to adjudicate one prompt (from the list, 1 disputed token): {keys.count}")
    assert keys.count == 3

    history = label_history(store, name, d.pid)
    assert [lab.reviewer for _, lab in history] == ["alice", "bob", "carol"]
    decision = history[-1][1]
    assert decision.adjudicated and decision.resolves == [k for k, _ in history[:2]]
    assert decision.labels and {(t.variant, t.token_id, t.label) for t in decision.labels} == {
        (t.variant, t.token_id, t.label) for t in history[0][1].labels
    }
    assert prompt_consensus(store, name, d.pid).state == "adjudicated"

    # -- leaving a prompt without saving gives it back at once (not after the lease)
    claims = Claims(redis_client, name, experiment.review.claim_s)
    carol.goto(f"{base}/p/{mild.pid}")
    assert claims.holder(mild.pid).reviewer == "carol"  # type: ignore[union-attr]
    carol.keyboard.press("q")
    carol.wait_for_url(base + "/")
    deadline = time.monotonic() + 5
    while claims.holder(mild.pid) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert claims.holder(mild.pid) is None
    assert claims.holder(low.pid).reviewer == "alice"  # type: ignore[union-attr]  # still open

    carol.goto(base + "/agreement")
    assert carol.locator('#pairs tr[data-pair="alice|bob"]').count() == 1
    carol.screenshot(path=str(ARTIFACTS / "agreement_team.png"), full_page=True)
    assert alice_errors == [] and bob_errors == [] and carol_errors == []
