"""The labeling guide an experiment points to (``review.guidelines``, Markdown): rendered for
the prompt page's ``?`` panel, and versioned by content so every label records which
guide it was made under."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from markdown_it import MarkdownIt
from markupsafe import Markup

from services.review_ui.context import ReviewContext


@dataclass(frozen=True)
class Guide:
    """A labeling guide: its source, content hash (12 hex chars) and safe HTML."""

    path: str
    version: str
    html: str


def guide_version(text: str) -> str:
    """Content hash of a guide: changes whenever its text does."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def render_guide(text: str) -> str:
    """Markdown to HTML with raw HTML switched off (a guide cannot inject a script)."""
    html: str = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
    return html


def load_guide(c: ReviewContext) -> Guide | None:
    """The experiment's guide (re-read when the file changes), or None if none is set.

    A configured guide that cannot be read is reported in the panel, never silently dropped.
    """
    path = c.experiment.review.guidelines
    if not path:
        return None
    p = Path(path)
    try:
        mtime = p.stat().st_mtime_ns
        hit = c.guide_cache.get(path)
        if hit is not None and hit[0] == mtime:
            cached: Guide = hit[1]
            return cached
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        return Guide(path, "unreadable", str(Markup("<p class='error'>{}</p>").format(e)))
    guide = Guide(path, guide_version(text), render_guide(text))
    c.guide_cache[path] = (mtime, guide)
    return guide
