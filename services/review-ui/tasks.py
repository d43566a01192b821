"""Sending pipeline tasks by name from the UI (the UI never imports task code).

The UI only needs ``send_task``; the Celery app is built lazily from ``common.celery_app``
on first use, so the UI starts (and saves labels) even when Celery cannot be set up.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from common import tasknames as T
from common.settings import Settings

#: the tasks the UI sends (names and queues from common.tasknames)
SAMPLE_CONTINUATIONS = T.GPU_CONTINUATIONS
RANK_PROMPT = T.ANALYSIS_RANK


class TaskSender(Protocol):
    """What the UI needs of a Celery app."""

    def send_task(self, name: str, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """Enqueue task ``name`` with its arguments (as ``Celery.send_task``)."""
        ...


class TaskError(RuntimeError):
    """A task could not be enqueued; the message says why and what to check."""


class LazyCelery:
    """The project's Celery app (``common.celery_app.make_app(settings)``), built on first send."""

    def __init__(self, settings: Settings, module: str = "common.celery_app") -> None:
        self.settings = settings
        self.module = module
        self._app: TaskSender | None = None

    def _resolve(self) -> TaskSender:
        if self._app is None:
            try:
                mod = importlib.import_module(self.module)
            except ModuleNotFoundError as e:
                raise TaskError(
                    f"cannot send tasks: {self.module} is not importable ({e}); "
                    "install the pipeline or start the system with `emc up`"
                ) from e
            self._app = mod.make_app(self.settings)
        return self._app

    def send_task(self, name: str, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """Send through the project's Celery app, built on first use; raises :class:`TaskError` if
        it cannot be imported."""
        return self._resolve().send_task(name, args=args, kwargs=kwargs, **options)


def enqueue(sender: TaskSender, name: str, **kwargs: Any) -> str:
    """Send task ``name`` with keyword arguments to its queue; returns the task id."""
    try:
        result = sender.send_task(name, kwargs=kwargs, queue=T.queue_of(name))
    except TaskError:
        raise
    except Exception as e:  # broker down, serialization, ...: say which task failed
        raise TaskError(f"could not enqueue {name}: {type(e).__name__}: {e}") from e
    return str(getattr(result, "id", "") or "")
