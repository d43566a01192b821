"""``python -m services.review_ui``: serve the review UI on settings.ui_host:ui_port."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from gunicorn.app.base import BaseApplication

from common.settings import get_settings


class _Server(BaseApplication):  # type: ignore[misc]
    """gunicorn run in-process: threaded workers, the app built once per worker."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from services.review_ui.wsgi import app

        return app


def main(argv: list[str] | None = None) -> None:
    """Serve the review UI with gunicorn in this process (one worker, ``--threads`` threads, the app
    preloaded); host and port default to the settings."""
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m services.review_ui", description=__doc__)
    parser.add_argument("--host", default=settings.ui_host)
    parser.add_argument("--port", type=int, default=settings.ui_port)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=settings.log_level)
    _Server(
        {
            "bind": f"{args.host}:{args.port}",
            "workers": 1,
            "worker_class": "gthread",
            "threads": args.threads,
            "timeout": 60,
            # build the app before forking: a first start may build the toy organism,
            # which takes longer than a worker may stay silent
            "preload_app": True,
            # the queue page polls every few seconds: log requests only when debugging
            "accesslog": "-" if settings.log_level.upper() == "DEBUG" else None,
            "loglevel": settings.log_level.lower(),
        }
    ).run()


if __name__ == "__main__":
    main()
