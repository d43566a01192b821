"""Near-duplicate rejection: character 3-gram Jaccard similarity against recent prompts."""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

_SPACE = re.compile(r"\s+")


def shingles(text: str, n: int = 3) -> frozenset[str]:
    """Character ``n``-grams of the lowercased text with whitespace runs folded to one space."""
    t = _SPACE.sub(" ", text.lower()).strip()
    if len(t) <= n:
        return frozenset({t}) if t else frozenset()
    return frozenset(t[i : i + n] for i in range(len(t) - n + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """Jaccard similarity ``|a & b| / |a | b|`` of two shingle sets; 1.0 when both are empty."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


@dataclass(frozen=True)
class NearDuplicate:
    """The remembered text a candidate is too similar to."""

    other: str
    similarity: float


class NearDuplicateFilter:
    """Remembers up to ``max_recent`` texts; rejects a text whose similarity to one of them
    is at or above ``threshold`` (character 3-gram Jaccard, 1.0 = same text up to case
    and spacing).
    """

    def __init__(self, threshold: float, max_recent: int = 5000, n: int = 3) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(
                f"near-duplicate threshold must be in (0, 1], got {threshold} "
                "(generator.near_duplicate_threshold)"
            )
        self.threshold = threshold
        self.n = n
        self._recent: deque[tuple[str, frozenset[str]]] = deque(maxlen=max_recent)

    def __len__(self) -> int:
        return len(self._recent)

    def add(self, text: str) -> None:
        """Remember ``text`` (the oldest remembered text is forgotten beyond ``max_recent``)."""
        self._recent.append((text, shingles(text, self.n)))

    def check(self, text: str) -> NearDuplicate | None:
        """The most similar remembered text at or above the threshold, else None."""
        grams = shingles(text, self.n)
        best: NearDuplicate | None = None
        for other, other_grams in self._recent:
            sim = jaccard(grams, other_grams)
            if sim >= self.threshold and (best is None or sim > best.similarity):
                best = NearDuplicate(other=other, similarity=sim)
        return best

    def admit(self, text: str) -> NearDuplicate | None:
        """Remember ``text`` unless it is a near-duplicate (then return what it duplicates)."""
        dup = self.check(text)
        if dup is None:
            self.add(text)
        return dup
