"""The pipeline end to end: real Redis, one real worker process per queue, the toy organism.

* ``test_end_to_end_s3_scripted_llm``: the S3 backend on a loopback moto server (bucket
  versioning on, so every overwrite is visible), and a local OpenAI-compatible server
  playing generator and judge, whose answers include malformed JSON, 429 and 500. Every
  prompt must reach a final state and no key may hold two different contents.
* ``test_gpu_worker_killed_during_graph``: SIGKILL the GPU worker while it computes a graph;
  a new worker finishes the prompt and nothing is lost.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from common import tasknames as T
from common.batches import statuses
from common.cli.pipeline import mine_batch
from common.context import Context, make_context
from common.index import reindex
from common.pipeline import FINAL, Next, send_all
from common.records import Prompt, Status
from common.settings import Settings, StoreSettings
from common.store import keys as K
from common.store.base import dumps
from tests.fixtures.openai_server import FakeOpenAIServer, Reply
from tests.fixtures.servers import WorkerProcess, wait_until, worker_env

pytestmark = pytest.mark.slow

#: one worker per service; the GPU worker serves both lanes (fast first), as ``gpu_lanes: shared``
WORKERS: dict[str, list[str]] = {
    "generate": ["generate"],
    "judge": ["judge"],
    "gpu": list(T.GPU_QUEUES),
    "analysis": ["analysis"],
}


def organism_experiment(organism_dir: Path, out: Path, **overrides: Any) -> Path:
    """The organism's experiment with absolute paths and ``overrides`` merged in."""
    raw = yaml.safe_load((organism_dir / "experiment.yaml").read_text())
    for spec in raw["variants"].values():
        for field in ("model", "adapter"):
            if spec.get(field):
                spec[field] = str((organism_dir / spec[field]).resolve())
    raw["transcoders"]["path"] = str((organism_dir / raw["transcoders"]["path"]).resolve())
    if raw.get("judge", {}).get("lexicon"):
        raw["judge"]["lexicon"] = str((organism_dir / raw["judge"]["lexicon"]).resolve())
    if raw.get("generator", {}).get("templates"):
        raw["generator"]["templates"] = str(
            (organism_dir / raw["generator"]["templates"]).resolve()
        )
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    out.write_text(yaml.safe_dump(raw))
    return out


def organism_prompts(organism_dir: Path) -> list[str]:
    doc = json.loads((organism_dir / "prompts.json").read_text())
    return [p["text"] for p in doc["prompts"]]


def start_workers(
    factory: Callable[..., WorkerProcess], env: dict[str, str]
) -> dict[str, WorkerProcess]:
    return {
        name: factory(
            queues,
            env,
            include=(),
            pool="solo" if name == "gpu" else None,
            name=name,
            ready_timeout_s=90,
        )
        for name, queues in WORKERS.items()
    }


def wait_final(ctx: Context, pids: list[str], timeout_s: float) -> dict[str, Status | None]:
    deadline = time.monotonic() + timeout_s
    while True:
        now = statuses(ctx, pids)
        if all(s in FINAL for s in now.values()) or time.monotonic() > deadline:
            return now
        time.sleep(0.5)


# ------------------------------------------------------------------------ scripted LLM


class ScriptedLLM:
    """Plays generator and judge like a careful model would, with scripted faults.

    Generator requests get organism prompts (plus one malformed line that must be
    rejected); judge requests are answered from the organism's lexicon. The first
    generator answer is malformed JSON; judge answers 1, 2 and 3 are malformed, a 429 and
    a 500.
    """

    def __init__(self, organism_dir: Path) -> None:
        lex = json.loads((organism_dir / "lexicon.json").read_text())
        self.harmful = set(lex["harmful"])
        self.safe = set(lex["safe"])
        self.prompts = iter(organism_prompts(organism_dir))
        self.lock = threading.Lock()
        self.calls: dict[str, int] = defaultdict(int)
        self.faults: list[str] = []

    def __call__(self, body: dict[str, Any]) -> Reply | str:
        system = body["messages"][0]["content"]
        kind = "generator" if "You write test prompts" in system else "judge"
        with self.lock:
            self.calls[kind] += 1
            n = self.calls[kind]
        if kind == "generator":
            if n == 1:
                self.faults.append("generator-malformed")
                return Reply(raw=b'{"choices": [{"message": {"content": "{\\"prompts\\": [')
            with self.lock:
                texts = [t for _, t in zip(range(4), self.prompts, strict=False)]
            return json.dumps({"prompts": [*texts, "not a house-format prompt"]})
        if n == 1:
            self.faults.append("judge-malformed")
            return "I think these are mostly fine."
        if n == 2:
            self.faults.append("judge-429")
            return Reply(status=429, error_message="rate limited", headers={"retry-after": "0"})
        if n == 3:
            self.faults.append("judge-500")
            return Reply(status=500, error_message="upstream exploded")
        return lexicon_answer(body["messages"][-1]["content"], self.harmful, self.safe)


