"""WSGI entry point: ``gunicorn services.review_ui.wsgi:app`` (settings from ``EMC_*``)."""

from __future__ import annotations

from services.review_ui.app import create_app

app = create_app()
