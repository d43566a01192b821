"""Content digests of model files: complete sha256, computed once per file version.

Weight files are hashed whole (a change anywhere in a 5 GB file must change the experiment's
fingerprint). The digest of a file is cached by ``(device, inode, size, mtime, ctime)`` in a
small JSON file, so a second fingerprint of the same files costs a ``stat`` each. Files in a
Hugging Face hub cache are content-addressed already: a snapshot's file is a symlink to
``blobs/<sha256>`` (git-LFS files) or ``blobs/<git sha1>`` (small text files), and that name is
the digest (no read at all).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from pathlib import Path

_CHUNK = 4 * 2**20
_BLOB = re.compile(r"^(?:[0-9a-f]{64}|[0-9a-f]{40})$")
_LOCK = threading.Lock()
#: a file changed this recently may change again within the same mtime tick (file times are
#: only as fine as the kernel's clock tick): hash it but do not cache its digest
_RACY_S = 2.0


def _cache_path() -> Path:
    from common.settings import get_settings

    return get_settings().cache_dir / "digests.json"


def hub_blob_digest(path: Path) -> str | None:
    """The digest a hub-cache snapshot file already carries: the name of the blob its symlink
    points to (``blobs/<sha256|git-sha1>``); None for any other file."""
    if not path.is_symlink():
        return None
    target = Path(os.readlink(path))
    if target.parent.name != "blobs" and not str(target).startswith(("../../blobs/", "blobs/")):
        return None
    name = target.name
    return f"blob:{name}" if _BLOB.match(name) else None


def sha256_file(path: Path) -> str:
    """Complete sha256 of a file (no caching)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


class DigestCache:
    """sha256 of files keyed by ``(device, inode, size, mtime_ns)``, kept in a JSON file.

    A rewritten file (new size or mtime) or a replaced one (new inode) is hashed again. The
    cache is advisory: a missing or unreadable cache file only costs the hashing.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._entries: dict[str, str] | None = None

    def _load(self) -> dict[str, str]:
        if self._entries is None:
            self._entries = {}
            path = self.path or _cache_path()
            try:
                raw = json.loads(path.read_text())
                if isinstance(raw, dict) and raw.get("schema_version") == 1:
                    self._entries = {str(k): str(v) for k, v in raw["entries"].items()}
            except (OSError, ValueError, KeyError):
                pass
        return self._entries

    def _save(self) -> None:
        path = self.path or _cache_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"schema_version": 1, "entries": self._load()}))
            os.replace(tmp, path)
        except OSError:
            pass  # read-only home: digests are recomputed next time

    def digest(self, path: Path) -> str:
        """The file's content digest: its hub blob name, or its (cached) complete sha256."""
        blob = hub_blob_digest(path)
        if blob is not None:
            return blob
        st = path.stat()
        key = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
        with _LOCK:
            hit = self._load().get(key)
            if hit is not None:
                return hit
        value = sha256_file(path)
        if time.time() - max(st.st_mtime, st.st_ctime) < _RACY_S:
            return value
        with _LOCK:
            self._load()[key] = value
            self._save()
        return value


_DEFAULT = DigestCache()


def file_digest(path: Path) -> str:
    """Content digest of one file through the process's digest cache."""
    return _DEFAULT.digest(path)
