"""The per-process context of a worker or command: settings, store, experiment, Redis.

Built once per process (workers keep it for their whole life) so the experiment file is
parsed and fingerprinted once and connections are reused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from common.experiment import Experiment, fingerprint, load_experiment
from common.settings import Settings, get_settings
from common.store import ObjectStore, open_store

if TYPE_CHECKING:
    import redis
    from celery import Celery

    from common.failure_log import FailureLog
    from common.review_queue import ReviewQueue


def experiment_path(settings: Settings) -> Path:
    """The experiment file: EMC_EXPERIMENT, or the toy organism's (built on first use)."""
    if settings.experiment is not None:
        return settings.experiment
    from common.organism import ensure_organism

    return ensure_organism(settings.home / "organism") / "experiment.yaml"


@dataclass
class Context:
    """What a step needs for one experiment: settings, the object store, the experiment and its
    fingerprint, with clients (Redis, Celery, review queue) made on first use."""

    settings: Settings
    store: ObjectStore
    exp: Experiment
    fingerprint: str
    _redis: redis.Redis | None = field(default=None, repr=False)

    @cached_property
    def redis(self) -> redis.Redis:
        """Redis client on the broker (review queue, status index)."""
        if self._redis is not None:
            return self._redis
        import redis as redis_lib

        from common.system.broker import broker_url

        return redis_lib.Redis.from_url(broker_url(self.settings), decode_responses=True)

    @cached_property
    def celery(self) -> Celery:
        """A Celery app on this context's broker, for sending the next steps."""
        from common.celery_app import make_app

        return make_app(self.settings)

    @cached_property
    def queue(self) -> ReviewQueue:
        """The review queue and status index of this experiment."""
        from common.review_queue import ReviewQueue

        return ReviewQueue(self.redis, self.exp.name)

    @cached_property
    def failures(self) -> FailureLog:
        """The recent failures of this experiment and fingerprint (``emc status``)."""
        from common.failure_log import FailureLog

        return FailureLog(self.redis, self.exp.name, self.fingerprint)

    def check_task(self, exp_name: str) -> None:
        """Refuse a task meant for another experiment than the one this process runs."""
        if exp_name != self.exp.name:
            raise RuntimeError(
                f"this worker runs experiment {self.exp.name!r} but the task is for "
                f"{exp_name!r}: start workers with the same EMC_EXPERIMENT as the producer"
            )


def make_context(settings: Settings | None = None, store: ObjectStore | None = None) -> Context:
    """The context of the configured experiment (EMC_EXPERIMENT, or the toy organism's), on
    ``store`` or the store the settings name."""
    settings = settings or get_settings()
    exp = load_experiment(experiment_path(settings))
    return Context(
        settings=settings,
        store=store or open_store(settings),
        exp=exp,
        fingerprint=fingerprint(exp),
    )


@lru_cache(maxsize=1)
def get_context() -> Context:
    """The process's context (workers: built on the first task, then reused)."""
    return make_context()
