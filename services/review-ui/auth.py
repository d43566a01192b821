"""Login, logout and the gate that keeps everything but the login page and /healthz private."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Response,
    current_app,
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

from services.review_ui.context import ReviewContext, ctx
from services.review_ui.login_limits import LoginLimits
from services.review_ui.sessions import close_session, open_session, session_valid
from services.review_ui.users import Reviewer, authenticate, get_user

bp = Blueprint("auth", __name__)

# Reachable without a session. The stylesheet is the login page's own look.
PUBLIC_ENDPOINTS = {"auth.login", "health.healthz"}
PUBLIC_STATIC = {"app.css"}
USER_CACHE_S = 10.0
SESSION_CACHE_S = 2.0


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
    """Whether the request is an API call (``/api/...`` or a JSON body), answered with JSON instead
    of a redirect."""
    return request.path.startswith("/api/") or request.is_json


def _session_alive(c: ReviewContext, sid: str, user: Reviewer) -> bool:
    """Whether the server still holds this session (cached for a moment per process)."""
    now = time.monotonic()
    hit = c.session_cache.get(sid)
    if hit is not None and now - hit[0] < SESSION_CACHE_S:
        return hit[1]
    alive = session_valid(c.store, sid, user.name, user.session_token)
    c.session_cache[sid] = (now, alive)
    if len(c.session_cache) > 10000:
        c.session_cache.clear()
    return alive


def require_login() -> BaseResponse | None:
    """before_request hook: load ``g.user`` or turn the request away."""
    g.user = None
    name, token, sid = session.get("user"), session.get("token"), session.get("sid")
    if isinstance(name, str) and isinstance(token, str) and isinstance(sid, str):
        user = _session_user(name, token)
        if user is not None and _session_alive(ctx(), sid, user):
            g.user = user
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


def login_limits(c: ReviewContext) -> LoginLimits:
    """The failed-login limits of this app (one per process, counters in Redis)."""
    if c.login_limits is None:
        c.login_limits = LoginLimits(c.queue.redis)
    limits: LoginLimits = c.login_limits
    return limits


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    """``GET/POST /login``: the login form; a POST checks the password under per-user and
    per-address rate limits (429 while blocked, 401 when wrong) and opens a session."""
    if request.method == "POST":
        c = ctx()
        name = request.form.get("username", "")
        password = request.form.get("password", "")
        address = request.remote_addr or "-"
        limits = login_limits(c)
        wait = limits.wait_s(name, address)
        if wait:
            flash(f"Too many failed logins: try again in {wait} s.", "error")
            return render_template("login.html", username=name), 429
        user = authenticate(c.store, name, password)
        if user is None:
            limits.failed(name, address)
            flash("Wrong user name or password.", "error")
            return render_template("login.html", username=name), 401
        limits.succeeded(user.name)
        session.clear()
        session.permanent = True
        session["user"] = user.name
        session["token"] = user.session_token
        session["sid"] = open_session(
            c.store, user.name, user.session_token, current_app.permanent_session_lifetime
        )
        return redirect(_safe_next(request.args.get("next")))
    if g.user is not None:
        return redirect(_safe_next(request.args.get("next")))
    return render_template("login.html", username="")


@bp.route("/logout", methods=["POST"])
def logout() -> Response | BaseResponse:
    """End the session on the server too: a copy of the cookie no longer logs in."""
    sid = session.get("sid")
    if isinstance(sid, str):
        c = ctx()
        close_session(c.store, sid)
        c.session_cache.pop(sid, None)
    session.clear()
    flash("Logged out.", "info")
    return redirect(url_for("auth.login"))
