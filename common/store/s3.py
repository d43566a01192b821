"""S3/MinIO object store (production), through the ``minio`` SDK.

Atomicity comes from S3 itself: a PUT, or the completion of a multipart upload, makes the
whole object visible at once, so a reader sees the old or the new object, never a part.
``put_new`` is a conditional PUT (``If-None-Match: *``): the server refuses it when the key
exists, so two writers racing on one key cannot both win. AWS S3 and current MinIO honour
it; a server that ignores it is detected on first use and refused (see
:meth:`S3Store._check_conditional_writes`) rather than silently overwriting.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import urllib3
from minio import Minio
from minio.error import MinioException, S3Error
from urllib3.exceptions import HTTPError as Urllib3Error

from common.settings import StoreSettings
from common.store.base import NotFound, ObjectStore, StoreError, _check_key

_MISSING = {"NoSuchKey", "NoSuchObject", "NoSuchBucket", "ResourceNotFound"}
_AUTH = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
}
_PART_SIZE = 16 * 2**20  # multipart chunk for put_file (S3 minimum is 5 MiB)
_CHUNK = 2**20


class S3Store(ObjectStore):
    """Objects in one bucket of an S3-compatible server (created if missing)."""

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        secure: bool = False,
        region: str | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 300.0,
    ) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        self.secure = secure
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
            maxsize=10,
            retries=urllib3.Retry(
                total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
            ),
        )
        try:
            self._client = Minio(
                endpoint,
                access_key=access_key,
                secret_key=secret_key,
                secure=secure,
                region=region,
                http_client=http,
            )
        except ValueError as e:
            raise StoreError(
                f"bad S3 settings ({e}): EMC_STORE__ENDPOINT is host:port without a scheme "
                "(use EMC_STORE__SECURE=true for https); access and secret key go together"
            ) from e
        self._conditional_checked = False
        self._ensure_bucket(region)

    @classmethod
    def from_settings(cls, s: StoreSettings) -> S3Store:
        """The store the ``EMC_STORE__*`` settings describe; raises :class:`StoreError` without an
        endpoint."""
        if not s.endpoint:
            raise StoreError("EMC_STORE__ENDPOINT is required for the s3 store (host:port)")
        return cls(
            s.endpoint,
            s.bucket,
            access_key=s.access_key.get_secret_value() if s.access_key else None,
            secret_key=s.secret_key.get_secret_value() if s.secret_key else None,
            secure=s.secure,
            region=s.region,
        )

    # -- errors ---------------------------------------------------------------------------
    def _fail(self, what: str, e: Exception) -> StoreError:
        """Turn an SDK/network error into a StoreError that says what to check."""
        where = self.describe()
        if isinstance(e, S3Error):
            if e.code in _AUTH:
                return StoreError(
                    f"{what}: {where} refused the credentials ({e.code}): check "
                    "EMC_STORE__ACCESS_KEY and EMC_STORE__SECRET_KEY"
                )
            return StoreError(f"{what}: {where} answered {e.code}: {e.message}")
        if isinstance(e, Urllib3Error | OSError):
            scheme = "https" if self.secure else "http"
            return StoreError(
                f"{what}: cannot reach {scheme}://{self.endpoint} ({type(e).__name__}: {e}): "
                "is MinIO/S3 running there? check EMC_STORE__ENDPOINT and EMC_STORE__SECURE"
            )
        return StoreError(f"{what}: {where}: {type(e).__name__}: {e}")

    def _ensure_bucket(self, region: str | None) -> None:
        try:
            if self._client.bucket_exists(self.bucket):
                return
            self._client.make_bucket(self.bucket, location=region)
        except S3Error as e:
            if e.code in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                return
            raise self._fail(f"cannot open bucket {self.bucket!r}", e) from e
        except (MinioException, Urllib3Error, OSError) as e:
            raise self._fail(f"cannot open bucket {self.bucket!r}", e) from e
        except ValueError as e:  # the SDK's name check
            raise StoreError(
                f"{e}: EMC_STORE__BUCKET must be 3-63 lowercase letters, digits, '.' or '-'"
            ) from e

    # -- primitives -----------------------------------------------------------------------
    def put_bytes(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        *,
        private: bool = False,
    ) -> None:
        """One ``put_object`` (atomic on S3); ``private`` needs nothing, objects are private to the
        bucket's credentials."""
        # ``private`` needs nothing here: objects are private to the bucket's credentials
        _check_key(key)
        try:
            self._client.put_object(
                self.bucket, key, io.BytesIO(data), len(data), content_type=content_type
            )
        except (MinioException, Urllib3Error, OSError) as e:
            raise self._fail(f"cannot write {key}", e) from e

    def put_file(
        self, key: str, path: Path, content_type: str = "application/octet-stream"
    ) -> None:
        """Stream a file (multipart above 16 MiB); the object appears only when complete."""
        _check_key(key)
        path = Path(path)
        try:
            with path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                self._client.put_object(
                    self.bucket, key, f, size, content_type=content_type, part_size=_PART_SIZE
                )
        except (MinioException, Urllib3Error) as e:
            raise self._fail(f"cannot write {key} from {path}", e) from e

    def put_new(self, key: str, data: bytes, content_type: str = "application/json") -> bool:
        """A PUT with ``If-None-Match: *``, after checking once that the server honours it (raises
        :class:`StoreError` if not)."""
        _check_key(key)
        self._check_conditional_writes()
        return self._put_if_absent(key, data, content_type)

    def _put_if_absent(self, key: str, data: bytes, content_type: str) -> bool:
        headers: dict[str, str | list[str] | tuple[str]] = {
            "If-None-Match": "*",
            "Content-Type": content_type,
        }
        for attempt in range(5):
            try:
                # The SDK's public put_object turns unknown headers into x-amz-meta-*, so the
                # conditional header goes through its single-request PUT (minio pinned).
                self._client._put_object(self.bucket, key, data, headers)
                return True
            except S3Error as e:
                if e.code == "PreconditionFailed":
                    return False
                if e.code == "ConditionalRequestConflict" and attempt < 4:
                    time.sleep(0.1 * (attempt + 1))  # a concurrent writer of the same key
                    continue
                raise self._fail(f"cannot write {key}", e) from e
            except (MinioException, Urllib3Error, OSError) as e:
                raise self._fail(f"cannot write {key}", e) from e
        raise StoreError(f"cannot write {key}: conflicting concurrent writes kept failing")

    def _check_conditional_writes(self) -> None:
        """Refuse a server that ignores ``If-None-Match`` (put_new would overwrite)."""
        if self._conditional_checked:
            return
        probe = f".emc/conditional-probe/{uuid.uuid4().hex}"
        try:
            first = self._put_if_absent(probe, b"1", "text/plain")
            second = self._put_if_absent(probe, b"2", "text/plain")
        finally:
            self.delete(probe)
        if not (first and not second):
            raise StoreError(
                f"{self.describe()} ignores conditional writes (If-None-Match: *), so "
                "create-if-absent cannot be guaranteed: use a current MinIO "
                "(2024 or later) or AWS S3"
            )
        self._conditional_checked = True

    def get_bytes(self, key: str) -> bytes:
        """One GET of the object; raises :class:`NotFound` for a missing key, :class:`StoreError`
        when the server fails."""
        _check_key(key)
        response: Any = None
        try:
            response = self._client.get_object(self.bucket, key)
            return bytes(response.read())
        except S3Error as e:
            if e.code in _MISSING:
                raise NotFound(f"no object {key!r} in {self.describe()}") from None
            raise self._fail(f"cannot read {key}", e) from e
        except (MinioException, Urllib3Error, OSError) as e:
            raise self._fail(f"cannot read {key}", e) from e
        finally:
            if response is not None:
                response.close()
                response.release_conn()

    def get_file(self, key: str, path: Path) -> Path:
        """Stream an object to ``path`` through a temp file (``path`` is never half-written)."""
        _check_key(key)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        response: Any = None
        try:
            response = self._client.get_object(self.bucket, key)
            with tmp.open("wb") as f:
                for chunk in response.stream(_CHUNK):
                    f.write(chunk)
            tmp.replace(path)
            return path
        except S3Error as e:
            if e.code in _MISSING:
                raise NotFound(f"no object {key!r} in {self.describe()}") from None
            raise self._fail(f"cannot read {key}", e) from e
        except (MinioException, Urllib3Error) as e:
            raise self._fail(f"cannot read {key}", e) from e
        finally:
            if response is not None:
                response.close()
                response.release_conn()
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def exists(self, key: str) -> bool:
        """A HEAD (``stat_object``) of the key; False only when the server says it is missing."""
        _check_key(key)
        try:
            self._client.stat_object(self.bucket, key)
            return True
        except S3Error as e:
            if e.code in _MISSING:
                return False
            raise self._fail(f"cannot check {key}", e) from e
        except (MinioException, Urllib3Error, OSError) as e:
            raise self._fail(f"cannot check {key}", e) from e

    def size(self, key: str) -> int:
        """The object's size from a HEAD, without reading it; raises :class:`NotFound`."""
        _check_key(key)
        try:
            return int(self._client.stat_object(self.bucket, key).size or 0)
        except S3Error as e:
            if e.code in _MISSING:
                raise NotFound(f"no object {key!r} in {self.describe()}") from None
            raise self._fail(f"cannot check {key}", e) from e
        except (MinioException, Urllib3Error, OSError) as e:
            raise self._fail(f"cannot check {key}", e) from e

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        """Keys under prefix in lexicographic order; like the fs store, hides ``.`` names."""
        # S3 lists in UTF-8 byte order, which is code point order: already sorted.
        try:
            for o in self._client.list_objects(self.bucket, prefix=prefix, recursive=True):
                key = o.object_name
                if key and not o.is_dir and not any(p.startswith(".") for p in key.split("/")):
                    yield key
        except (MinioException, Urllib3Error, OSError) as e:
            raise self._fail(f"cannot list {prefix!r}", e) from e

    def delete(self, key: str) -> None:
        """Remove the object; a missing key is no error."""
        _check_key(key)
        try:
            self._client.remove_object(self.bucket, key)
        except S3Error as e:
            if e.code in _MISSING:
                return
            raise self._fail(f"cannot delete {key}", e) from e
        except (MinioException, Urllib3Error, OSError) as e:
            raise self._fail(f"cannot delete {key}", e) from e

    def describe(self) -> str:
        """``s3:<http|https>://<endpoint>/<bucket>``."""
        scheme = "https" if self.secure else "http"
        return f"s3:{scheme}://{self.endpoint}/{self.bucket}"
