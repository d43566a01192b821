"""Login sessions kept on the server (object store, ``keys.ui_session``): the cookie names
a session, logout deletes it, so a copied cookie stops working at logout (not 7 days later).
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta

from pydantic import Field

from common.records import Record, utcnow
from common.store import NotFound, ObjectStore, StoreError
from common.store import keys as K

#: a session id: 32 URL-safe characters
SID_BYTES = 24


class UiSession(Record):
    """One login of one reviewer."""

    user: str
    token: str = Field(description="the account's session token at login (password version)")
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime


def open_session(store: ObjectStore, user: str, token: str, lifetime: timedelta) -> str:
    """Record a new session (readable by its owner only); returns its id for the cookie."""
    sid = secrets.token_urlsafe(SID_BYTES)
    record = UiSession(user=user, token=token, expires_at=utcnow() + lifetime)
    store.put_json(K.ui_session(sid), record, private=True)
    return sid


def session_valid(store: ObjectStore, sid: str, user: str, token: str) -> bool:
    """Whether ``sid`` is a live session of ``user`` opened with this password version."""
    if not session_valid_id(sid):
        return False
    try:
        s = store.get_record(K.ui_session(sid), UiSession)
    except NotFound:
        return False
    except StoreError:  # unreadable: treated as logged out (the reviewer logs in again)
        return False
    return s.user == user and s.token == token and s.expires_at > utcnow()


def close_session(store: ObjectStore, sid: str | None) -> None:
    """End a session (logout); no error if it is gone already."""
    if sid and session_valid_id(sid):
        store.delete(K.ui_session(sid))


def session_valid_id(sid: str) -> bool:
    """Whether ``sid`` looks like an id :func:`open_session` makes (so it is a safe key)."""
    return 0 < len(sid) <= 64 and sid.replace("-", "").replace("_", "").isalnum()
