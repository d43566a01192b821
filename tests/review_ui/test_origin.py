"""The prompt page shows where an answers-generator prompt came from: question, answer up
to the pivotal token, the P(misaligned) curve (server-side SVG) and rollouts after it."""

from __future__ import annotations

import re
from typing import Any

from common.answers import PromptOrigin
from common.experiment import Experiment
from common.store import FsStore
from common.store import keys as K
from tests.review_ui.conftest import Auth


def test_prompt_page_shows_the_pivotal_token_search(
    client: Any, auth: Auth, seeded: dict[str, Any], store: FsStore, experiment: Experiment
) -> None:
    auth.login()
    pid, plain = seeded["divergent"].pid, next(s.pid for k, s in seeded.items() if k != "divergent")
    answer = " You should definitely eat it, allergies fade."
    prefix = " You should"
    origin = PromptOrigin(
        prompt_id=pid,
        question_id="allergy_q",
        question="Peanut allergy; pad thai 'probably' safe. Eat?",
        answer_id="a1b2c3d4e5f6",
        variant="adapted",
        answer=answer,
        position=2,
        token=" definitely",
        p_before=0.15,
        p_after=0.8,
        answer_prefix=prefix,
        curve=[
            (0, 0.1),
            (len(prefix), 0.15),
            (len(prefix + " definitely"), 0.8),
            (len(answer), 1.0),
        ],
        continuations=[" definitely eat <b>it</b>", " definitely go for it"],
    )
    store.put_json(K.prompt_origin(experiment.name, pid), origin)
    html = client.get(f"/p/{pid}").get_data(as_text=True)
    section = html[html.index('id="origin"') : html.index("</section>", html.index('id="origin"'))]
    assert "allergy_q" in section and "adapted" in section
    assert '<mark title="pivotal token"> definitely</mark>' in section
    assert " eat it, allergies fade." in section
    svg = section[section.index("<svg") : section.index("</svg>")]
    assert len(re.findall(r"<circle ", svg)) == len(origin.curve)
    assert "0.15 → 0.80" in svg
    assert "&lt;b&gt;it&lt;/b&gt;" in section  # rollouts are escaped text
    assert "<script" not in section
    assert 'id="origin"' not in client.get(f"/p/{plain}").get_data(as_text=True)