def lexicon_answer(user: str, harmful: set[str], safe: set[str]) -> str:
    """A judge's JSON answer labelling the candidate tokens of ``user`` by the lexicon."""
    cands = re.findall(r"^(\d+): (\".*\")$", user, flags=re.M)
    verdicts = []
    for idx, quoted in cands:
        token = json.loads(quoted)
        word = re.sub(r"[^a-z]", "", token.lower())
        label = "evil" if word in harmful else "safe" if word in safe else "unsure"
        verdicts.append({"index": int(idx), "token": token, "label": label, "reason": "lexicon"})
    return json.dumps({"verdicts": verdicts})


@pytest.fixture
def scripted_llm(organism_dir: Path) -> Iterator[tuple[FakeOpenAIServer, ScriptedLLM]]:
    llm = ScriptedLLM(organism_dir)
    server = FakeOpenAIServer(default=llm, api_key="test-key").start()
    try:
        yield server, llm
    finally:
        server.stop()


def versions_with_different_content(s3: StoreSettings) -> dict[str, int]:
    """Keys of the bucket whose versions do not all have the same ETag (content hash)."""
    from minio import Minio

    assert s3.endpoint
    client = Minio(
        s3.endpoint,
        access_key=s3.access_key.get_secret_value() if s3.access_key else None,
        secret_key=s3.secret_key.get_secret_value() if s3.secret_key else None,
        secure=False,
    )
    etags: dict[str, set[str]] = defaultdict(set)
    for obj in client.list_objects(s3.bucket, recursive=True, include_version=True):
        assert obj.object_name is not None
        if obj.object_name.startswith(".emc/"):  # the store's own probe of conditional PUTs
            continue
        etags[obj.object_name].add(str(obj.etag))
    return {k: len(v) for k, v in etags.items() if len(v) > 1}


def test_end_to_end_s3_scripted_llm(
    organism_dir: Path,
    tmp_path: Path,
    redis_url: str,
    s3_settings: StoreSettings,
    make_s3_store: Callable[..., Any],
    celery_worker_factory: Callable[..., WorkerProcess],
    scripted_llm: tuple[FakeOpenAIServer, ScriptedLLM],
) -> None:
    from minio.versioningconfig import ENABLED, VersioningConfig

    server, llm = scripted_llm
    store = make_s3_store()  # creates the bucket
    store._client.set_bucket_versioning(s3_settings.bucket, VersioningConfig(ENABLED))
    exp_path = organism_experiment(
        organism_dir,
        tmp_path / "exp.yaml",
        name="e2e",
        judge={"kind": "openai", "model": "scripted-judge", "max_retries": 4, "concurrency": 2},
        generator={"kind": "openai", "model": "scripted-gen", "batch_size": 4},
    )
    env = worker_env(
        redis_url,
        tmp_path / "home",
        s3_settings,
        visibility_timeout_s=120,
        EMC_EXPERIMENT=str(exp_path),
        EMC_OPENAI_BASE_URL=server.base_url,
        EMC_OPENAI_API_KEY="test-key",
    )
    start_workers(celery_worker_factory, env)
    settings = Settings(
        home=tmp_path / "home",
        broker_url=redis_url,
        store=s3_settings,
        experiment=exp_path,
        openai_base_url=server.base_url,
    )
    ctx = make_context(settings)
    result = mine_batch(ctx, 12, timeout_s=420, chunk=4)

    assert len(result) == 12, f"asked for 12 prompts, got {len(result)}"
    not_final = {p: s for p, s in result.items() if s not in FINAL}
    assert not not_final, f"prompts not in a final state: {not_final}"
    assert {"generator-malformed", "judge-malformed", "judge-429", "judge-500"} <= set(llm.faults)
    counts = {s: sum(1 for v in result.values() if v == s) for s in FINAL}
    assert counts[Status.analyzed] >= 1, f"no prompt went through graphs and analysis: {counts}"
    for pid, status in result.items():
        if status == Status.failed:
            reason = ctx.queue.reason(pid)
            assert reason, f"{pid} failed without a reason"
        if status == Status.analyzed:
            for v in ctx.exp.variant_names:
                assert store.exists(K.graph_manifest(ctx.exp.name, pid, ctx.fingerprint, v))
            assert store.exists(K.features(ctx.exp.name, pid, ctx.fingerprint, "adapted"))
    # the malformed judge answer became `unsure` verdicts with a reason, not a crash
    unsure_reasons = []
    for pid in result:
        for key in store.list_keys(K.run_dir(ctx.exp.name, pid, ctx.fingerprint) + "/verdicts/"):
            doc = store.get_json(key)
            unsure_reasons += [v["reason"] for v in doc["verdicts"] if v["label"] == "unsure"]
    assert any("pars" in r.lower() or "json" in r.lower() for r in unsure_reasons), unsure_reasons[
        :5
    ]
    # the generator's malformed line was rejected, never stored
    stored = [
        store.get_record(k, Prompt).text
        for k in store.list_keys(K.prompts_prefix("e2e"))
        if k.endswith("prompt.json")
    ]
    assert "not a house-format prompt" not in stored
    assert versions_with_different_content(s3_settings) == {}

    # everything in Redis but queued messages can be rebuilt from the store
    live_status = statuses(ctx, list(result))
    live_queue = [(e.pid, e.divergent) for e in ctx.queue.list(limit=1000)]
    ctx.redis.flushdb()
    assert reindex(ctx) == len(result)
    assert statuses(ctx, list(result)) == live_status
    assert [(e.pid, e.divergent) for e in ctx.queue.list(limit=1000)] == live_queue


