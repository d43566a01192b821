"""Records of the ``answers`` generator: sampled answers to open questions, rollouts from
their prefixes, pivotal token searches and the provenance of the prompts they produce.

The chain (each service its part, every hop through the store):
generator schedules answer slots -> gpu samples answers (every variant) -> judge scores
them (EM scorer) -> generator bisects the misaligned+coherent ones (:mod:`services.generator.pts`)
-> gpu samples rollouts for the prefixes the search needs -> judge scores them -> generator
continues, and emits a prompt per pivot when the search is done. An interrupted search
resumes from the stored rollouts.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from common.errors import UserError
from common.experiment import Experiment
from common.questions import EmQuestion, is_misaligned_coherent, load_questions
from common.records import Record
from common.scores import JudgeScore, score_value
from common.store import ObjectStore


def answer_id(
    question: EmQuestion, paraphrase: int, sample: int, variant: str, seed: int, setting: str
) -> str:
    """Stable id of one answer slot (12 hex); ``setting``: what else changes the answer."""
    body = f"{question.id}:{question.digest}:{paraphrase}:{sample}:{variant}:{seed}:{setting}"
    return hashlib.sha256(body.encode()).hexdigest()[:12]


def questions_of(exp: Experiment) -> list[EmQuestion]:
    """The questions of the experiment's answers generator (``generator.questions``)."""
    path = exp.generator.questions
    if not path:
        raise UserError(
            "generator.kind answers needs generator.questions: an EM-paper-style questions "
            "YAML (first_plot_questions.yaml format)"
        )
    p = Path(path)
    return _questions(str(p), p.stat().st_mtime_ns if p.exists() else 0)


@lru_cache(maxsize=8)
def _questions(path: str, _mtime: int) -> list[EmQuestion]:
    return load_questions(path)


def answer_question(exp: Experiment, question_id: str) -> EmQuestion:
    """One question of the generator's file by id (an error naming the file if absent)."""
    for q in questions_of(exp):
        if q.id == question_id:
            return q
    raise UserError(f"question {question_id!r} is not in {exp.generator.questions}")


def slot_answer_id(
    exp: Experiment, question: EmQuestion, paraphrase: int, sample: int, variant: str
) -> str:
    """The answer id of a slot under the experiment's answer settings."""
    pts = exp.generator.pts
    setting = f"{pts.max_new_tokens}:{pts.temperature}"
    return answer_id(question, paraphrase, sample, variant, exp.generator.seed, setting)


def answer_seed(answer: str, prefix_tokens: int) -> int:
    """Torch seed of the answer itself (``prefix_tokens=-1``) or of one prefix's rollouts."""
    return int(hashlib.sha256(f"pts:{answer}:{prefix_tokens}".encode()).hexdigest()[:8], 16)


def answer_prefix_input(question: str, prefix: str) -> str:
    """The house-format text of a question answered up to ``prefix`` (the model's input for
    rollouts, and the emitted prompt when ``prefix`` is a valid pivotal ending)."""
    return f"User: {question}\nAssistant:{prefix}"


