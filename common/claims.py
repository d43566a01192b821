"""Claims on prompts under review: a reviewer who opens a prompt holds it for a while.

A claim is a lease in Redis (``emc:{exp}:claim:{pid}`` -> ``reviewer`` and the time it was
first taken), like the task leases of :mod:`common.leases`: it lasts ``ttl_s`` unless its
holder renews it (the open prompt page does, every third of the lease), so a closed tab or
a crashed browser frees the prompt on its own. Saving releases it. Only the holder can
renew or release a claim (compare-and-set in one Lua script each).

Claims are the only review state that is not rebuilt from the object store: losing them
(a Redis restart) frees every prompt, which is what an expired lease means anyway.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

SEP = "\x1f"

# KEYS[1] claim key; ARGV: reviewer, now, ttl ms. Take a free claim or renew one's own
# (keeping when it was first taken); returns the stored value, whoever holds it.
_TAKE = """
local v = redis.call('GET', KEYS[1])
if v then
  local who = string.match(v, '^([^\\31]*)')
  if who == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
  return v
end
local fresh = ARGV[1] .. '\\31' .. ARGV[2]
redis.call('SET', KEYS[1], fresh, 'PX', ARGV[3])
return fresh
"""

# KEYS[1] claim key; ARGV: reviewer. Delete it if the reviewer holds it; 1 if deleted.
_RELEASE = """
local v = redis.call('GET', KEYS[1])
if v and string.match(v, '^([^\\31]*)') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class Claim:
    """Who holds a prompt, since when (epoch seconds), and until when."""

    pid: str
    reviewer: str
    since: float
    expires: float

    def held_by(self, reviewer: str) -> bool:
        """Whether ``reviewer`` holds this claim."""
        return self.reviewer == reviewer


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Claims:
    """Claims of one experiment's prompts (any redis-py client)."""

    def __init__(self, client: redis.Redis, exp: str, ttl_s: float) -> None:
        self.redis = client
        self.exp = exp
        self.ttl_s = ttl_s
        self._take = client.register_script(_TAKE)
        self._release = client.register_script(_RELEASE)

    def key(self, pid: str) -> str:
        """The Redis key of a prompt's claim (``emc:{exp}:claim:{pid}``)."""
        return f"emc:{self.exp}:claim:{pid}"

    def _claim(self, pid: str, value: Any, ttl_ms: int | None) -> Claim:
        who, _, since = _text(value).partition(SEP)
        left = self.ttl_s if ttl_ms is None or ttl_ms < 0 else ttl_ms / 1000
        return Claim(pid, who, float(since or 0), time.time() + left)

    def take(self, pid: str, reviewer: str) -> Claim:
        """Claim ``pid`` for ``reviewer`` (or renew their claim); returns whoever holds it.

        The result is someone else's claim when they hold the prompt: nothing changes then.
        """
        value = self._take(
            keys=[self.key(pid)], args=[reviewer, f"{time.time():.3f}", int(self.ttl_s * 1000)]
        )
        claim = self._claim(pid, value, None)
        if not claim.held_by(reviewer):
            claim = self._claim(pid, value, int(self.redis.pttl(self.key(pid))))
        return claim

    def release(self, pid: str, reviewer: str) -> bool:
        """Give up ``reviewer``'s claim on ``pid``; False if they did not hold it."""
        return bool(self._release(keys=[self.key(pid)], args=[reviewer]))

    def holder(self, pid: str) -> Claim | None:
        """The live claim on ``pid``, or None."""
        return self.holders([pid]).get(pid)

    def holders(self, pids: Sequence[str]) -> dict[str, Claim]:
        """Live claims of ``pids`` (one round trip), by prompt id."""
        if not pids:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for pid in pids:
            pipe.get(self.key(pid))
            pipe.pttl(self.key(pid))
        raw = pipe.execute()
        out: dict[str, Claim] = {}
        for i, pid in enumerate(pids):
            value, ttl = raw[2 * i], raw[2 * i + 1]
            if value is not None:
                out[pid] = self._claim(pid, value, int(ttl))
        return out