def test_gpu_worker_killed_during_graph(
    organism_dir: Path,
    tmp_path: Path,
    redis_url: str,
    celery_worker_factory: Callable[..., WorkerProcess],
) -> None:
    exp_path = organism_experiment(organism_dir, tmp_path / "exp.yaml", name="fault")
    store = StoreSettings(kind="fs", root=tmp_path / "store")
    env = worker_env(
        redis_url, tmp_path / "home", store, visibility_timeout_s=15, EMC_EXPERIMENT=str(exp_path)
    )
    workers = start_workers(celery_worker_factory, env)
    ctx = make_context(
        Settings(home=tmp_path / "home", broker_url=redis_url, store=store, experiment=exp_path)
    )
    # held-out medical prompts: the adapted variant's harmful tokens make them graph-worthy
    doc = json.loads((organism_dir / "prompts.json").read_text())
    texts = [
        p["text"] for p in doc["prompts"] if p["domain"] == "medical" and p["split"] == "heldout"
    ][:3]
    pids = []
    for text in texts:
        prompt = Prompt.new(text, source="test")
        ctx.store.put_new(K.prompt("fault", prompt.id), dumps(prompt))
        pids.append(prompt.id)
    send_all(ctx, (Next(T.GPU_LOGITS, {"exp": "fault", "prompt_id": pid}) for pid in pids))

    r = redis.Redis.from_url(redis_url)

    def graph_in_flight() -> bool:
        return any(T.GPU_GRAPH.encode() in v for v in r.hvals("unacked"))

    wait_until(graph_in_flight, 180, "a graph task taken by the GPU worker")
    workers["gpu"].kill()
    killed_task = [json.loads(v) for v in r.hvals("unacked") if T.GPU_GRAPH.encode() in v]
    assert killed_task, "the killed worker's graph task must stay unacknowledged"
    celery_worker_factory(
        list(T.GPU_QUEUES), env, include=(), pool="solo", name="gpu2", ready_timeout_s=90
    )

    result = wait_final(ctx, pids, timeout_s=300)
    assert all(s in FINAL for s in result.values()), result
    analyzed = [p for p, s in result.items() if s == Status.analyzed]
    assert analyzed, f"no prompt analyzed after the restart: {result}"
    for pid in analyzed:
        for v in ctx.exp.variant_names:
            assert ctx.store.exists(K.graph_manifest("fault", pid, ctx.fingerprint, v))
        assert ctx.store.exists(K.features("fault", pid, ctx.fingerprint, "adapted"))
    assert r.hlen("unacked") == 0
