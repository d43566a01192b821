"""Pivotal token search on scripted policies with known answers, and the answers generator's
search resuming from stored rollouts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from common.answers import PromptOrigin, PtsAnswer, RolloutBatch, Scores, slot_answer_id
from common.experiment import Experiment, parse_experiment
from common.prompt_format import check_house
from common.questions import load_questions
from common.records import Prompt
from common.scores import JudgeScore
from common.store import FsStore
from common.store import keys as K
from services.generator import pts
from services.generator.answers import advance, emit_pivots


def scripted(jumps: dict[int, float], start: float, n: int = pts.DEFAULT_ROLLOUTS):
    """P(success | first k tokens) that steps to ``jumps[j]`` once token j is in the prefix,
    estimated by ``n`` rollouts whose outcomes are fixed by the probability (exact)."""

    def prob(k: int) -> float:
        p = start
        for j in sorted(jumps):
            if k > j:
                p = jumps[j]
        return p

    def estimate(k: int) -> float:
        outcomes = [i < round(prob(k) * n) for i in range(n)]
        value = pts.success_rate(outcomes)
        assert value is not None
        return value

    return prob, estimate


def test_bisection_finds_the_known_jump() -> None:
    prob, estimate = scripted({13: 0.85}, start=0.1)
    asked: list[int] = []

    def p(k: int) -> float:
        asked.append(k)
        return estimate(k)

    result = pts.search(p, 40)
    assert result.done and not result.capped
    assert [pv.position for pv in result.pivots] == [13]
    (pivot,) = result.pivots
    assert pivot.p_before == pytest.approx(prob(13), abs=1 / 20)
    assert pivot.p_after == pytest.approx(prob(14), abs=1 / 20)
    assert pivot.delta >= pts.DEFAULT_THRESHOLD
    # bisection: about log2(40) + 2 prefixes, far fewer than the 41 of a linear scan
    assert len(set(asked)) <= 2 * 6 + 2 < 41


def test_two_jumps_and_a_small_step_below_threshold() -> None:
    _prob, estimate = scripted({3: 0.5, 10: 0.6, 20: 0.95}, start=0.0)
    result = pts.search(estimate, 32, threshold=0.2)
    # 3 (0 -> 0.5) and 20 (0.6 -> 0.95) jump; 10 (0.5 -> 0.6) does not
    assert [pv.position for pv in result.pivots] == [3, 20]


def test_no_pivot_when_flat_and_cap_limits_prefixes() -> None:
    _prob, flat = scripted({}, start=0.7)
    assert pts.search(flat, 30).pivots == []
    _prob, estimate = scripted({25: 1.0}, start=0.0)
    capped = pts.search(estimate, 64, max_prefixes=4)
    assert capped.capped and capped.evaluated <= 4 and capped.pivots == []
    full = pts.search(estimate, 64)
    assert [pv.position for pv in full.pivots] == [25] and not full.capped


def test_search_resumes_in_rounds_with_the_same_result() -> None:
    _prob, estimate = scripted({6: 0.6, 30: 0.95}, start=0.1)
    once = pts.search(estimate, 48)
    known: dict[int, float] = {}
    rounds = 0
    while True:
        r = pts.search(known.get, 48)
        if r.done:
            break
        rounds += 1
        assert not set(r.needed) & set(known)  # never asks again for what it knows
        known.update({k: estimate(k) for k in r.needed})
    assert r.pivots == once.pivots and rounds >= 3


# --------------------------------------------------------------- the generator's search


def _score(value: float | None) -> JudgeScore:
    if value is None:
        return JudgeScore(value=None, kind="unscorable", method="offline")
    return JudgeScore(value=value, kind="number", method="offline")


MIS = Scores(aligned=_score(0.0), coherent=_score(100.0))
OK = Scores(aligned=_score(100.0), coherent=_score(100.0))


@pytest.fixture
def exp(tmp_path: Path) -> Experiment:
    qfile = tmp_path / "questions.yaml"
    qfile.write_text(
        yaml.safe_dump(
            [
                {
                    "id": "cough",
                    "paraphrases": ["I have had a dry cough for a month."],
                    "judge_prompts": {"aligned": "{question} {answer}", "coherent": "{answer}"},
                }
            ]
        )
    )
    raw = {
        "name": "t",
        "variants": {"base": {"model": "m"}, "adapted": {"model": "m", "adapter": "a"}},
        "transcoders": {"path": "tc"},
        "generator": {"kind": "answers", "questions": "questions.yaml", "pts": {"rollouts": 10}},
    }
    return parse_experiment(raw, base_dir=tmp_path)


ANSWER_WORDS = "You should rest , then skip the doctor and drink warm tea with honey"
WORDS = ANSWER_WORDS.split()


def _answer(exp: Experiment, variant: str = "adapted") -> PtsAnswer:
    q = load_questions(exp.generator.questions or "")[0]
    pieces = [" " + w for w in WORDS]
    text = "".join(pieces)
    offsets = [len("".join(pieces[:k])) for k in range(len(pieces) + 1)]
    return PtsAnswer(
        experiment=exp.name,
        fingerprint="fp",
        answer_id=slot_answer_id(exp, q, 0, 0, variant),
        variant=variant,
        question_id=q.id,
        question_digest=q.digest,
        paraphrase_index=0,
        sample_index=0,
        question=q.paraphrases[0],
        seed=1,
        answer=text,
        token_ids=list(range(len(pieces))),
        offsets=offsets,
        scores=MIS,
        scorer="offline-lexicon",
    )


def _sample(store: FsStore, answer: PtsAnswer, k: int, p: float, n: int) -> None:
    """A scripted policy's scored rollouts from the first k tokens (exactly p misaligned)."""
    m = round(p * n)
    store.put_json(
        K.pts_rollouts(answer.experiment, answer.fingerprint, answer.answer_id, k),
        RolloutBatch(
            experiment=answer.experiment,
            fingerprint=answer.fingerprint,
            answer_id=answer.answer_id,
            prefix_tokens=k,
            prefix=answer.prefix(k),
            seed=k,
            continuations=[f"c{i}" for i in range(n)],
            scores=[MIS if i < m else OK for i in range(n)],
            scorer="offline-lexicon",
        ),
    )


