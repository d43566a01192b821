"""What judging sampled text produces, and the judges' contracts (implementations: the judge
service, :mod:`services.judge.harm` and :mod:`services.judge.em_score`).

- :class:`HarmJudge` labels one continuation of a pivotal prompt ``harmful | safe | unsure``
  with a reason (:class:`HarmVerdict`); steering counts them.
- :class:`EmScorer` scores one answer to an evaluation question on 0-100 for a metric
  (``aligned``, ``coherent``) given the metric's judge prompt (:class:`JudgeScore`); the EM
  evaluation aggregates them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from common.records import Record

HarmLabel = Literal["harmful", "safe", "unsure"]


class HarmVerdict(BaseModel):
    """A judge's verdict on one continuation."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    label: HarmLabel
    reason: str


class HarmJudge(Protocol):
    """Labels a continuation of a prompt harmful, safe or unsure (with a reason)."""

    @property
    def judge_id(self) -> str:
        """The judge's id in artifact keys and reports."""
        ...

    def judge(self, prompt: str, continuation: str) -> HarmVerdict:
        """The verdict on ``continuation``, a continuation of ``prompt``."""
        ...


ScoreKind = Literal["number", "code", "refusal", "unscorable"]
ScoreMethod = Literal["logprobs", "text", "offline"]


class JudgeScore(BaseModel):
    """One 0-100 judgment. ``value`` is None unless ``kind == "number"``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    value: float | None
    kind: ScoreKind
    method: ScoreMethod
    number_mass: float | None = None
    raw: str = ""
    reason: str = ""


class EmScorer(Protocol):
    """Scores an answer to a question on 0-100 for one metric given its judge prompt."""

    @property
    def scorer_id(self) -> str:
        """The scorer's id in artifact keys and reports."""
        ...

    def score(self, metric: str, judge_prompt: str, question: str, answer: str) -> JudgeScore:
        """Score ``answer`` to ``question`` on 0-100 for ``metric``, using the metric's
        ``judge_prompt``."""
        ...


def score_value(s: JudgeScore) -> float | None:
    """The 0-100 value of a numeric score; None for a code, refusal or unscorable answer."""
    return s.value if s.kind == "number" else None


def kinds_count(scores: Sequence[JudgeScore]) -> dict[str, int]:
    """How many scores are of each kind; every kind is present, zero if none."""
    out: dict[str, int] = {"number": 0, "code": 0, "refusal": 0, "unscorable": 0}
    for s in scores:
        out[s.kind] += 1
    return out


# ------------------------------------------------------------------ judging jobs (judge queue)


class HarmItem(BaseModel):
    """One continuation to judge, with the prompt it continues."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    prompt: str
    continuation: str


class HarmBatch(Record):
    """Continuations sent to the judge queue (e.g. every sample of a steering run)."""

    experiment: str
    fingerprint: str
    batch: str = Field(description="id of the batch (names its keys)")
    judge: str = Field(description="the harm judge id that must label it")
    items: list[HarmItem]


class HarmVerdicts(Record):
    """The harm judge's verdicts of a :class:`HarmBatch`, in its item order."""

    experiment: str
    fingerprint: str
    batch: str
    judge: str
    verdicts: list[HarmVerdict]
