"""One test suite, both object-store backends: a local directory and S3 (moto on loopback)."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from common.records import Prompt
from common.settings import Settings, StoreSettings
from common.store import NotFound, ObjectStore, SchemaMismatch, StoreError, open_store
from common.store.fs import FsStore


@pytest.fixture(params=["fs", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "fs":
        return FsStore(tmp_path / "store")
    make: Callable[..., ObjectStore] = request.getfixturevalue("make_s3_store")
    return make()


def test_bytes_round_trip_exists_delete(store: ObjectStore) -> None:
    assert not store.exists("a/b.bin")
    store.put_bytes("a/b.bin", b"\x00\x01hello")
    assert store.exists("a/b.bin")
    assert store.get_bytes("a/b.bin") == b"\x00\x01hello"
    store.put_bytes("a/b.bin", b"replaced")
    assert store.get_bytes("a/b.bin") == b"replaced"
    store.delete("a/b.bin")
    assert not store.exists("a/b.bin")
    store.delete("a/b.bin")  # absent: no error


def test_not_found(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"missing/key\.json"):
        store.get_bytes("missing/key.json")
    with pytest.raises(NotFound):
        store.get_json("missing/key.json")
    with pytest.raises(NotFound):
        store.get_file("missing/key.json", tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()
    assert store.latest("missing/history") is None


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "dir/"])
def test_invalid_keys_refused(store: ObjectStore, key: str) -> None:
    with pytest.raises(StoreError, match="invalid object key"):
        store.put_bytes(key, b"x")


def test_put_new_never_overwrites(store: ObjectStore) -> None:
    assert store.put_new("k/new.json", b'{"v": 1}') is True
    assert store.put_new("k/new.json", b'{"v": 2}') is False
    assert store.get_bytes("k/new.json") == b'{"v": 1}'


def test_put_new_race_has_one_winner(store: ObjectStore) -> None:
    """Writers racing on one key: exactly one creates it, and its bytes are what is stored."""
    n = 8
    barrier = threading.Barrier(n)
    won: list[bytes] = []
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            barrier.wait()
            data = f'{{"writer": {i}}}'.encode()
            if store.put_new("race/key.json", data):
                won.append(data)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(won) == 1
    assert store.get_bytes("race/key.json") == won[0]


def test_put_if_same(store: ObjectStore) -> None:
    assert store.put_if_same("r/result.json", {"a": 1, "b": [1, 2]}) is True
    # same content (key order does not matter: canonical JSON) -> nothing written
    assert store.put_if_same("r/result.json", {"b": [1, 2], "a": 1}) is False
    with pytest.raises(StoreError, match="different content"):
        store.put_if_same("r/result.json", {"a": 2})
    assert store.get_json("r/result.json") == {"a": 1, "b": [1, 2]}


def test_list_by_prefix_recursive_sorted(store: ObjectStore) -> None:
    keys = ["p/b/2.json", "p/a.json", "p/b/1.json", "p/bc/x.json", "q/z.json", "p/b/deep/3.json"]
    for k in keys:
        store.put_bytes(k, b"{}")
    store.put_bytes("p/.hidden/probe", b"{}")  # dot names are internal to both backends
    assert list(store.list_keys("p/")) == sorted(k for k in keys if k.startswith("p/"))
    assert list(store.list_keys("p/b/")) == ["p/b/1.json", "p/b/2.json", "p/b/deep/3.json"]
    # a prefix is a string prefix, not a directory: p/b matches p/bc too
    assert list(store.list_keys("p/b")) == [
        "p/b/1.json",
        "p/b/2.json",
        "p/b/deep/3.json",
        "p/bc/x.json",
    ]
    assert list(store.list_keys("nothing/")) == []
    assert list(store.list_keys("")) == sorted(keys)


def test_history_is_append_only_and_ordered(store: ObjectStore) -> None:
    written = [store.append("h/labels", {"n": i}) for i in range(4)]
    assert store.history("h/labels") == written  # oldest first
    assert store.latest("h/labels") == written[-1]
    assert [store.get_json(k)["n"] for k in store.history("h/labels/")] == [0, 1, 2, 3]
    assert len(set(written)) == 4


def test_records_and_schema_mismatch(store: ObjectStore) -> None:
    prompt = Prompt.new("User: hi\nAssistant: You should", source="test")
    store.put_json("rec/prompt.json", prompt)
    assert store.get_record("rec/prompt.json", Prompt) == prompt
    future = prompt.model_dump(mode="json") | {"schema_version": 99}
    store.put_json("rec/future.json", future)
    with pytest.raises(SchemaMismatch, match="schema_version 99"):
        store.get_record("rec/future.json", Prompt)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            h.update(chunk)
    return h.hexdigest()


def test_large_file_round_trip(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "big.safetensors"
    size = 50 * 2**20 + 12345  # above 50 MiB and not a multiple of the part size
    with src.open("wb") as f:
        for _ in range(size // 2**20):
            f.write(os.urandom(2**20))
        f.write(os.urandom(size % 2**20))
    store.put_file("big/graph.safetensors", src)
    out = store.get_file("big/graph.safetensors", tmp_path / "out" / "graph.safetensors")
    assert out.stat().st_size == size
    assert _sha256(out) == _sha256(src)
    assert [p.name for p in out.parent.iterdir()] == ["graph.safetensors"]  # no temp left


def test_reader_never_sees_a_partial_overwrite(store: ObjectStore) -> None:
    """While a writer replaces an object back and forth, every read is one whole version."""
    versions = [bytes([65 + i]) * (3 * 2**20) for i in range(2)]
    store.put_bytes("atomic/obj.bin", versions[0])
    stop = threading.Event()
    writes = 0
    errors: list[BaseException] = []

    def writer() -> None:
        nonlocal writes
        try:
            while not stop.is_set():
                store.put_bytes("atomic/obj.bin", versions[writes % 2])
                writes += 1
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)

    thread = threading.Thread(target=writer)
    thread.start()
    seen = [0, 0]
    deadline = time.monotonic() + 3.0
    try:
        while time.monotonic() < deadline and (min(seen) < 3 or writes < 6):
            data = store.get_bytes("atomic/obj.bin")
            assert data in versions, f"partial object: {len(data)} bytes"
            seen[versions.index(data)] += 1
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert writes >= 2 and sum(seen) >= 2, (writes, seen)


# -- S3 only ----------------------------------------------------------------------------------


def test_open_store_s3_from_settings(s3_settings: StoreSettings, tmp_path: Path) -> None:
    store = open_store(Settings(home=tmp_path, store=s3_settings))
    assert store.describe().endswith(f"/{s3_settings.bucket}")
    store.put_json("x.json", {"ok": True})
    # a second client on the same bucket sees the object (bucket exists already)
    assert open_store(Settings(home=tmp_path, store=s3_settings)).get_json("x.json") == {"ok": True}


def test_s3_server_ignoring_conditional_writes_is_refused(
    make_s3_store: Callable[..., ObjectStore],
) -> None:
    """A server that drops If-None-Match would let put_new overwrite: refuse it up front."""
    from common.store.s3 import S3Store

    class IgnoresConditions(S3Store):
        def _put_if_absent(self, key: str, data: bytes, content_type: str) -> bool:
            self.put_bytes(key, data, content_type)  # what such a server does
            return True

    store = make_s3_store()
    assert isinstance(store, S3Store)
    naive = IgnoresConditions(
        store.endpoint, store.bucket, access_key="emc-test", secret_key="emc-test-secret"
    )
    with pytest.raises(StoreError, match="ignores conditional writes"):
        naive.put_new("k.json", b"{}")
    # nothing written, and the (hidden) probe object is gone
    assert list(naive._client.list_objects(naive.bucket, recursive=True)) == []


def test_s3_unreachable_endpoint_says_what_to_check() -> None:
    from common.store.s3 import S3Store
    from tests.fixtures.servers import free_port

    with pytest.raises(StoreError, match="EMC_STORE__ENDPOINT"):
        S3Store(f"127.0.0.1:{free_port()}", "emc", access_key="a", secret_key="b")


def test_s3_bad_bucket_name(moto_server: str) -> None:
    from common.store.s3 import S3Store

    with pytest.raises(StoreError, match="EMC_STORE__BUCKET"):
        S3Store(moto_server, "X", access_key="a", secret_key="b")


def test_corrupt_records_name_the_key_and_the_retry(store: ObjectStore) -> None:
    from common.records import TopKLogits
    from common.store import CorruptArtifact
    from common.store import keys as K

    key = K.logits("exp", "0123456789ab", "fp", "base")
    store.put_bytes(key, b'{"schema_version": 1, "prompt_id": "01')  # cut off
    with pytest.raises(CorruptArtifact) as e:
        store.get_record(key, TopKLogits)
    assert key in str(e.value) and "emc retry --step logits 0123456789ab" in str(e.value)
    store.put_json(key, {"schema_version": 1, "prompt_id": "x"})  # JSON, not the record
    with pytest.raises(CorruptArtifact, match=r"not a valid TopKLogits: variant"):
        store.get_record(key, TopKLogits)
    assert isinstance(e.value, StoreError)


def test_size_without_reading(store: ObjectStore) -> None:
    store.put_bytes("s/a.bin", b"12345")
    assert store.size("s/a.bin") == 5
    with pytest.raises(NotFound):
        store.size("s/none.bin")


def test_private_objects_are_owner_only_on_disk(tmp_path: Path) -> None:
    store = FsStore(tmp_path / "store")
    store.put_json("users/alice.json", {"hash": "x"}, private=True)
    store.put_json("public.json", {"a": 1})
    assert (store.root / "users/alice.json").stat().st_mode & 0o777 == 0o600
    assert (store.root / "public.json").stat().st_mode & 0o077 != 0  # the umask's default


def test_keys_are_read_back() -> None:
    from common.store import keys as K

    ref = K.parse(K.graph_tensors("e", "p1", "fp", "adapted"))
    assert ref is not None and (ref.kind, ref.pid, ref.fingerprint, ref.variant, ref.step) == (
        "graph_tensors",
        "p1",
        "fp",
        "adapted",
        "graph",
    )
    judged = K.parse(K.verdicts("e", "p1", "fp", "openai-o3", "base"))
    assert judged is not None and (judged.kind, judged.judge, judged.step) == (
        "verdicts",
        "openai-o3",
        "judge",
    )
    assert K.parse(K.prompt("e", "p1")).kind == "prompt"  # type: ignore[union-attr]
    assert K.parse("users/alice.json") is None
    assert "backup" in K.retry_hint(K.prompt("e", "p1"))
