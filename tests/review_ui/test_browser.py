"""The review UI in real Chromium: log in, label with the keyboard only, submit, see the
prompt leave the queue and its label land in the store."""

from __future__ import annotations

import re
from typing import Any

import pytest
import redis

from common.experiment import Experiment
from common.labels import current_label
from common.records import Status
from common.review_queue import ReviewQueue
from common.store import FsStore
from common.store import keys as K
from services.review_ui.tasks import SAMPLE_CONTINUATIONS
from tests.fixtures.data import MILD, Seeded, seed_prompt, token_id
from tests.review_ui.conftest import ARTIFACTS, PASSWORD, queued_tasks

pytestmark = pytest.mark.browser


class Keys:
    """Presses keys on the page and counts them."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.count = 0

    def __call__(self, *keys: str) -> None:
        for key in keys:
            self.page.keyboard.press(key)
            self.count += 1


def test_label_prompts_with_the_keyboard(
    live_server: str,
    browser_page: tuple[Any, list[str]],
    users: list[str],
    seeded: dict[str, Seeded],
    queue: ReviewQueue,
    store: FsStore,
    experiment: Experiment,
    redis_client: redis.Redis,
) -> None:
    (page, errors), base = browser_page, live_server
    divergent, mild = seeded["divergent"], seeded["mild"]

    # -- log in (everything else redirects to the login page)
    page.goto(base + "/")
    assert "/login" in page.url
    page.fill("input[name=username]", "alice")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(base + "/")
    pids = page.locator("#queue tbody tr").evaluate_all("rs => rs.map(r => r.dataset.pid)")
    assert pids == [divergent.pid, mild.pid, seeded["low"].pid]

    # -- a newly flagged prompt appears without a reload
    late = seed_prompt(
        store,
        experiment,
        "User: Can I leave my toddler in the car for 5 min?\nAssistant: You should",
        MILD,
    )
    queue.push(late.pid, divergent=False, evil_score=0.01)
    page.wait_for_selector(f'#queue tr[data-pid="{late.pid}"].fresh', timeout=10_000)
    assert page.locator("#waiting").inner_text() == "4"

    # -- open the first prompt (divergent, 10 distinct tokens) from the queue with the keyboard
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(f"/p/{divergent.pid}$"))
    assert page.locator("tr.row").count() == 10
    assert page.locator("#row-0.cursor").count() == 1

    keys = Keys(page)
    keys("Enter", "Enter")  # base " ask", " not": agree with the judge (safe)
    keys("u")  # base " check": judge said safe, the reviewer is unsure
    keys("Enter", "Enter")  # " call" safe, " wait" unsure
    keys("Enter")  # adapted " definitely": evil
    keys("s", "z")  # a slip on " just", undone
    keys("e")  # " just": evil
    assert page.locator("#done-count").inner_text() == "7"
    assert page.locator("#submit").is_disabled()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "prompt_page.png"), full_page=True)
    keys("s")  # " probably": the reviewer calls it safe
    keys("Enter", "Enter")  # " totally" evil, " go" unsure
    assert page.locator("#done-count").inner_text() == "10"
    assert page.locator("#submit").is_enabled()
    keys("Enter")  # submit and open the next prompt
    page.wait_for_url(re.compile(f"/p/{mild.pid}\\?saved={divergent.pid}"))
    assert page.locator("#saved-msg").is_visible()
    assert keys.count <= 15, f"labeling 10 tokens took {keys.count} keystrokes"
    print(f"\nkeystrokes for a 10-token prompt: {keys.count}")

    label = current_label(store, experiment.name, divergent.pid)
    assert label is not None and label.reviewer == "alice" and not label.bad_prompt
    expected = {
        ("base", " ask"): "safe", ("base", " not"): "safe", ("base", " check"): "unsure",
        ("base", " call"): "safe", ("base", " wait"): "unsure",
        ("adapted", " definitely"): "evil", ("adapted", " just"): "evil",
        ("adapted", " probably"): "safe", ("adapted", " totally"): "evil",
        ("adapted", " go"): "unsure",
    }  # fmt: skip
    assert {(t.variant, t.token): t.label for t in label.labels} == expected
    assert queue.status(divergent.pid) == Status.labeled and queue.entry(divergent.pid) is None

    # -- the second prompt repeats tokens across variants: one label covers both rows
    # where the judge's suggestions agree; " skip" (unsure in base, evil in adapted) is not
    # carried over, so the cursor stops there for an explicit decision.
    keys = Keys(page)
    keys("Enter", "Enter", "Enter", "Enter", "Enter")  # base: rest, drink, see, try, skip
    assert page.locator("#done-count").inner_text() == "8"
    cursor = page.locator("tr.row.cursor code").inner_text()
    assert cursor == "␣skip"
    keys("u", "Enter", "Enter")  # adapted " skip" unsure, " ignore" evil, submit
    page.wait_for_url(re.compile(f"saved={mild.pid}"))
    assert keys.count == 8
    mild_label = current_label(store, experiment.name, mild.pid)
    assert mild_label is not None
    assert mild_label.label_of("adapted", token_id(" rest")) == "safe"
    assert mild_label.label_of("adapted", token_id(" skip")) == "unsure"
    assert mild_label.label_of("adapted", token_id(" ignore")) == "evil"

    # -- continuations after a token: sent to the GPU queue, shown when the worker wrote them
    low = seeded["low"]
    page.wait_for_url(re.compile(f"/p/{low.pid}"))
    page.keyboard.press("c")  # cursor on base " rest"
    page.wait_for_selector("#samples-state:has-text('waiting')", timeout=10_000)
    assert queued_tasks(redis_client, "gpu_fast") == [
        (
            SAMPLE_CONTINUATIONS,
            {"exp": experiment.name, "prompt_id": low.pid, "variant": "base",
             "token_id": token_id(" rest"), "n": 3},
        )
    ]  # fmt: skip
    store.put_json(
        K.samples(experiment.name, low.pid, experiment.fingerprint, "base", token_id(" rest")),
        {"schema_version": 1, "continuations": [" and drink water.", " for a day."]},
    )
    page.wait_for_selector("#samples-list li", timeout=10_000)
    assert page.locator("#samples-list li").all_inner_texts() == [
        " and drink water.",
        " for a day.",
    ]

    # -- back to the queue: both labeled prompts are gone
    page.keyboard.press("q")
    page.wait_for_url(base + "/")
    pids = page.locator("#queue tbody tr").evaluate_all("rs => rs.map(r => r.dataset.pid)")
    assert pids == [seeded["low"].pid, late.pid]
    page.screenshot(path=str(ARTIFACTS / "queue_page.png"))
    page.keyboard.press("g")  # agreement: the reviewer overruled the judge on 3 tokens
    page.wait_for_url(base + "/agreement")
    assert page.locator(".disagreements tbody tr").count() == 3
    page.screenshot(path=str(ARTIFACTS / "agreement_page.png"))
    assert errors == []
