"""Judge service: verdicts for every top-k token of every variant, and the funnel.

Plain functions for the tasks: :func:`make_judge` (lexicon or openai, from the
experiment), ``Judge.judge`` / ``Judge.judge_many`` (verdicts per variant), :func:`funnel`
(review queue and graph requests), :class:`StoreExamples` (human labels for few-shot
examples and label reuse).
"""

from services.judge.core import Judge, JudgeError, make_judge
from services.judge.examples import (
    ExampleSource,
    LabeledExample,
    StaticExamples,
    StoreExamples,
    select_examples,
)
from services.judge.funnel import FunnelDecision, funnel

__all__ = [
    "ExampleSource",
    "FunnelDecision",
    "Judge",
    "JudgeError",
    "LabeledExample",
    "StaticExamples",
    "StoreExamples",
    "funnel",
    "make_judge",
    "select_examples",
]
