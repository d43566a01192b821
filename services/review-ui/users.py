"""Reviewer accounts: versioned records in the object store under ``users/{name}.json``.

Passwords are stored only as werkzeug password hashes (scrypt by default).
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime

from pydantic import Field
from werkzeug.security import check_password_hash, generate_password_hash

from common.records import Record, utcnow
from common.store import NotFound, ObjectStore

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")
MIN_PASSWORD = 8
USERS_PREFIX = "users/"

# Checked against when the user does not exist, so a wrong name costs the same time as a
# wrong password (no user enumeration by timing).
_DUMMY_HASH = generate_password_hash("emc-no-such-user")


class UserError(ValueError):
    """A user name or password that cannot be used; the message says why."""


class Reviewer(Record):
    """A reviewer account."""

    name: str
    password_hash: str
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)

    @property
    def session_token(self) -> str:
        """Changes when the password changes, which ends the sessions opened before."""
        return hashlib.sha256(self.password_hash.encode()).hexdigest()[:16]


def user_key(name: str) -> str:
    """Store key of a reviewer account: ``users/<name>.json``; raises :class:`UserError` for an
    invalid name."""
    return f"{USERS_PREFIX}{check_name(name)}.json"


def check_name(name: str) -> str:
    """``name`` if it is a valid user name (1-32 lowercase letters, digits, ``.``, ``_``, ``-``);
    raises :class:`UserError` otherwise."""
    if not NAME_RE.match(name):
        raise UserError(
            f"invalid user name {name!r}: use 1-32 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_password(password: str) -> str:
    """``password`` if it has at least ``MIN_PASSWORD`` (8) characters; raises :class:`UserError`
    otherwise."""
    if len(password) < MIN_PASSWORD:
        raise UserError(f"password too short: use at least {MIN_PASSWORD} characters")
    return password


def get_user(store: ObjectStore, name: str) -> Reviewer | None:
    """The account named ``name``, or None (also for names that cannot exist)."""
    if not NAME_RE.match(name):
        return None
    try:
        return store.get_record(user_key(name), Reviewer)
    except NotFound:
        return None


def add_user(store: ObjectStore, name: str, password: str, *, replace: bool = False) -> Reviewer:
    """Create an account (or, with ``replace``, set a new password for an existing one)."""
    check_name(name)
    check_password(password)
    old = get_user(store, name)
    if old is not None and not replace:
        raise UserError(f"user {name!r} exists: pass --update to set a new password")
    user = Reviewer(
        name=name,
        password_hash=generate_password_hash(password),
        created_at=old.created_at if old else utcnow(),
    )
    store.put_json(user_key(name), user, private=True)  # a password hash: owner-only (0600)
    return user


def authenticate(store: ObjectStore, name: str, password: str) -> Reviewer | None:
    """The account if ``password`` is right, else None."""
    user = get_user(store, name.strip().lower())
    if user is None:
        check_password_hash(_DUMMY_HASH, password)
        return None
    return user if check_password_hash(user.password_hash, password) else None


def list_users(store: ObjectStore) -> list[Reviewer]:
    """Every reviewer account in the store."""
    return [
        store.get_record(k, Reviewer)
        for k in store.list_keys(USERS_PREFIX)
        if k.endswith(".json") and "/" not in k[len(USERS_PREFIX) :]
    ]


def remove_user(store: ObjectStore, name: str) -> bool:
    """Delete an account (its labels stay, with its name). Returns False if it did not exist."""
    if get_user(store, name) is None:
        return False
    store.delete(user_key(name))
    return True
