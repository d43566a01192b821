"""Queues and task names, defined once (import-light: the review UI and the supervisor use them
without importing Celery).

A task named ``emc.<queue>.<name>`` runs on queue ``<queue>`` (:func:`queue_of`). The module
that defines each task is listed next to it.
"""

from __future__ import annotations

QUEUES: tuple[str, ...] = ("generate", "judge", "gpu_fast", "gpu", "analysis")
"""The Celery queues, one per service, and the GPU's two lanes (see docs/architecture.md)."""

GPU_QUEUES: tuple[str, ...] = ("gpu_fast", "gpu")
"""The GPU lanes, fast first: ``gpu_fast`` holds the short forward passes that feed the review
queue (top-k, continuations, steering samples); ``gpu`` holds attribution graphs. A worker
serving both lists ``gpu_fast`` first, so its next task is a fast one whenever one waits."""

GENERATE_BATCH = "emc.generate.batch"  # services.generator.tasks
GENERATE_TICK = "emc.generate.tick"  # services.generator.tasks (beat)
GPU_LOGITS = "emc.gpu_fast.logits"  # services.attribution.tasks (one prompt: retries, redrive)
GPU_LOGITS_BATCH = "emc.gpu_fast.logits_batch"  # services.attribution.tasks (a generated batch)
GPU_GRAPH = "emc.gpu.graph"  # services.attribution.tasks
GPU_CONTINUATIONS = "emc.gpu_fast.sample_continuations"  # services.attribution.tasks
GPU_STEER = "emc.gpu_fast.steer"  # services.analysis.tasks (sampling via attribution's runtime)
GENERATE_PTS = "emc.generate.pts_step"  # services.generator.tasks (answers: advance a search)
GPU_PTS_ANSWERS = "emc.gpu.pts_answers"  # services.attribution.tasks (answers generator)
GPU_PTS_ROLLOUTS = "emc.gpu.pts_rollouts"  # services.attribution.tasks (answers generator)
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
