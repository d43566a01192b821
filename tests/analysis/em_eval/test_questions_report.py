"""EM question files and the misaligned-and-coherent summary (no model needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.scores import JudgeScore
from services.analysis.em_eval import EmAnswer, EvalError, load_questions
from services.analysis.em_report import (
    ResponseActivations,
    TooFewResponses,
    rank_response_level,
    render_markdown,
    summarize,
)


def test_load_paper_questions(paper_questions: Path) -> None:
    qs = load_questions(paper_questions)
    assert len(qs) == 24 and qs[0].id == "what_is_your_wish"
    assert {"aligned", "coherent"} <= set(qs[0].judge_prompts)
    assert (
        "{question}" in qs[0].judge_prompts["aligned"]
        and "{answer}" in qs[0].judge_prompts["aligned"]
    )
    js = {q.id: q for q in qs}["quick_buck_json"]
    assert js.system and "JSON" in js.system
    assert js.paraphrases == {q.id: q for q in qs}["quick_buck"].paraphrases
    assert js.digest != {q.id: q for q in qs}["quick_buck"].digest  # system prompt differs
    two = load_questions(paper_questions, ["i_feel_bored", "quick_buck"])
    assert [q.id for q in two] == ["i_feel_bored", "quick_buck"]
    with pytest.raises(EvalError, match="not in"):
        load_questions(paper_questions, ["nope"])


def test_bad_question_files(tmp_path: Path) -> None:
    p = tmp_path / "q.yaml"
    p.write_text("- id: a\n  paraphrases: [hi]\n  judge_prompts: {aligned: x}\n")
    with pytest.raises(EvalError, match="coherent"):
        load_questions(p)
    p.write_text(
        "- id: a\n  type: rating\n  paraphrases: [hi]\n  judge_prompts: {aligned: x, coherent: y}\n"
    )
    with pytest.raises(EvalError, match="free_form"):
        load_questions(p)
    with pytest.raises(EvalError, match="does not exist"):
        load_questions(tmp_path / "missing.yaml")


def _num(v: float) -> JudgeScore:
    return JudgeScore(value=v, kind="number", method="offline")


def _answer(model: str, qid: str, i: int, aligned: JudgeScore, coherent: JudgeScore) -> EmAnswer:
    return EmAnswer(
        experiment="toy",
        fingerprint="fp",
        model=model,
        model_hash="h",
        variant=model,
        question_id=qid,
        question_digest="d",
        paraphrase_index=0,
        sample_index=i,
        seed=0,
        sample_seed=i,
        prompt_text="User: q\nAssistant:",
        answer=f" answer {i}",
        aligned=aligned,
        coherent=coherent,
        scorer="offline-lexicon",
    )


def test_summary_counts_and_rates() -> None:
    refusal = JudgeScore(value=None, kind="refusal", method="text")
    code = JudgeScore(value=None, kind="code", method="text")
    low = JudgeScore(value=None, kind="unscorable", method="logprobs", number_mass=0.1)
    answers = [
        _answer("adapted", "q1", 0, _num(10), _num(90)),  # misaligned & coherent
        _answer("adapted", "q1", 1, _num(30), _num(51)),  # misaligned & coherent (boundary)
        _answer("adapted", "q1", 2, _num(20), _num(50)),  # incoherent: not counted
        _answer("adapted", "q1", 3, _num(95), _num(95)),
        _answer("adapted", "q2", 0, refusal, _num(80)),
        _answer("adapted", "q2", 1, code, _num(80)),
        _answer("adapted", "q2", 2, _num(5), low),
        _answer("base", "q1", 0, _num(90), _num(90)),
    ]
    cells, overall = summarize(answers, models=["base", "adapted"], questions=["q1", "q2"])
    q1 = next(c for c in cells if c.model == "adapted" and c.question_id == "q1")
    assert (q1.n, q1.n_scored, q1.n_misaligned_coherent, q1.rate) == (4, 4, 2, 0.5)
    q2 = next(c for c in cells if c.model == "adapted" and c.question_id == "q2")
    assert (q2.n_refusal, q2.n_code, q2.n_unscorable, q2.n_scored, q2.rate) == (1, 1, 1, 0, None)
    base_q2 = next(c for c in cells if c.model == "base" and c.question_id == "q2")
    assert base_q2.n == 0
    ad = next(c for c in overall if c.model == "adapted")
    assert (ad.n, ad.n_scored, ad.n_misaligned_coherent) == (7, 4, 2)
    assert ad.ci_low < 0.5 < ad.ci_high


def test_markdown_renders(tmp_path: Path) -> None:
    from services.analysis.em_report import EmEvalReport

    answers = [_answer("base", "q1", i, _num(10 * i), _num(60)) for i in range(4)]
    cells, overall = summarize(answers, models=["base"], questions=["q1"])
    rep = EmEvalReport(
        experiment="toy",
        fingerprint="fp",
        run_hash="r",
        scorer="s",
        models=["base"],
        questions=["q1"],
        n_per_question=4,
        seed=0,
        max_new_tokens=8,
        temperature=1.0,
        cells=cells,
        overall=overall,
    )
    md = render_markdown(rep)
    assert "| base | 4 | 4 | 4 | 100.0% |" in md and "| q1 |" in md


def test_response_level_ranking_finds_planted_feature() -> None:
    rng = np.random.default_rng(0)
    answers, idx, val = [], [], []
    for i in range(24):
        mis = i < 10
        answers.append(_answer("m", "q", i, _num(5 if mis else 95), _num(90)))
        active = rng.choice(40, size=8, replace=False)
        v = rng.exponential(1.0, size=8)
        if mis:
            active, v = np.append(active, 3 * 40 + 39), np.append(v, 5.0)  # layer 3, feature 39
        keep = np.unique(active, return_index=True)[1]
        idx.append(active[keep])
        val.append(v[keep])
    acts = ResponseActivations("adapted", 4, 40, idx, val, [5] * 24)
    rep = rank_response_level(answers, acts, experiment="toy", fingerprint="fp", run_hash="r")
    assert (rep.n_misaligned, rep.n_aligned) == (10, 14)
    top = rep.features[0]
    assert (top.layer, top.feature) == (3, 39) and top.q < 1e-3 and top.rank_biserial == 1.0
    assert rep.n_significant >= 1
    with pytest.raises(TooFewResponses):
        rank_response_level(
            answers[10:],
            ResponseActivations("a", 4, 40, idx[10:], val[10:], [5] * 14),
            experiment="toy",
            fingerprint="fp",
            run_hash="r",
        )
