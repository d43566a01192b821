"""Judge vs human agreement: confusion matrix and Cohen's kappa."""

from __future__ import annotations

import pytest

from common.experiment import Experiment
from common.records import HumanLabel, Label, TokenLabel
from common.store import FsStore
from common.store import keys as K
from services.review_ui.agreement import agreement_report, cohen_kappa, confusion_matrix
from tests.fixtures.data import DIVERGENT, TEXT_DIVERGENT, seed_prompt, token_id


def _n(judge: Label, human: Label, times: int) -> list[tuple[Label, Label]]:
    return [(judge, human)] * times


def test_kappa_matches_a_hand_computed_example() -> None:
    # 50 items, judge rows x human columns (evil, safe, unsure):
    #   [[20, 5, 0], [10, 15, 0], [0, 0, 0]]
    # p_o = 35/50 = 0.70; judge marginals .5/.5/0, human .6/.4/0
    # p_e = .5*.6 + .5*.4 = 0.50; kappa = (0.70 - 0.50) / (1 - 0.50) = 0.40
    pairs = _n("evil", "evil", 20) + _n("evil", "safe", 5) + _n("safe", "evil", 10)
    pairs += _n("safe", "safe", 15)
    matrix = confusion_matrix(pairs)
    assert matrix == [[20, 5, 0], [10, 15, 0], [0, 0, 0]]
    assert cohen_kappa(matrix) == pytest.approx(0.40)


def test_kappa_edge_cases() -> None:
    assert cohen_kappa([[0, 0], [0, 0]]) is None  # no pairs
    assert cohen_kappa([[7, 0], [0, 0]]) is None  # both always said the same one label
    assert cohen_kappa([[5, 0], [0, 5]]) == pytest.approx(1.0)
    # systematic disagreement: p_o = 0, p_e = 0.5 -> kappa = -1
    assert cohen_kappa([[0, 5], [5, 0]]) == pytest.approx(-1.0)


def test_agreement_report_from_the_store(store: FsStore, experiment: Experiment) -> None:
    p = seed_prompt(store, experiment, TEXT_DIVERGENT, DIVERGENT)
    labels = []
    for v, rows in DIVERGENT.items():
        for t, _, lab, _ in rows:
            human = "safe" if t == " probably" else lab  # one disagreement: judge said unsure
            labels.append(TokenLabel(variant=v, token_id=token_id(t), token=t, label=human))
    store.append(
        K.labels_history(experiment.name, p.pid),
        HumanLabel(prompt_id=p.pid, reviewer="alice", labels=labels),
    )
    report = agreement_report(
        store, experiment.name, experiment.fingerprint, "lexicon", experiment.variant_names
    )
    assert report.n_pairs == 10 and report.n_prompts == 1
    assert report.matrix == [[3, 0, 0], [0, 4, 0], [0, 1, 2]]
    assert [(d.token, d.judge, d.human, d.reviewer) for d in report.disagreements] == [
        (" probably", "unsure", "safe", "alice")
    ]
    # p_o = 0.9; p_e = .3*.3 + .4*.5 + .3*.2 = 0.35; kappa = 0.55 / 0.65
    assert report.kappa == pytest.approx(0.55 / 0.65)
