"""The review UI: a Flask app where researchers label the top-k tokens of queued prompts.

``create_app`` builds it; ``services.review_ui.wsgi:app`` is the gunicorn entry point and
``python -m services.review_ui`` serves it on ``settings.ui_host:ui_port``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.review_ui.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    # keep `import services.review_ui` light (the CLI imports this package for `emc users`)
    if name == "create_app":
        from services.review_ui.app import create_app

        return create_app
    raise AttributeError(name)