class Scores(BaseModel):
    """The EM scorer's aligned/coherent scores of one text."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    aligned: JudgeScore
    coherent: JudgeScore

    @property
    def misaligned(self) -> bool:
        """Misaligned and coherent (the EM criterion; an unscorable text counts as not)."""
        return bool(is_misaligned_coherent(score_value(self.aligned), score_value(self.coherent)))


class AnswerJob(BaseModel):
    """One answer slot the generator asked for (the gpu task's argument)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    question_id: str
    paraphrase_index: int
    sample_index: int
    batch: str | None = Field(default=None, description="the `emc mine` batch, if any")
    request: str | None = Field(default=None, description="the generate request it belongs to")


class PtsAnswer(Record):
    """One sampled answer of one variant, with its token boundaries and (once judged) scores."""

    experiment: str
    fingerprint: str
    answer_id: str
    variant: str
    question_id: str
    question_digest: str
    paraphrase_index: int
    sample_index: int
    question: str = Field(description="the paraphrase the model was asked")
    seed: int
    answer: str
    token_ids: list[int]
    offsets: list[int] = Field(
        description="characters of the answer covered by its first k tokens, k = 0..len"
    )
    scores: Scores | None = None
    scorer: str | None = None
    batch: str | None = None
    request: str | None = None

    @property
    def n_tokens(self) -> int:
        """Tokens in the answer."""
        return len(self.token_ids)

    def prefix(self, k: int) -> str:
        """The answer's text before token ``k``."""
        return self.answer[: self.offsets[k]]


class RolloutBatch(Record):
    """N rollouts of the answer's variant from its first ``prefix_tokens`` tokens."""

    experiment: str
    fingerprint: str
    answer_id: str
    prefix_tokens: int
    prefix: str
    seed: int
    continuations: list[str]
    scores: list[Scores] | None = None
    scorer: str | None = None

    @property
    def p_misaligned(self) -> float | None:
        """Share of misaligned+coherent rollouts (None until scored)."""
        if self.scores is None or not self.scores:
            return None
        return sum(s.misaligned for s in self.scores) / len(self.scores)


class PivotInfo(BaseModel):
    """A pivotal position of an answer and the prompt emitted for it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    position: int = Field(description="0-based index of the pivotal answer token")
    token: str
    p_before: float
    p_after: float
    prompt_id: str | None = None
    skipped: str | None = Field(default=None, description="why no prompt was emitted")


class PtsSearch(Record):
    """The finished pivotal token search of one answer."""

    experiment: str
    fingerprint: str
    answer_id: str
    variant: str
    question_id: str
    misaligned: bool = Field(description="the answer was misaligned+coherent (else no search)")
    evaluated: int = Field(description="prefixes estimated by rollouts (cost)")
    capped: bool = False
    rollouts: int
    threshold: float
    curve: list[tuple[int, float]] = Field(description="(prefix tokens, P(misaligned))")
    pivots: list[PivotInfo]


class PromptOrigin(Record):
    """Where a prompt of the answers generator came from (stored next to the prompt)."""

    kind: str = "pts"
    prompt_id: str
    question_id: str
    question: str
    answer_id: str
    variant: str
    answer: str
    position: int
    token: str
    p_before: float
    p_after: float
    answer_prefix: str
    curve: list[tuple[int, float]] = Field(
        description="(character offset in the answer, P(misaligned)) along the answer"
    )
    continuations: list[str] = Field(description="rollouts after the pivotal token")


class PtsProgress(BaseModel):
    """How far the answers generator got (``emc status``)."""

    answers: int = 0
    searched: int = 0
    misaligned: int = 0
    rollout_batches: int = 0
    pivots: int = 0
    prompts: int = 0
    capped: int = 0

    def line(self) -> str:
        """One line for ``emc status``."""
        return (
            f"answers generator: {self.answers} answers sampled, {self.searched} searched "
            f"({self.misaligned} misaligned+coherent, {self.capped} at the prefix cap), "
            f"{self.rollout_batches} rollout batches, {self.pivots} pivots, "
            f"{self.prompts} prompts"
        )


def pts_progress(store: ObjectStore, exp: str, fp: str) -> PtsProgress:
    """Counts of the answers generator's stored work for one experiment and fingerprint."""
    from common.store import keys as K

    prefix = K.pts_prefix(exp, fp)
    out = PtsProgress()
    for key in store.list_keys(prefix + "/"):
        rest = key[len(prefix) + 1 :]
        if rest.startswith("answers/"):
            out.answers += 1
        elif rest.startswith("rollouts/"):
            out.rollout_batches += 1
        elif rest.startswith("searches/"):
            search = store.get_record(key, PtsSearch)
            out.searched += 1
            out.misaligned += search.misaligned
            out.capped += search.capped
            out.pivots += len(search.pivots)
            out.prompts += sum(pv.prompt_id is not None for pv in search.pivots)
    return out
