"""Failed logins are limited per user and per client address (fixed windows in Redis,
shared by every UI process; a per-process count when Redis is down): past the limit, even
the right password is refused until the window ends."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field

import redis

log = logging.getLogger(__name__)


@dataclass
class LoginLimits:
    """``per_user`` failures per user and ``per_address`` per address in ``window_s``."""

    client: redis.Redis
    per_user: int = 5
    per_address: int = 20
    window_s: int = 300
    #: after Redis failed, count in this process only for this long (no timeout per login)
    offline_s: float = 30.0
    _local: dict[str, tuple[int, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _offline_until: float = 0.0

    def _redis_ok(self) -> bool:
        return time.monotonic() >= self._offline_until

    def _redis_failed(self, e: redis.RedisError) -> None:
        log.warning("login limits: Redis unavailable, counting in this process: %s", e)
        self._offline_until = time.monotonic() + self.offline_s

    def _keys(self, user: str, address: str) -> list[tuple[str, int]]:
        return [
            (f"emc:ui:login-failures:user:{user.strip().lower()[:64]}", self.per_user),
            (f"emc:ui:login-failures:addr:{address}", self.per_address),
        ]

    def wait_s(self, user: str, address: str) -> int:
        """Seconds until this user may try again from this address (0: now)."""
        wait = 0
        for key, limit in self._keys(user, address):
            count, ttl = self._get(key)
            if count >= limit:
                wait = max(wait, ttl, 1)
        return wait

    def failed(self, user: str, address: str) -> None:
        """Count one failed login of ``user`` from ``address``."""
        for key, _ in self._keys(user, address):
            self._incr(key)

    def succeeded(self, user: str) -> None:
        """A right password within the limits: the user's failures are forgotten."""
        key = self._keys(user, "")[0][0]
        if self._redis_ok():
            with contextlib.suppress(redis.RedisError):
                self.client.delete(key)
        with self._lock:
            self._local.pop(key, None)

    # -- counters: Redis, else this process ----------------------------------------------
    def _get(self, key: str) -> tuple[int, int]:
        remote = (0, 0)
        if self._redis_ok():
            try:
                pipe = self.client.pipeline()
                pipe.get(key)
                pipe.ttl(key)
                raw, ttl = pipe.execute()
                remote = int(raw or 0), max(int(ttl or 0), 0)
            except redis.RedisError as e:
                self._redis_failed(e)
        with self._lock:
            count, until = self._local.get(key, (0, 0.0))
        local = (count, int(until - time.monotonic())) if until > time.monotonic() else (0, 0)
        return max(remote, local)

    def _incr(self, key: str) -> None:
        if self._redis_ok():
            try:
                pipe = self.client.pipeline()
                pipe.incr(key)
                pipe.expire(key, self.window_s, nx=True)
                pipe.execute()
                return
            except redis.RedisError as e:
                self._redis_failed(e)
        with self._lock:
            count, until = self._local.get(key, (0, 0.0))
            if until <= time.monotonic():
                count, until = 0, time.monotonic() + self.window_s
            self._local[key] = (count + 1, until)
