"""Judge tasks (queue ``judge``): thin shells over :mod:`.steps`."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

from common import tasknames as T
from common.breaker import register_probe
from common.celery_app import app
from common.pipeline import task_step
from services.judge.steps import step_judge

if TYPE_CHECKING:
    from common.scores import EmScorer, HarmJudge
    from services.judge.core import Judge


@lru_cache(maxsize=1)
def _judge() -> Judge:
    """One judge per worker process; its few-shot pool is read from the store per call."""
    from common.context import get_context
    from common.examples import StoreExamples
    from services.judge.factory import make_judge

    ctx = get_context()
    examples = StoreExamples(ctx.store, ctx.exp, pinned_for=ctx.exp.judge.judge_id)
    return make_judge(ctx.exp, ctx.settings, examples)


def _probe() -> None:
    """Does the judge's endpoint answer? (asked by the paused judge queue's breaker)"""
    from common.context import get_context
    from services.judge.factory import probe_judge

    ctx = get_context()
    probe_judge(ctx.exp, ctx.settings)


register_probe(T.queue_of(T.JUDGE_VERDICTS) or "judge", _probe)


@app.task(name=T.JUDGE_VERDICTS, bind=True)
def verdicts(self: Any, exp: str, prompt_id: str) -> int:
    """Judge every top-k token of every variant; route the prompt (review, graphs, done)."""
    return task_step(
        self, exp, prompt_id, "judge", lambda ctx: step_judge(ctx, _judge(), prompt_id)
    )


@lru_cache(maxsize=1)
def _harm_judge() -> HarmJudge:
    from common.context import get_context
    from services.judge.factory import make_harm_judge

    ctx = get_context()
    return make_harm_judge(ctx.exp, ctx.settings)


@app.task(name=T.JUDGE_HARM, bind=True)
def harm(
    self: Any,
    exp: str,
    batch: str,
    then: str | None = None,
    then_kwargs: dict[str, Any] | None = None,
) -> int:
    """Label a batch of continuations (a steering run's samples), then send ``then``."""
    from services.judge.steps import step_judge_harm

    return task_step(
        self,
        exp,
        None,
        "judge-harm",
        lambda ctx: step_judge_harm(ctx, _harm_judge(), batch, then, then_kwargs or {}),
    )


@lru_cache(maxsize=1)
def _em_scorer() -> EmScorer:
    from common.context import get_context
    from services.judge.factory import make_em_scorer

    ctx = get_context()
    return make_em_scorer(ctx.exp, ctx.settings, kind=ctx.exp.generator.pts.scorer)


@app.task(name=T.JUDGE_PTS_SCORE, bind=True)
def pts_score(self: Any, exp: str, answer_id: str, keys: list[str]) -> int:
    """Answers generator: EM scores of an answer or its rollouts, then the search goes on."""
    from services.judge.steps import step_pts_score

    return task_step(
        self,
        exp,
        None,
        "pts-score",
        lambda ctx: step_pts_score(ctx, _em_scorer(), answer_id, keys),
    )