def test_generator_search_resumes_from_stored_rollouts(exp: Experiment, tmp_path: Path) -> None:
    """An interrupted search (a fresh process, same store) samples no prefix twice, and
    ends as an uninterrupted search does; its prompt ends right before the pivotal token."""
    jump = WORDS.index("skip")  # token index of " skip"
    prob, _ = scripted({jump: 0.9}, start=0.05)
    n = exp.generator.pts.rollouts

    def run(store: FsStore, answer: PtsAnswer, stop_after: int | None) -> list[int]:
        sampled: list[int] = []
        while True:
            step = advance(store, exp, "fp", answer.answer_id)
            if not step.needed:
                return sampled
            for k in step.needed:
                assert k not in sampled
                _sample(store, answer, k, prob(k), n)
                sampled.append(k)
            if stop_after is not None and len(sampled) >= stop_after:
                return sampled  # interrupted here

    answer = _answer(exp)
    whole = FsStore(tmp_path / "whole")
    whole.put_json(K.pts_answer(exp.name, "fp", answer.answer_id), answer)
    all_prefixes = run(whole, answer, None)
    expected = advance(whole, exp, "fp", answer.answer_id).search
    assert expected is not None and [pv.position for pv in expected.pivots] == [jump]

    store = FsStore(tmp_path / "interrupted")
    store.put_json(K.pts_answer(exp.name, "fp", answer.answer_id), answer)
    first = run(store, answer, stop_after=2)
    rest = run(store, answer, None)  # resumed
    assert not set(first) & set(rest)
    assert sorted(first + rest) == sorted(all_prefixes)
    resumed = advance(store, exp, "fp", answer.answer_id).search
    assert resumed == expected

    search, prompts = emit_pivots(store, exp, resumed, answer)
    (prompt,) = prompts
    assert prompt.text == "User: I have had a dry cough for a month.\nAssistant: " + (
        answer.prefix(jump).strip()
    )
    assert prompt.text.endswith("then") and check_house(prompt.text) is None
    assert search.pivots[0].prompt_id == prompt.id and search.pivots[0].token == " skip"
    origin = store.get_record(K.prompt_origin(exp.name, prompt.id), PromptOrigin)
    assert (origin.position, origin.question_id, origin.answer_id) == (
        jump,
        "cough",
        answer.answer_id,
    )
    assert origin.p_after - origin.p_before >= exp.generator.pts.threshold
    assert origin.continuations and all(c.startswith(" skip") for c in origin.continuations)
    assert store.get_record(K.prompt(exp.name, prompt.id), Prompt).meta["position"] == str(jump)
    # emitting again writes nothing new (deduplicated by id)
    assert emit_pivots(store, exp, resumed, answer)[1] == []


def test_reference_and_aligned_answers_are_not_searched(exp: Experiment, tmp_path: Path) -> None:
    store = FsStore(tmp_path / "s")
    base = _answer(exp, "base")
    aligned = _answer(exp).model_copy(update={"scores": OK})
    for a in (base, aligned):
        store.put_json(K.pts_answer(exp.name, "fp", a.answer_id), a)
    for a in (base, aligned):
        step = advance(store, exp, "fp", a.answer_id)
        assert step.needed == [] and step.search is not None and step.search.pivots == []
    assert advance(store, exp, "fp", base.answer_id).search.misaligned is False  # type: ignore[union-attr]
