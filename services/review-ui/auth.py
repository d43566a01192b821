"""Login, logout and the gate that keeps everything but the login page and /healthz private."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Response,
    flash,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from werkzeug.wrappers import Response as BaseResponse

from services.review_ui.context import ctx
from services.review_ui.users import Reviewer, authenticate, get_user

bp = Blueprint("auth", __name__)

# Reachable without a session. The stylesheet is the login page's own look.
PUBLIC_ENDPOINTS = {"auth.login", "health.healthz"}
PUBLIC_STATIC = {"app.css"}
USER_CACHE_S = 10.0


def _session_user(name: str, token: str) -> Reviewer | None:
    """The session's user if the account still exists with the same password.

    Cached for a few seconds: polled endpoints would otherwise read the account each time.
    """
    c = ctx()
    now = time.monotonic()
    hit = c.user_cache.get((name, token))
    if hit is not None and now - hit[0] < USER_CACHE_S:
        return hit[1]
    user = get_user(c.store, name)
    if user is not None and user.session_token != token:
        user = None
    c.user_cache[(name, token)] = (now, user)
    return user


def wants_json() -> bool:
    return request.path.startswith("/api/") or request.is_json


def require_login() -> BaseResponse | None:
    """before_request hook: load ``g.user`` or turn the request away."""
    g.user = None
    name, token = session.get("user"), session.get("token")
    if isinstance(name, str) and isinstance(token, str):
        g.user = _session_user(name, token)
    if g.user is not None:
        return None
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    if request.endpoint == "static" and (request.view_args or {}).get("filename") in PUBLIC_STATIC:
        return None
    if wants_json():
        resp = jsonify(error="log in first", login=url_for("auth.login"))
        resp.status_code = 401
        return resp
    return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))


def _safe_next(target: str | None) -> str:
    """Only same-site relative paths: no open redirect through ?next=."""
    if not target:
        return url_for("queue.index")
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return url_for("queue.index")
    return target


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    if request.method == "POST":
        name = request.form.get("username", "")
        password = request.form.get("password", "")
        user = authenticate(ctx().store, name, password)
        if user is None:
            flash("Wrong user name or password.", "error")
            return render_template("login.html", username=name), 401
        session.clear()
        session.permanent = True
        session["user"] = user.name
        session["token"] = user.session_token
        return redirect(_safe_next(request.args.get("next")))
    if g.user is not None:
        return redirect(_safe_next(request.args.get("next")))
    return render_template("login.html", username="")


@bp.route("/logout", methods=["POST"])
def logout() -> Response | BaseResponse:
    session.clear()
    flash("Logged out.", "info")
    return redirect(url_for("auth.login"))
