"""Queues and task names, defined once (import-light: the review UI and the supervisor use them
without importing Celery).

A task named ``emc.<queue>.<name>`` runs on queue ``<queue>`` (:func:`queue_of`). The module
that defines each task is listed next to it.
"""

from __future__ import annotations

QUEUES: tuple[str, ...] = ("generate", "judge", "gpu", "analysis")
"""The Celery queues, one per service (see docs/architecture.md)."""

GENERATE_BATCH = "emc.generate.batch"  # services.generator.tasks
GENERATE_TICK = "emc.generate.tick"  # services.generator.tasks (beat)
GENERATE_PTS = "emc.generate.pts_step"  # services.generator.tasks (answers: advance a search)
GPU_LOGITS = "emc.gpu.logits"  # services.attribution.tasks
GPU_GRAPH = "emc.gpu.graph"  # services.attribution.tasks
GPU_CONTINUATIONS = "emc.gpu.sample_continuations"  # services.attribution.tasks
GPU_PTS_ANSWERS = "emc.gpu.pts_answers"  # services.attribution.tasks (answers generator)
GPU_PTS_ROLLOUTS = "emc.gpu.pts_rollouts"  # services.attribution.tasks (answers generator)
GPU_STEER = "emc.gpu.steer"  # services.analysis.tasks (sampling through attribution's runtime)
JUDGE_VERDICTS = "emc.judge.verdicts"  # services.judge.tasks
JUDGE_PTS_SCORE = "emc.judge.pts_score"  # services.judge.tasks (answers and rollouts)
JUDGE_HARM = "emc.judge.harm"  # services.judge.tasks (continuations of a steering run)
ANALYSIS_RANK = "emc.analysis.rank_prompt"  # services.analysis.tasks
ANALYSIS_STEERING = "emc.analysis.steering"  # services.analysis.tasks (a steering run's result)

TASK_MODULES: tuple[str, ...] = (
    "services.generator.tasks",
    "services.judge.tasks",
    "services.attribution.tasks",
    "services.analysis.tasks",
)
"""Modules that define tasks; every worker imports all of them."""


def queue_of(task_name: str) -> str | None:
    """The queue of an ``emc.<queue>.<name>`` task; None for any other name."""
    parts = task_name.split(".")
    if len(parts) >= 3 and parts[0] == "emc" and parts[1] in QUEUES:
        return parts[1]
    return None
