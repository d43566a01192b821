"""Object store: one interface (:class:`ObjectStore`), a local-directory and an S3/MinIO backend."""

from __future__ import annotations

from common.settings import Settings, get_settings
from common.store.base import CorruptArtifact, NotFound, ObjectStore, SchemaMismatch, StoreError
from common.store.fs import FsStore

__all__ = [
    "CorruptArtifact",
    "FsStore",
    "NotFound",
    "ObjectStore",
    "SchemaMismatch",
    "StoreError",
    "open_store",
]


def open_store(settings: Settings | None = None) -> ObjectStore:
    """The store the settings name (``EMC_STORE__KIND``: fs or s3)."""
    settings = settings or get_settings()
    if settings.store.kind == "s3":
        from common.store.s3 import S3Store

        return S3Store.from_settings(settings.store)
    return FsStore(settings.store_root)
