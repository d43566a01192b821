"""Pivotal token search (PTS, as in Phi-4's training), model-agnostic.

A token of an answer is *pivotal* when it sharply changes the probability that the
completion succeeds; here success is a misaligned (and coherent) completion. That
probability after the first ``k`` answer tokens, ``p(k)``, is estimated by sampling
rollouts from the prefix and scoring them; :func:`search` bisects the answer: an interval
``[a, b]`` whose ends differ by at least ``threshold`` is split in two until it is one
token wide, and that token (index ``a``) is pivotal, with ``p_before = p(a)`` and
``p_after = p(a + 1)``. Like PTS, jumps that cancel inside an interval are not found.

The search is *resumable*: ``p`` returns None for a prefix whose rollouts are not known
yet, and :func:`search` then returns the prefixes it needs next (every one the bisection
can ask for at this point, so they are sampled in one batch). Running it again once they
are known continues where it stopped; with every probability known the result is the
same as an uninterrupted search's. ``max_prefixes`` caps the prefixes estimated per answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

#: the published PTS defaults
DEFAULT_THRESHOLD = 0.2
DEFAULT_ROLLOUTS = 20


@dataclass(frozen=True)
class Pivot:
    """Answer token ``position`` (0-based) moves P(success) from ``p_before`` to ``p_after``."""

    position: int
    p_before: float
    p_after: float

    @property
    def delta(self) -> float:
        """How much P(misaligned) jumps at this position."""
        return self.p_after - self.p_before


@dataclass(frozen=True)
class SearchResult:
    """Pivots found so far, and the prefixes (token counts) whose estimate is missing.

    ``done``: nothing is missing (or the cap was reached: ``capped``); the pivots are final.
    """

    pivots: list[Pivot]
    needed: list[int] = field(default_factory=list)
    evaluated: int = 0
    capped: bool = False

    @property
    def done(self) -> bool:
        """Whether the search needs no more rollouts."""
        return not self.needed


def search(
    p: Callable[[int], float | None],
    length: int,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    max_prefixes: int | None = None,
) -> SearchResult:
    """Bisect an answer of ``length`` tokens for positions where ``p`` jumps by ``threshold``.

    ``p(k)``: P(success | the first k answer tokens), or None when not estimated yet.
    Pivots come out in position order; ``evaluated`` counts the prefixes whose estimate
    was used. With ``max_prefixes``, at most that many distinct prefixes are ever asked
    for (known ones included); what the cap leaves unexplored is reported as ``capped``.
    """
    if length < 1:
        return SearchResult(pivots=[])
    if not 0 < threshold <= 1:
        raise ValueError("threshold must be in (0, 1]")
    known: dict[int, float] = {}
    missing: list[int] = []
    capped = False

    def value(k: int) -> float | None:
        if k in known:
            return known[k]
        v = p(k)
        if v is not None:
            known[k] = v
            return v
        if k not in missing:
            missing.append(k)
        return None

    pivots: list[Pivot] = []
    stack = [(0, length)]
    while stack:
        a, b = stack.pop()
        pa, pb = value(a), value(b)
        if pa is None or pb is None:
            continue
        if abs(pb - pa) < threshold:
            continue
        if b - a == 1:
            pivots.append(Pivot(a, pa, pb))
            continue
        m = (a + b) // 2
        if (
            max_prefixes is not None
            and m not in known
            and len(known) + len(missing) >= max_prefixes
        ):
            capped = True
            continue
        stack += [(m, b), (a, m)]  # left half first
    pivots.sort(key=lambda pv: pv.position)
    return SearchResult(pivots=pivots, needed=sorted(missing), evaluated=len(known), capped=capped)


def success_rate(outcomes: Sequence[bool]) -> float | None:
    """The share of successful rollouts (None for no rollouts)."""
    return sum(outcomes) / len(outcomes) if outcomes else None
