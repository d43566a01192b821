"""The one Celery app of emc: queues, routing, reliability settings, the task base class.

Tasks are named ``emc.<queue>.<name>`` and go to that queue (``generate``, ``judge``,
``gpu``, ``analysis``). Every task is acknowledged late and requeued if its worker dies:
a live worker renews the lease of every message it holds (:mod:`common.leases`), so a
dead worker's task is back on its queue about ``visibility_timeout_s`` after the crash
while a healthy long task is never handed out twice. A worker also pauses a queue while
its circuit breaker is open (:mod:`common.breaker`: the judge's endpoint is down).
Messages are JSON only, and results are ignored (tasks write artifacts to the store and
enqueue the next step; they never wait on each other).

Queues, task names and the task modules every worker imports are defined once, in
:mod:`common.tasknames`.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import MutableMapping
from typing import Any

from celery import Celery, Task, bootsteps, signals
from kombu.entity import Exchange, Queue

from common.retry import TASK_RETRY
from common.settings import Settings, get_settings
from common.system.broker import BrokerError, broker_url, check_embedded_owner, is_up
from common.system.malloc import limit_malloc_arenas
from common.tasknames import QUEUES, TASK_MODULES, queue_of


class TransientError(Exception):
    """A fault worth retrying (network blip, rate limit, broker hiccup); anything else fails."""


def route_task(
    name: str,
    args: Any = None,
    kwargs: Any = None,
    options: Any = None,
    task: Any = None,
    **kw: Any,
) -> dict[str, str] | None:
    """Route ``emc.<queue>.*`` to ``<queue>``; refuse other names (they would sit unconsumed)."""
    if name.startswith("celery."):
        return None
    queue = queue_of(name)
    if queue is not None:
        return {"queue": queue}
    raise ValueError(
        f"task {name!r} has no queue: name tasks emc.<queue>.<name> with queue one of "
        f"{', '.join(QUEUES)}"
    )


def _queue(name: str) -> Queue:
    """A durable direct queue of that name (kombu's constructors are untyped)."""
    queue: Queue = Queue(name, Exchange(name, type="direct"), routing_key=name)  # type: ignore[no-untyped-call]
    return queue


def configure(app: Celery, settings: Settings) -> None:
    """Apply emc's settings to ``app`` (broker URL, queues, reliability, serialization)."""
    transport = {
        "visibility_timeout": settings.visibility_timeout_s,
        "unacked_restore_interval": settings.unacked_restore_s,
        "unacked_restore_throttle": settings.unacked_restore_throttle,
        # a worker on several queues takes from the first non-empty one in order (gpu_fast
        # before gpu), not round robin: fast work is never behind a waiting graph
        "queue_order_strategy": "priority",
    }
    app.conf.update(
        broker_url=broker_url(settings),
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_queues=[_queue(q) for q in QUEUES],
        task_routes=(route_task,),
        task_default_queue=QUEUES[0],
        worker_hijack_root_logger=True,
        worker_redirect_stdouts_level="INFO",
        include=list(TASK_MODULES),
        timezone="UTC",
        enable_utc=True,
    )


class _TaskLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes messages with ``[task=<id> prompt=<id>]`` and adds both as record fields."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(self.extra or {})
        kwargs["extra"] = {**extra, **kwargs.get("extra", {})}
        return f"[task={extra.get('task_id')} prompt={extra.get('prompt_id')}] {msg}", kwargs


class EmcTask(Task):  # type: ignore[misc]
    """Base of every emc task: late ack, retries with backoff on :class:`TransientError` only.

    ``self.log`` is a logger whose records carry the task id and the prompt id (the
    task's ``prompt_id`` argument, given by keyword or position; ``-`` if it has none).
    """

    autoretry_for = (TransientError,)
    retry_backoff = TASK_RETRY.base_delay_s
    retry_backoff_max = TASK_RETRY.max_delay_s
    retry_jitter = True
    max_retries = TASK_RETRY.max_retries
    acks_late = True
    reject_on_worker_lost = True

    @property
    def log(self) -> logging.LoggerAdapter:  # type: ignore[type-arg]
        """A logger whose messages are prefixed and tagged with this request's task id and prompt
        id."""
        return _TaskLog(
            logging.getLogger(self.name),
            {"task_id": self.request.id, "prompt_id": self._prompt_id()},
        )

    def _prompt_id(self) -> str:
        request = self.request
        kwargs = request.kwargs or {}
        if "prompt_id" in kwargs:
            return str(kwargs["prompt_id"])
        try:
            bound = inspect.signature(self.run).bind_partial(*(request.args or ()), **kwargs)
        except (TypeError, ValueError):
            return "-"
        return str(bound.arguments.get("prompt_id", "-"))


class LeaseRenewal(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer bootstep: renew the leases of the messages this worker holds."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.keeper: Any = None

    def start(self, parent: Any) -> None:
        """Start the lease keeper on the consumer's channel (once: a reconnect keeps the running
        thread)."""
        if self.keeper is not None:  # restarted after a reconnect: the thread goes on
            return
        from common.leases import LeaseKeeper

        settings = get_settings()
        self.keeper = LeaseKeeper(
            lambda: getattr(parent.task_consumer, "channel", None),
            parent.app.conf.broker_url,
            settings.lease_renew_s,
        )
        self.keeper.start()

    def shutdown(self, parent: Any) -> None:
        """Stop the lease keeper thread."""
        if self.keeper is not None:
            self.keeper.stop()


class BreakerPause(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer bootstep: stop consuming a queue while its circuit breaker is open."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.pauser: Any = None

    def start(self, parent: Any) -> None:
        """Start the queue pauser on the queues this consumer takes (once: a reconnect keeps it)."""
        if self.pauser is not None:
            return
        import redis

        from common.breaker import QueuePauser

        def consumed() -> list[str]:
            tc = parent.task_consumer
            return [q.name for q in tc.queues] if tc is not None else []

        self.pauser = QueuePauser(
            redis.Redis.from_url(parent.app.conf.broker_url, socket_timeout=5),
            consumed,
            pause=lambda q: parent.call_soon(parent.cancel_task_queue, q),
            resume=lambda q: parent.call_soon(parent.add_task_queue, q),
            probe_every_s=get_settings().breaker_probe_s,
        )
        self.pauser.start()

    def shutdown(self, parent: Any) -> None:
        """Stop the queue pauser thread."""
        if self.pauser is not None:
            self.pauser.stop()


def make_app(settings: Settings | None = None) -> Celery:
    """The emc Celery app on ``settings`` (default: the environment's), with the lease-renewal and
    breaker bootsteps added to its consumer."""
    app = Celery("emc", task_cls=EmcTask)
    configure(app, settings or get_settings())
    app.steps["consumer"].add(LeaseRenewal)
    app.steps["consumer"].add(BreakerPause)
    return app


app = make_app()


@signals.celeryd_init.connect  # type: ignore[untyped-decorator]
def _require_broker(sender: Any = None, conf: Any = None, **kwargs: Any) -> None:
    """A worker without EMC_BROKER_URL needs the embedded Redis of `emc up`: fail clearly."""
    settings = get_settings()
    if settings.broker_url:
        return
    url = broker_url(settings)
    if not is_up(url, timeout_s=2.0):
        msg = (
            f"emc worker: no broker. EMC_BROKER_URL is unset and the embedded Redis "
            f"({url}) is not running: run `emc up` (it starts Redis and the workers), "
            "or set EMC_BROKER_URL=redis://host:port/0"
        )
        print(msg, file=sys.stderr, flush=True)
        raise SystemExit(2)
    try:
        check_embedded_owner(settings)
    except BrokerError as e:
        print(f"emc worker: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


@signals.worker_init.connect  # type: ignore[untyped-decorator]
def _limit_malloc_arenas(sender: Any = None, **kwargs: Any) -> None:
    """Flat resident memory in long-lived workers (forked pool children inherit it)."""
    limit_malloc_arenas(get_settings().malloc_arena_max)
