"""Analysis tasks (queue ``analysis``): thin shells over :mod:`common.pipeline`."""

from __future__ import annotations

from typing import Any

from common.celery_app import app
from common.pipeline import step_rank, task_step


@app.task(name="emc.analysis.rank_prompt", bind=True)
def rank_prompt(self: Any, exp: str, prompt_id: str) -> int:
    """Rank the features of every variant of a prompt (cached by labels version)."""
    return task_step(self, exp, prompt_id, "analysis", lambda ctx: step_rank(ctx, prompt_id))
