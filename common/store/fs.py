"""Local-directory object store (the embedded default)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from common.store.base import NotFound, ObjectStore, _check_key


class FsStore(ObjectStore):
    """Objects are files under ``root``; writes go to a temp file then ``os.replace``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def _tmp(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")

    def put_bytes(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        *,
        private: bool = False,
    ) -> None:
        """Write to a temp file beside the target, fsync, then ``os.replace`` it into place; a
        private file is created with mode 0600."""
        path = self._path(key)
        tmp = self._tmp(path)
        try:
            # a private file is 0600 from its creation: never readable by others, not even briefly
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def put_file(
        self, key: str, path: Path, content_type: str = "application/octet-stream"
    ) -> None:
        """Copy the file in 4 MiB chunks to a temp file, fsync, then ``os.replace`` it into
        place."""
        dest = self._path(key)
        tmp = self._tmp(dest)
        try:
            with Path(path).open("rb") as src, tmp.open("wb") as f:
                while chunk := src.read(2**22):
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def put_new(self, key: str, data: bytes, content_type: str = "application/json") -> bool:
        """Hard-link a fully written temp file to the key's path: atomic create-if-absent, never a
        partial object."""
        path = self._path(key)
        tmp = self._tmp(path)
        try:
            tmp.write_bytes(data)
            try:
                os.link(tmp, path)  # atomic create-if-absent with full content
            except FileExistsError:
                return False
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def get_bytes(self, key: str) -> bytes:
        """The file's bytes; raises :class:`NotFound` for a missing key or one that is a
        directory."""
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no object {key!r} in {self.describe()}") from None
        except IsADirectoryError:
            raise NotFound(f"{key!r} is a prefix, not an object") from None

    def exists(self, key: str) -> bool:
        """Whether a regular file exists at the key's path."""
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        """The file's size from ``stat``; raises :class:`NotFound`."""
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"no object {key!r} in {self.describe()}") from None

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        """Walks only the directory the prefix points into, skipping dot files and dot directories
        (temp files)."""
        base = self.root
        # walk only the directory the prefix points into
        head, _, _ = prefix.rpartition("/")
        start = base / head if head else base
        if not start.is_dir():
            return
        keys = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith("."):
                    continue
                key = Path(dirpath, name).relative_to(base).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        yield from sorted(keys)

    def delete(self, key: str) -> None:
        """Unlink the file (directories left behind stay)."""
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def describe(self) -> str:
        """``fs:<root>``."""
        return f"fs:{self.root}"
