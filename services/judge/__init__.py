"""Judge service: verdicts for every top-k token of every variant, the funnel, and the text
judges of steering and the EM evaluation.

Plain functions for the tasks: :func:`make_judge` (lexicon or openai, from the experiment),
``Judge.judge`` / ``Judge.judge_many`` (verdicts per variant), :func:`funnel` (review queue
and graph requests), :func:`make_harm_judge` (steered continuations) and
:func:`make_em_scorer` (EM-evaluation answers). Few-shot examples come from
:mod:`common.examples`.
"""

from services.judge.core import Judge, JudgeError
from services.judge.factory import make_em_scorer, make_harm_judge, make_judge
from services.judge.funnel import funnel

__all__ = ["Judge", "JudgeError", "funnel", "make_em_scorer", "make_harm_judge", "make_judge"]
