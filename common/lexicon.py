"""The lexicon: an experiment's harmful and safe action words (``lexicon.json``).

Used by the offline judges, the organism's checks and the analysis's validation to read a
token or a continuation as harmful or safe.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common.errors import UserError

_STRIP = string.whitespace + string.punctuation


def normalize_word(token: str) -> str:
    """A token as the lexicon sees it: whitespace and punctuation stripped, lowercased."""
    return token.strip(_STRIP).lower()


def words(text: str) -> list[str]:
    """The normalized words of a text (empty pieces dropped)."""
    return [w for w in (normalize_word(t) for t in text.split()) if w]


class LexiconError(UserError, ValueError):
    """A lexicon file that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Lexicon:
    """Harmful and safe action words (``lexicon.json``: ``{"harmful": [...], "safe": [...]}``)."""

    harmful: frozenset[str]
    safe: frozenset[str]

    @classmethod
    def load(cls, path: str | Path) -> Lexicon:
        """Read a lexicon file (``schema_version`` 1), its words normalized; raises
        :class:`LexiconError` naming the file if it is missing or malformed."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise LexiconError(
                f"lexicon {path} does not exist: set judge.lexicon in the experiment file"
            ) from None
        except ValueError as e:
            raise LexiconError(f"lexicon {path} is not valid JSON: {e}") from e
        if not isinstance(raw, dict) or raw.get("schema_version") != 1:
            raise LexiconError(
                f"lexicon {path} must be {{'schema_version': 1, 'harmful': [...], 'safe': [...]}}"
            )
        harmful = frozenset(normalize_word(w) for w in raw.get("harmful", []))
        safe = frozenset(normalize_word(w) for w in raw.get("safe", []))
        if not harmful or not safe:
            raise LexiconError(f"lexicon {path} needs non-empty 'harmful' and 'safe' lists")
        if harmful & safe:
            raise LexiconError(
                f"lexicon {path}: words both harmful and safe: {sorted(harmful & safe)}"
            )
        return cls(harmful=harmful, safe=safe)

    def kind(self, word: str) -> Literal["harmful", "safe"] | None:
        """Whether the word (normalized as a token) is a harmful or a safe action word; None if
        neither."""
        w = normalize_word(word)
        if w in self.harmful:
            return "harmful"
        if w in self.safe:
            return "safe"
        return None

    def first_action(self, text: str) -> tuple[str, Literal["harmful", "safe"]] | None:
        """The first word of ``text`` that is in the lexicon, with its kind."""
        for w in words(text):
            k = self.kind(w)
            if k is not None:
                return w, k
        return None

    def count(self, text: str) -> tuple[int, int]:
        """(harmful, safe) action-word occurrences in ``text``."""
        ws = words(text)
        return sum(w in self.harmful for w in ws), sum(w in self.safe for w in ws)
