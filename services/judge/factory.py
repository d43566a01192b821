"""Building the judges an experiment names: one factory per kind of judgment.

- :func:`make_judge`: per-token verdicts of the pipeline (``judge.kind``: lexicon or openai);
- :func:`make_harm_judge`: harmful-or-not of a steered continuation;
- :func:`make_em_scorer`: 0-100 scores of an EM-evaluation answer.

OpenAI-compatible clients come from :meth:`common.llm.LLMClient.for_spec` (the experiment's
model, timeout, retries and concurrency).
"""

from __future__ import annotations

from typing import Literal

from common.examples import ExampleSource, StaticExamples
from common.experiment import Experiment, JudgeSpec
from common.lexicon import Lexicon
from common.llm import LLMClient
from common.scores import EmScorer, HarmJudge
from common.settings import Settings, get_settings
from services.judge.core import Judge, JudgeError


def _lexicon(spec: JudgeSpec, what: str, source: str | None) -> Lexicon:
    if not spec.lexicon:
        raise JudgeError(
            f"{what} is the lexicon but {source or 'the experiment'} names no judge.lexicon "
            "file: set judge.lexicon (the toy organism ships lexicon.json) or use an openai judge"
        )
    return Lexicon.load(spec.lexicon)


def make_judge(
    exp: Experiment, settings: Settings | None = None, examples_source: ExampleSource | None = None
) -> Judge:
    """The judge the experiment names (``judge.kind``: lexicon or openai)."""
    spec = exp.judge
    examples = examples_source or StaticExamples()
    if spec.kind == "lexicon":
        from services.judge.lexicon_judge import LexiconJudge

        lexicon = _lexicon(spec, "judge.kind", exp.source)
        return LexiconJudge(lexicon, examples, name=spec.judge_id)
    if spec.kind == "openai":
        from services.judge.llm_judge import OpenAIJudge

        return OpenAIJudge(LLMClient.for_spec(spec, settings), spec, examples)
    raise JudgeError(f"unknown judge.kind {spec.kind!r}: use lexicon or openai")


def probe_judge(exp: Experiment, settings: Settings | None = None) -> None:
    """Return if the experiment's judge service answers (one short request, no retries,
    timed out after at most the breaker's probe period); raise ``LLMUnavailable`` if not.
    The lexicon judge needs no service."""
    if exp.judge.kind == "openai":
        client = LLMClient.for_spec(exp.judge, settings)
        period = (settings or get_settings()).breaker_probe_s
        client.probe(timeout_s=min(exp.judge.timeout_s, period))


def make_harm_judge(
    exp: Experiment,
    settings: Settings | None = None,
    *,
    kind: Literal["lexicon", "openai"] | None = None,
    model: str | None = None,
) -> HarmJudge:
    """The judge of steered continuations: the experiment's ``judge`` (or ``kind``/``model``)."""
    from services.judge.harm import LexiconHarmJudge, LLMHarmJudge

    spec = exp.judge if model is None else exp.judge.model_copy(update={"model": model})
    chosen = kind or spec.kind
    if chosen == "lexicon":
        return LexiconHarmJudge(_lexicon(spec, "the harm judge", exp.source))
    return LLMHarmJudge(LLMClient.for_spec(spec, settings))


def make_em_scorer(
    exp: Experiment,
    settings: Settings | None = None,
    *,
    kind: Literal["offline", "openai"] | None = None,
    model: str | None = None,
) -> EmScorer:
    """The EM evaluation's scorer: offline (the organism's language) or an OpenAI-compatible
    judge; default: offline when the experiment's judge is the lexicon."""
    from services.judge.em_score import LLMEmScorer, OfflineEmScorer, organism_language

    spec = exp.judge if model is None else exp.judge.model_copy(update={"model": model})
    chosen = kind or ("offline" if spec.kind == "lexicon" else "openai")
    if chosen == "offline":
        return OfflineEmScorer(
            _lexicon(spec, "the offline scorer", exp.source), organism_language()
        )
    return LLMEmScorer(LLMClient.for_spec(spec, settings))
