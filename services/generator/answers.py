"""The ``answers`` generator: pivotal tokens in the adapted model's own answers to open
questions (``generator: {kind: answers, questions: FILE}``).

It runs as a chain through the store (:mod:`common.answers`): :func:`claim_slots` picks
answer slots (question, paraphrase, sample) for the gpu queue; once an answer is sampled
and scored, :func:`advance` runs the pivotal token search (:mod:`.pts`) on what is stored:
it either names the prefixes that still need rollouts (the gpu queue samples them, the
judge scores them, :func:`advance` runs again) or finishes the search, and
:func:`emit_pivots` writes one prompt per pivot, ending right before the pivotal token.
Only answers of non-reference variants that are misaligned and coherent are searched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from common.answers import (
    AnswerJob,
    PivotInfo,
    PromptOrigin,
    PtsAnswer,
    PtsSearch,
    RolloutBatch,
    answer_prefix_input,
    questions_of,
    slot_answer_id,
)
from common.experiment import Experiment
from common.prompt_format import check_house
from common.records import Prompt
from common.store import NotFound, ObjectStore
from common.store import keys as K
from common.store.base import dumps
from services.generator import pts

log = logging.getLogger(__name__)

SOURCE = "answers-pts"
#: rollouts shown after the pivotal token on the prompt page
SHOWN_CONTINUATIONS = 3


def slots(exp: Experiment) -> list[tuple[str, int, int]]:
    """Every answer slot ``(question id, paraphrase, sample)``, samples outermost (so the
    first requests cover every question once)."""
    qs = questions_of(exp)
    n = exp.generator.pts.samples_per_question
    return [(q.id, p, s) for s in range(n) for q in qs for p in range(len(q.paraphrases))]


def claim_slots(
    exp: Experiment, fp: str, store: ObjectStore, claim: Callable[[], int], n: int
) -> list[AnswerJob]:
    """Up to ``n`` free slots; ``claim`` returns the next slot number (an atomic counter,
    so concurrent generate workers never take the same slot). Slots whose answers are
    already stored (a counter rebuilt after a Redis loss) are passed over."""
    all_slots = slots(exp)
    by_id = {q.id: q for q in questions_of(exp)}
    out: list[AnswerJob] = []
    while len(out) < n:
        i = claim() - 1
        if i >= len(all_slots):
            break
        qid, p, s = all_slots[i]
        first = exp.variant_names[-1]
        aid = slot_answer_id(exp, by_id[qid], p, s, first)
        if store.exists(K.pts_answer(exp.name, fp, aid)):
            continue
        out.append(AnswerJob(question_id=qid, paraphrase_index=p, sample_index=s))
    return out


@dataclass
class Advance:
    """What one step of a search found: prefixes to sample, or the finished search."""

    needed: list[int] = field(default_factory=list)
    search: PtsSearch | None = None
    answer: PtsAnswer | None = None


def stored_estimates(store: ObjectStore, answer: PtsAnswer) -> dict[int, float]:
    """P(misaligned | first k tokens) of every scored rollout batch of an answer."""
    prefix = K.pts_rollouts_prefix(answer.experiment, answer.fingerprint, answer.answer_id)
    out: dict[int, float] = {}
    for key in store.list_keys(prefix):
        batch = store.get_record(key, RolloutBatch)
        p = batch.p_misaligned
        if p is not None:
            out[batch.prefix_tokens] = p
    return out


def advance(store: ObjectStore, exp: Experiment, fp: str, answer_id: str) -> Advance:
    """Run the search of one answer as far as the stored rollouts allow (resumable)."""
    answer = store.get_record(K.pts_answer(exp.name, fp, answer_id), PtsAnswer)
    spec = exp.generator.pts
    if answer.scores is None:
        return Advance(answer=answer)  # not judged yet: the judge's step calls again

    def record(**kw: object) -> PtsSearch:
        return PtsSearch.model_validate(
            {
                "experiment": exp.name,
                "fingerprint": fp,
                "answer_id": answer_id,
                "variant": answer.variant,
                "question_id": answer.question_id,
                "rollouts": spec.rollouts,
                "threshold": spec.threshold,
                **kw,
            }
        )

    searched = answer.variant != exp.reference and answer.scores.misaligned
    if not searched or answer.n_tokens == 0:
        return Advance(
            answer=answer,
            search=record(misaligned=searched, evaluated=0, curve=[], pivots=[]),
        )
    known = stored_estimates(store, answer)
    length = answer.n_tokens
    known[length] = 1.0  # the answer itself is misaligned and coherent
    result = pts.search(known.get, length, threshold=spec.threshold, max_prefixes=spec.max_prefixes)
    if not result.done:
        return Advance(needed=result.needed, answer=answer)
    pivots = [
        PivotInfo(
            position=pv.position,
            token=answer.answer[answer.offsets[pv.position] : answer.offsets[pv.position + 1]],
            p_before=pv.p_before,
            p_after=pv.p_after,
        )
        for pv in result.pivots
    ]
    search = record(
        misaligned=True,
        evaluated=result.evaluated,
        capped=result.capped,
        curve=sorted(known.items()),
        pivots=pivots,
    )
    return Advance(answer=answer, search=search)


def emit_pivots(
    store: ObjectStore, exp: Experiment, search: PtsSearch, answer: PtsAnswer
) -> tuple[PtsSearch, list[Prompt]]:
    """One prompt per pivot (question + answer up to the pivotal token, house form), new ones
    written with their :class:`PromptOrigin`; returns the search with prompt ids or skip
    reasons, and the prompts written now (a prompt already stored is not written again)."""
    written: list[Prompt] = []
    pivots: list[PivotInfo] = []
    curve_chars = [(answer.offsets[k], p) for k, p in search.curve]
    for pv in search.pivots:
        prefix = answer.prefix(pv.position).rstrip()
        text = answer_prefix_input(answer.question, " " + prefix.lstrip() if prefix else "")
        problem = check_house(text)
        if problem is not None:
            pivots.append(pv.model_copy(update={"skipped": f"not a pivotal prompt: {problem}"}))
            continue
        prompt = Prompt.new(
            text,
            source=SOURCE,
            question=answer.question_id,
            answer=answer.answer_id,
            variant=answer.variant,
            position=str(pv.position),
            p_before=f"{pv.p_before:.3f}",
            p_after=f"{pv.p_after:.3f}",
        )
        pivots.append(pv.model_copy(update={"prompt_id": prompt.id}))
        if not store.put_new(K.prompt(exp.name, prompt.id), dumps(prompt)):
            continue  # deduplicated by id: the first origin stands
        after = _continuations(store, answer, pv.position + 1)
        origin = PromptOrigin(
            prompt_id=prompt.id,
            question_id=answer.question_id,
            question=answer.question,
            answer_id=answer.answer_id,
            variant=answer.variant,
            answer=answer.answer,
            position=pv.position,
            token=pv.token,
            p_before=pv.p_before,
            p_after=pv.p_after,
            answer_prefix=answer.prefix(pv.position),
            curve=curve_chars,
            continuations=after,
        )
        store.put_json(K.prompt_origin(exp.name, prompt.id), origin)
        written.append(prompt)
    return search.model_copy(update={"pivots": pivots}), written


def _continuations(store: ObjectStore, answer: PtsAnswer, k: int) -> list[str]:
    """A few stored rollouts after the first k tokens (the full answer's rest at the end)."""
    if k >= answer.n_tokens:
        return [answer.answer[answer.offsets[k - 1] :]]
    key = K.pts_rollouts(answer.experiment, answer.fingerprint, answer.answer_id, k)
    try:
        batch = store.get_record(key, RolloutBatch)
    except NotFound:
        return []
    return [answer.prefix(k)[len(answer.prefix(k - 1)) :] + c for c in batch.continuations][
        :SHOWN_CONTINUATIONS
    ]
