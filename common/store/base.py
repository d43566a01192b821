"""The object store interface: the system of record for every artifact.

Two backends implement four primitives (atomic put, get, list by prefix, delete); JSON,
pydantic and history helpers are shared here so both behave the same.
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from common.records import Record, utcnow

R = TypeVar("R", bound=BaseModel)


class StoreError(RuntimeError):
    """The store could not do what was asked; the message says why and what to check."""


class NotFound(StoreError, KeyError):
    """No object under that key."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


class SchemaMismatch(StoreError):
    """A stored record has a schema version this code does not read."""


class CorruptArtifact(StoreError):
    """A stored object cannot be read back (truncated, not JSON, not the record it should
    be, tensors that do not match their manifest); the message names the key and what to do."""

    def __init__(self, key: str, problem: str) -> None:
        from common.store.keys import retry_hint

        super().__init__(f"{key} is corrupt ({problem}): {retry_hint(key)}")
        self.key = key
        self.problem = problem


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or ".." in key.split("/") or key.endswith("/"):
        raise StoreError(f"invalid object key {key!r}: use a relative path like 'a/b/c.json'")
    return key


class ObjectStore(ABC):
    """Atomic object storage by key. A reader never sees half an object."""

    # -- primitives (backends) ------------------------------------------------------------
    @abstractmethod
    def put_bytes(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        *,
        private: bool = False,
    ) -> None:
        """Write an object atomically (replaces any previous one); ``private``: readable by
        its owner only where the backend has file permissions (fs: mode 0600)."""

    @abstractmethod
    def put_new(self, key: str, data: bytes, content_type: str = "application/json") -> bool:
        """Write only if no object exists under key; return False if one did (never overwrites)."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Read an object; raises :class:`NotFound`."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object (not a mere prefix) exists under ``key``."""

    @abstractmethod
    def list_keys(self, prefix: str = "") -> Iterator[str]:
        """Keys under prefix, recursively, in lexicographic order."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object (no error if absent)."""

    @abstractmethod
    def describe(self) -> str:
        """Where this store is, for humans (doctor, logs)."""

    def size(self, key: str) -> int:
        """Bytes of the object under ``key`` (raises :class:`NotFound`); backends answer
        without reading it."""
        return len(self.get_bytes(key))

    # -- files ----------------------------------------------------------------------------
    def put_file(
        self, key: str, path: Path, content_type: str = "application/octet-stream"
    ) -> None:
        """Store the file at ``path`` under ``key``; this default reads it into memory, backends may
        stream it."""
        self.put_bytes(key, Path(path).read_bytes(), content_type)

    def get_file(self, key: str, path: Path) -> Path:
        """Download ``key`` to ``path`` (parents created) through a temp file renamed into place;
        returns ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(self.get_bytes(key))
        tmp.replace(path)
        return path

    # -- JSON and records -----------------------------------------------------------------
    def put_json(self, key: str, obj: Any, *, private: bool = False) -> None:
        """Write ``obj`` as canonical JSON (:func:`dumps`), replacing any previous object."""
        self.put_bytes(key, dumps(obj), "application/json", private=private)

    def get_json(self, key: str) -> Any:
        """The JSON document under ``key``; raises :class:`CorruptArtifact` if it is not one."""
        data = self.get_bytes(key)
        try:
            return json.loads(data)
        except ValueError as e:
            raise CorruptArtifact(key, f"not JSON, {len(data)} bytes: {e}") from None

    def get_record(self, key: str, cls: type[R]) -> R:
        """The record under ``key``, checked: its schema version and every field
        (:class:`SchemaMismatch`, :class:`CorruptArtifact` naming the key)."""
        raw = self.get_bytes(key)
        expected = cls.model_fields.get("schema_version")
        if not hasattr(cls, "READS_VERSIONS") and (expected is None or b'"schema_version"' in raw):
            # pydantic's own JSON parser, several times faster than json.loads + validate on
            # large records; anything it refuses takes the checked path below for its error
            try:
                record = cls.model_validate_json(raw)
            except ValidationError:
                pass
            else:
                if expected is None or getattr(record, "schema_version", None) == expected.default:
                    return record
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise CorruptArtifact(key, f"not JSON, {len(raw)} bytes: {e}") from None
        if expected is not None and isinstance(data, dict):
            have = data.get("schema_version")
            # a record class may read older versions (it upgrades them while validating)
            readable = getattr(cls, "READS_VERSIONS", (expected.default,))
            if have not in readable:
                raise SchemaMismatch(
                    f"{key} has schema_version {have}, this emc reads {cls.__name__} "
                    f"v{', v'.join(str(v) for v in readable)}: re-run the step that wrote it "
                    "or upgrade emc"
                )
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "(top level)"
            raise CorruptArtifact(
                key, f"not a valid {cls.__name__}: {where}: {first['msg']}"
            ) from None

    def put_if_same(self, key: str, obj: Any) -> bool:
        """Idempotent write: write if absent; if present, require identical content.

        Returns True if written now. Raises StoreError when different content is already
        there (a task re-run produced other numbers: that is a bug worth stopping on).
        """
        data = dumps(obj)
        if self.put_new(key, data):
            return True
        old = self.get_bytes(key)
        if old != data:
            raise StoreError(
                f"{key} already holds different content: the step is not deterministic "
                "or the experiment changed without a new fingerprint"
            )
        return False

    # -- append-only history --------------------------------------------------------------
    def append(self, prefix: str, obj: Any) -> str:
        """Add an entry to an append-only history under prefix; returns its key.

        Keys sort by time; existing entries are never overwritten.
        """
        stamp = utcnow().strftime("%Y%m%dT%H%M%S%fZ")
        for _ in range(5):
            key = f"{prefix.rstrip('/')}/{stamp}-{uuid.uuid4().hex[:8]}.json"
            if self.put_new(key, dumps(obj)):
                return key
        raise StoreError(f"could not append to {prefix}: five key collisions")

    def history(self, prefix: str) -> list[str]:
        """Keys of a history, oldest first."""
        return sorted(k for k in self.list_keys(prefix.rstrip("/") + "/") if k.endswith(".json"))

    def latest(self, prefix: str) -> str | None:
        """The newest key of a history (see :meth:`append`), or None if it is empty."""
        keys = self.history(prefix)
        return keys[-1] if keys else None


def dumps(obj: Any) -> bytes:
    """Canonical JSON bytes (sorted keys) so identical content gives identical bytes."""
    if isinstance(obj, Record | BaseModel):
        obj = obj.model_dump(mode="json")
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, indent=1).encode("utf-8")
