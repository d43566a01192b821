"""The Flask application factory of the review UI."""

from __future__ import annotations

import logging
import os
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis as redis_lib
from flask import Flask, g, jsonify, render_template, request
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.exceptions import HTTPException

from common.context import experiment_path
from common.experiment import Experiment, load_experiment
from common.review_queue import ReviewQueue
from common.settings import Settings, get_settings
from common.store import CorruptArtifact, ObjectStore, open_store
from common.system.broker import broker_url
from common.tokens import is_byte_fragment
from services.review_ui.context import EXTENSION, ReviewContext
from services.review_ui.tasks import LazyCelery, TaskSender

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SECRET_FILE = "secret_key"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'"
)
#: the graphs blueprint (analysis page, graph viewer): no inline style either, no plugins
STRICT_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'self'"
)

csrf = CSRFProtect()


def load_secret_key(settings: Settings) -> str:
    """``settings.secret_key``, else a key generated once into ``<home>/secret_key`` (0600)."""
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value()
    path = settings.home / SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            log.warning("%s was readable by others: permissions set to 0600", path)
            path.chmod(0o600)
        key = path.read_text().strip()
        if len(key) < 32:
            raise RuntimeError(
                f"{path} holds no usable secret key: delete it to generate a new one "
                "(this logs every reviewer out) or set EMC_SECRET_KEY"
            ) from None
        return key
    key = secrets.token_hex(32)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def default_redis(settings: Settings) -> redis_lib.Redis:
    """Redis of the settings (EMC_BROKER_URL, else the embedded Redis of `emc up`)."""
    return redis_lib.Redis.from_url(
        broker_url(settings), socket_timeout=5, socket_connect_timeout=5
    )


def create_app(
    settings: Settings | None = None,
    *,
    store: ObjectStore | None = None,
    redis: redis_lib.Redis | None = None,
    testing: bool = False,
    experiment: Experiment | None = None,
    celery: TaskSender | None = None,
) -> Flask:
    """Build the review UI. Anything not passed comes from ``settings`` (default: the
    environment): the object store, Redis, the experiment, and the Celery app (lazily)."""
    settings = settings or get_settings()
    experiment = experiment or load_experiment(experiment_path(settings))
    app = Flask(
        "services.review_ui",
        template_folder=str(HERE / "templates"),
        static_folder=str(HERE / "static"),
    )
    app.config.update(
        TESTING=testing,
        SECRET_KEY=load_secret_key(settings),
        SESSION_COOKIE_NAME="emc_review",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        PERMANENT_SESSION_LIFETIME=timedelta(days=7),
        WTF_CSRF_TIME_LIMIT=None,  # valid for the session: reviewers keep pages open for hours
        WTF_CSRF_SSL_STRICT=False,
        JSON_SORT_KEYS=False,
    )
    context = ReviewContext(
        settings=settings,
        store=store or open_store(settings),
        queue=ReviewQueue(redis or default_redis(settings), experiment.name),
        experiment=experiment,
        fingerprint=experiment.fingerprint,
        tasks=celery or LazyCelery(settings),
    )
    app.extensions[EXTENSION] = context
    csrf.init_app(app)

    from services.review_ui import (
        adjudication_views,
        agreement_views,
        auth,
        feature_views,
        graph_views,
        prompt_views,
        queue_views,
    )

    app.before_request(auth.require_login)
    _install_reconcile(app, context)
    for bp in (
        auth.bp,
        queue_views.bp,
        queue_views.health,
        prompt_views.bp,
        agreement_views.bp,
        agreement_views.calibration,
        adjudication_views.bp,
        graph_views.bp,
        feature_views.bp,
    ):
        app.register_blueprint(bp)
    _install_helpers(app, context)
    return app


def _install_reconcile(app: Flask, context: ReviewContext) -> None:
    """Labels saved while Redis was down reach the queue once it answers (reconcile.py)."""
    from services.review_ui.reconcile import maybe_reconcile

    @app.before_request
    def _reconcile() -> None:
        maybe_reconcile(context)


def _install_helpers(app: Flask, context: ReviewContext) -> None:
    @app.context_processor
    def _globals() -> dict[str, Any]:
        return {
            "exp_name": context.exp,
            "fingerprint": context.fingerprint,
            "judge_id": context.judge_id,
            "user": g.get("user"),
        }

    @app.template_filter("tok")
    def _tok(token: str) -> str:
        """Make whitespace in a token visible (a byte fragment is shown as its bytes)."""
        if is_byte_fragment(token):
            return token
        return token.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥") or "∅"

    app.jinja_env.globals["zip"] = zip

    @app.template_filter("is_fragment")
    def _is_fragment(token: str) -> bool:
        """A byte-fragment token (shown as its bytes; the id tells equal-looking ones apart)."""
        return is_byte_fragment(token)

    @app.after_request
    def _headers(resp: Any) -> Any:
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Referrer-Policy", "same-origin")
        strict = request.blueprint == "graphs"
        resp.headers.setdefault("Content-Security-Policy", STRICT_CSP if strict else CSP)
        resp.headers.setdefault("X-Frame-Options", "DENY")
        return resp

    def _error(code: int, message: str) -> Any:
        if request.path.startswith("/api/") or request.is_json or request.path.endswith(".json"):
            return jsonify(error=message), code
        return render_template("error.html", code=code, message=message), code

    @app.errorhandler(CSRFError)
    def _csrf(e: CSRFError) -> Any:
        return _error(400, f"{e.description} Reload the page and try again.")

    @app.errorhandler(redis_lib.RedisError)
    def _redis_down(e: redis_lib.RedisError) -> Any:
        log.error("redis: %s", e)
        return _error(
            503,
            f"The review queue (Redis) is not reachable: {e}. Start the system with `emc up` "
            "or check EMC_BROKER_URL; saved labels are safe in the object store.",
        )

    @app.errorhandler(CorruptArtifact)
    def _corrupt(e: CorruptArtifact) -> Any:
        log.error("%s", e)
        return _error(500, f"A stored artifact cannot be read: {e}")

    @app.errorhandler(HTTPException)
    def _http(e: HTTPException) -> Any:
        if e.code is not None and e.code < 400:  # routing redirects (e.g. a missing slash)
            return e
        return _error(e.code or 500, e.description or e.name)
