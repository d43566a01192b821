"""Leases on the task messages a live worker holds: a dead worker's tasks come back within
about a minute, and a healthy worker's long task is never handed out twice.

kombu's Redis transport keeps every unacknowledged message in the hash ``unacked`` and the
time it was delivered in the sorted set ``unacked_index``. Every worker sweeps that index
periodically (``unacked_restore_interval`` x ``unacked_restore_throttle``) and puts back on
its queue each message whose entry is older than ``visibility_timeout``. On its own, the
timeout must exceed the longest task (else a healthy task runs twice), so a task of a killed
worker waits that long (hours) before it returns.

Here every worker renews, every ``lease_renew_s``, the entries of all the messages it holds
(running, waiting for a pool slot, or held until their ETA) to "now". The visibility
timeout becomes a lease: it runs out only once the worker stops renewing (SIGKILL, OOM,
machine lost), whatever the task's length. A killed worker's task is back on its queue
``visibility_timeout_s`` to ``visibility_timeout_s + lease_renew_s + sweep`` seconds after
the kill, swept by any live worker (or by the replacement at its start).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

log = logging.getLogger(__name__)


def held_tags(channel: Any) -> list[str]:
    """Delivery tags of the messages ``channel`` holds unacknowledged (kombu's QoS)."""
    qos = getattr(channel, "qos", None)
    delivered = getattr(qos, "_delivered", None)
    if delivered is None:
        return []
    for _ in range(5):
        try:
            return [str(tag) for tag in list(delivered)]
        except RuntimeError:  # the event loop changed it while we copied: try again
            continue
    return []


def renew(client: redis.Redis, index_key: str, tags: list[str], now: float | None = None) -> int:
    """Set the delivery time of ``tags`` in kombu's unacked index to ``now``.

    Only entries that exist are touched (``XX``): a message acknowledged meanwhile is not
    brought back. Returns how many entries were renewed.
    """
    if not tags:
        return 0
    stamp = time.time() if now is None else now
    changed = client.zadd(index_key, dict.fromkeys(tags, stamp), xx=True, ch=True)
    return int(changed)  # type: ignore[arg-type]


class LeaseKeeper:
    """A daemon thread that renews the leases of a worker's held messages.

    ``channel`` returns the consumer's current channel (it changes when the worker
    reconnects) or None before the consumer started.
    """

    def __init__(
        self,
        channel: Callable[[], Any],
        broker_url: str,
        every_s: float,
    ) -> None:
        self.channel = channel
        self.every_s = every_s
        self._client = redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="emc-lease-keeper", daemon=True)
        self.renewed = 0

    def start(self) -> None:
        """Start the renewing thread (a daemon: it never keeps the worker alive)."""
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end (at once, or after its current round)."""
        self._stop.set()

    def renew_once(self) -> int:
        """Renew the leases of every message held now; returns how many were renewed."""
        ch = self.channel()
        if ch is None:
            return 0
        index_key = getattr(ch, "unacked_index_key", None)
        if not index_key:  # not the Redis transport: nothing to renew
            return 0
        n = renew(self._client, str(index_key), held_tags(ch))
        self.renewed += n
        return n

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.renew_once()
            except redis.RedisError as e:
                log.warning(
                    "could not renew task leases (will retry in %.0fs): %s", self.every_s, e
                )
            except Exception:  # never let the keeper die: a dead keeper means duplicate runs
                log.exception("lease keeper: unexpected error")
