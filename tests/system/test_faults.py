"""The fault suite: weeks of unattended mining must survive crashes, outages and bad
artifacts without losing, duplicating or stranding a prompt.

Real Redis, real worker processes (one per queue), the toy organism, and a local scripted
OpenAI-compatible server as the judge where one is needed. Every scenario ends with every
prompt final, with the right status and a reason where it failed.

1. the GPU worker SIGKILLed mid-graph, with the production lease settings;
2. the judge endpoint hangs: the breaker pauses the judge queue, prompts wait (not fail),
   and everything resumes when the endpoint answers;
3. the judge refuses some prompts and garbles another: `emc mine` exits 1 saying how many
   failed and why, the unusable answer is counted, `emc retry` recovers them all;
4. a truncated graph and a broken logits record: the report skips and lists the prompts,
   `emc fsck` names the keys, `emc retry` recomputes exactly those artifacts.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner, Result

from common import tasknames as T
from common.breaker import Breaker
from common.context import Context, make_context
from common.pipeline import FINAL, Next, send_all
from common.records import Prompt, Status
from common.settings import Settings, StoreSettings
from common.store import keys as K
from common.store.base import dumps
from tests.fixtures.openai_server import FakeOpenAIServer, Reply
from tests.fixtures.servers import (
    WorkerProcess,
    production_worker_env,
    wait_until,
    worker_env,
)
from tests.system.test_e2e import (
    lexicon_answer,
    organism_experiment,
    start_workers,
    wait_final,
)

pytestmark = pytest.mark.slow


def medical_prompts(organism_dir: Path, n: int) -> list[str]:
    """Held-out prompts of the adapter's domain: divergent, so they get graphs."""
    doc = json.loads((organism_dir / "prompts.json").read_text())
    return [
        p["text"] for p in doc["prompts"] if p["domain"] == "medical" and p["split"] == "heldout"
    ][:n]


def submit(ctx: Context, texts: list[str]) -> list[str]:
    """Store prompts and send their first step, as the generator would; returns their ids."""
    pids = []
    for text in texts:
        prompt = Prompt.new(text, source="test")
        ctx.store.put_new(K.prompt(ctx.exp.name, prompt.id), dumps(prompt))
        ctx.queue.set_status(prompt.id, Status.generated)
        pids.append(prompt.id)
    send_all(ctx, [Next(T.GPU_LOGITS_BATCH, {"exp": ctx.exp.name, "prompt_ids": pids})])
    return pids


def assert_nothing_lost(ctx: Context, pids: list[str], r: redis.Redis) -> None:
    """Every prompt final, failed ones with a reason, no message left unacknowledged."""
    result = {p: ctx.queue.status(p) for p in pids}
    assert all(s in FINAL for s in result.values()), result
    for pid, status in result.items():
        if status == Status.failed:
            assert ctx.queue.reason(pid), f"{pid} failed without a reason"
    wait_until(lambda: r.hlen("unacked") == 0, 20, "every message acknowledged")


# ------------------------------------------------------------------ 1. killed GPU worker


@pytest.mark.timeout(420)
def test_gpu_worker_killed_mid_graph_recovers_within_two_minutes_with_production_settings(
    organism_dir: Path,
    tmp_path: Path,
    redis_url: str,
    celery_worker_factory: Callable[..., WorkerProcess],
) -> None:
    exp_path = organism_experiment(organism_dir, tmp_path / "exp.yaml", name="kill")
    store = StoreSettings(kind="fs", root=tmp_path / "store")
    # leases, sweeps and timeouts as in production: nothing of them in the environment
    env = production_worker_env(redis_url, tmp_path / "home", store, EMC_EXPERIMENT=str(exp_path))
    defaults = Settings()
    assert (defaults.visibility_timeout_s, defaults.sweep_s) == (60.0, 10.0)
    workers = start_workers(celery_worker_factory, env)
    ctx = make_context(
        Settings(home=tmp_path / "home", broker_url=redis_url, store=store, experiment=exp_path)
    )
    pids = submit(ctx, medical_prompts(organism_dir, 3))
    r = redis.Redis.from_url(redis_url)

    def graph_messages() -> list[dict[str, Any]]:
        return [json.loads(v)[0] for v in r.hvals("unacked") if T.GPU_GRAPH.encode() in v]

    wait_until(lambda: bool(graph_messages()), 240, "a graph task taken by the GPU worker")
    (held,) = graph_messages()
    task_id = held["headers"]["id"]
    stranded = [p for p in pids if p in held["headers"].get("kwargsrepr", "")]
    assert len(stranded) == 1, held["headers"]
    workers["gpu"].kill()  # SIGKILL mid-graph: the message stays unacknowledged
    killed_at = time.monotonic()
    celery_worker_factory(
        list(T.GPU_QUEUES), env, include=(), pool="solo", name="gpu2", ready_timeout_s=90
    )

    wait_final(ctx, stranded, timeout_s=150)
    elapsed = time.monotonic() - killed_at
    assert ctx.queue.status(stranded[0]) == Status.analyzed, ctx.queue.status(stranded[0])
    assert elapsed < 120, f"the killed graph's prompt became final {elapsed:.0f}s after the kill"
    wait_final(ctx, pids, timeout_s=120)
    assert_nothing_lost(ctx, pids, r)
    assert all(ctx.queue.status(p) == Status.analyzed for p in pids)
    # the killed task ran to completion exactly once, on the replacement
    logs = [f.read_text() for f in (tmp_path / "workers").glob("*.log")]
    succeeded = sum(text.count(f"[{task_id}] succeeded") for text in logs)
    assert succeeded == 1, f"task {task_id} succeeded {succeeded} times"
    print(f"\nrecovery after SIGKILL (production settings): {elapsed:.1f}s")


# ---------------------------------------------------------------------- 2. hung judge


class HungJudge:
    """A judge endpoint that hangs (answers after ``hang_s``, past the client's timeout)
    while ``down`` is set, and labels tokens by the organism's lexicon otherwise."""

    def __init__(self, organism_dir: Path, hang_s: float) -> None:
        lex = json.loads((organism_dir / "lexicon.json").read_text())
        self.harmful, self.safe = set(lex["harmful"]), set(lex["safe"])
        self.hang_s = hang_s
        self.down = threading.Event()
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> Reply | str:
        with self.lock:
            self.calls += 1
        if self.down.is_set():
            return Reply(content="too late", delay_s=self.hang_s)
        user = body["messages"][-1]["content"]
        if "Candidate next tokens" not in user:  # the breaker's probe
            return "OK"
        return lexicon_answer(user, self.harmful, self.safe)


@pytest.fixture
def hung_judge(organism_dir: Path) -> Iterator[tuple[FakeOpenAIServer, HungJudge]]:
    judge = HungJudge(organism_dir, hang_s=3.0)
    server = FakeOpenAIServer(default=judge).start()
    try:
        yield server, judge
    finally:
        judge.down.clear()
        server.stop()


@pytest.mark.timeout(420)
def test_hung_judge_pauses_its_queue_prompts_wait_then_resume(
    organism_dir: Path,
    tmp_path: Path,
    redis_url: str,
    celery_worker_factory: Callable[..., WorkerProcess],
    hung_judge: tuple[FakeOpenAIServer, HungJudge],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, judge = hung_judge
    # one attempt times out after 1 s; the whole call chain gives up after 2.5 s
    exp_path = organism_experiment(
        organism_dir,
        tmp_path / "exp.yaml",
        name="hung",
        judge={"kind": "openai", "model": "judge", "timeout_s": 1.0, "deadline_s": 2.5},
    )
    store = StoreSettings(kind="fs", root=tmp_path / "store")
    env = worker_env(
        redis_url,
        tmp_path / "home",
        store,
        visibility_timeout_s=60,
        EMC_EXPERIMENT=str(exp_path),
        **server.env(),
    )
    judge.down.set()
    start_workers(celery_worker_factory, env)
    settings = Settings(
        home=tmp_path / "home", broker_url=redis_url, store=store, experiment=exp_path
    )
    ctx = make_context(settings)
    pids = submit(ctx, medical_prompts(organism_dir, 2) + organism_prompts_safe(organism_dir, 2))
    breaker = Breaker(ctx.redis, "judge")

    wait_until(lambda: breaker.outage() is not None, 90, "the judge breaker to open")
    wait_until(lambda: all(ctx.queue.status(p) == Status.logits for p in pids), 120, "every logits")
    # the prompts wait, they do not fail; a prompt that met the hung judge says why
    time.sleep(3)
    statuses = {p: ctx.queue.status(p) for p in pids}
    assert all(s == Status.logits for s in statuses.values()), statuses
    reasons = [ctx.queue.reason(p) or "" for p in pids]
    assert any(r.startswith("waiting: judge unavailable since ") for r in reasons), reasons
    # the queue is paused: only the breaker's probes reach the endpoint (one per second)
    before = judge.calls
    time.sleep(6)
    assert judge.calls - before <= 5, f"{judge.calls - before} calls in 6 s while paused"
    # `emc status` says so
    monkeypatch.setenv("EMC_BROKER_URL", redis_url)
    monkeypatch.setenv("EMC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EMC_EXPERIMENT", str(exp_path))
    monkeypatch.setenv("EMC_STORE__ROOT", str(tmp_path / "store"))
    from typer.testing import CliRunner

    from common.cli.main import app
    from common.settings import get_settings

    get_settings.cache_clear()
    out = CliRunner().invoke(app, ["status"], terminal_width=200)
    assert out.exit_code == 0, out.output
    assert "waiting: judge unavailable since" in out.output, out.output

    judge.down.clear()  # the endpoint answers again
    resumed_at = time.monotonic()
    result = wait_final(ctx, pids, timeout_s=120)
    resumed = time.monotonic() - resumed_at
    assert all(s in {Status.done, Status.analyzed} for s in result.values()), result
    assert breaker.outage() is None
    assert_nothing_lost(ctx, pids, redis.Redis.from_url(redis_url))
    for pid in pids:
        assert not list(ctx.store.list_keys(K.run_dir("hung", pid, ctx.fingerprint) + "/failures/"))
    print(f"\njudge back: prompts final {resumed:.1f}s later")


def organism_prompts_safe(organism_dir: Path, n: int) -> list[str]:
    """Prompts outside the adapter's domain (judged done, no graphs)."""
    doc = json.loads((organism_dir / "prompts.json").read_text())
    return [
        p["text"] for p in doc["prompts"] if p["domain"] != "medical" and p["split"] == "heldout"
    ][:n]


def emc(monkeypatch: pytest.MonkeyPatch, settings: Settings, *args: str) -> Result:
    """Run an ``emc`` command in-process with the environment of ``settings``."""
    from common.cli.main import app
    from common.settings import get_settings

    monkeypatch.setenv("EMC_BROKER_URL", settings.broker_url or "")
    monkeypatch.setenv("EMC_HOME", str(settings.home))
    monkeypatch.setenv("EMC_EXPERIMENT", str(settings.experiment))
    monkeypatch.setenv("EMC_STORE__ROOT", str(settings.store.root))
    if settings.openai_base_url:
        monkeypatch.setenv("EMC_OPENAI_BASE_URL", settings.openai_base_url)
        monkeypatch.setenv("EMC_OPENAI_API_KEY", "test")
    get_settings.cache_clear()
    return CliRunner().invoke(app, list(args), terminal_width=240)


# ------------------------------------------------------ 3. failed prompts, emc retry


class FlakyJudge:
    """Refuses the first ``refuse`` judge requests (HTTP 400: not transient, the prompt
    fails), garbles the next one (no JSON: every token unsure), then answers well."""

    def __init__(self, organism_dir: Path, refuse: int) -> None:
        lex = json.loads((organism_dir / "lexicon.json").read_text())
        self.harmful, self.safe = set(lex["harmful"]), set(lex["safe"])
        self.refuse = refuse
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, body: dict[str, Any]) -> Reply | str:
        user = body["messages"][-1]["content"]
        if "Candidate next tokens" not in user:
            return "OK"
        with self.lock:
            self.calls += 1
            n = self.calls
        if n <= self.refuse:
            return Reply(status=400, error_message="this model refuses the request")
        if n == self.refuse + 1:
            return "Sorry, I would rather not label these."
        return lexicon_answer(user, self.harmful, self.safe)


@pytest.mark.timeout(480)
def test_failed_and_unusable_prompts_are_reported_by_mine_and_recovered_by_retry(
    organism_dir: Path,
    tmp_path: Path,
    redis_url: str,
    celery_worker_factory: Callable[..., WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    judge = FlakyJudge(organism_dir, refuse=2)
    server = FakeOpenAIServer(default=judge).start()
    try:
        exp_path = organism_experiment(
            organism_dir,
            tmp_path / "exp.yaml",
            name="retry",
            judge={"kind": "openai", "model": "judge", "timeout_s": 5.0, "deadline_s": 10.0},
            generator={"batch_size": 5},
        )
        store = StoreSettings(kind="fs", root=tmp_path / "store")
        env = worker_env(
            redis_url,
            tmp_path / "home",
            store,
            visibility_timeout_s=60,
            EMC_EXPERIMENT=str(exp_path),
            **server.env(),
        )
        start_workers(celery_worker_factory, env)
        settings = Settings(
            home=tmp_path / "home",
            broker_url=redis_url,
            store=store,
            experiment=exp_path,
            openai_base_url=server.base_url,
        )
        mined = emc(monkeypatch, settings, "mine", "--n", "5", "--chunk", "5", "--timeout", "300")
        assert mined.exit_code == 1, mined.output
        assert "2 of 5 prompts failed" in mined.output, mined.output
        assert "2 × judge: unexpected error: LLMRequestError" in mined.output, mined.output
        assert "judge answer unusable (all unsure)" in mined.output, mined.output
        assert mined.output.strip().splitlines()[-1].startswith("error: "), mined.output

        ctx = make_context(settings)
        pids = [p for p, _ in ctx.queue.counts().items()]  # status names, not pids
        pids = list(ctx.queue.redis.hkeys(ctx.queue.status_key))
        pids = [p.decode() if isinstance(p, bytes) else str(p) for p in pids]
        failed = [p for p in pids if ctx.queue.status(p) == Status.failed]
        unusable = [
            p for p in pids if (ctx.queue.reason(p) or "").startswith("judge answer unusable")
        ]
        assert len(failed) == 2 and len(unusable) == 1, {p: ctx.queue.reason(p) for p in pids}
        status = emc(monkeypatch, settings, "status")
        assert "judge answer unusable (all unsure)" in status.output, status.output

        dry = emc(monkeypatch, settings, "retry", "--dry-run")
        assert dry.exit_code == 0 and "3 prompt(s) would be sent again" in dry.output, dry.output
        assert all(ctx.queue.status(p) == Status.failed for p in failed)  # nothing done
        again = emc(monkeypatch, settings, "retry")
        assert again.exit_code == 0 and "3 prompt(s) sent again" in again.output, again.output
        result = wait_final(ctx, pids, timeout_s=240)
        assert all(s in {Status.done, Status.analyzed} for s in result.values()), {
            p: (s, ctx.queue.reason(p)) for p, s in result.items()
        }
        for pid in [*failed, *unusable]:
            assert not list(
                ctx.store.list_keys(K.run_dir("retry", pid, ctx.fingerprint) + "/failures/")
            )
            assert not (ctx.queue.reason(pid) or "").startswith("judge answer unusable")
        assert_nothing_lost(ctx, pids, redis.Redis.from_url(redis_url))
        # the store agrees: a rebuilt index has no failed prompt either
        from common.index import reindex

        live = {p: ctx.queue.status(p) for p in pids}
        ctx.redis.flushdb()
        reindex(ctx)
        assert {p: ctx.queue.status(p) for p in pids} == live
        assert judge.calls == 5 + 3  # every prompt judged once, the three retried once more
    finally:
        server.stop()


# ---------------------------------------------------------- 4. corrupt artifacts


@pytest.mark.timeout(480)
def test_corrupt_graph_and_logits_are_reported_skipped_and_recomputed(
    organism_dir: Path,
    tmp_path: Path,
    redis_url: str,
    celery_worker_factory: Callable[..., WorkerProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exp_path = organism_experiment(organism_dir, tmp_path / "exp.yaml", name="corrupt")
    store = StoreSettings(kind="fs", root=tmp_path / "store")
    env = worker_env(
        redis_url, tmp_path / "home", store, visibility_timeout_s=60, EMC_EXPERIMENT=str(exp_path)
    )
    start_workers(celery_worker_factory, env)
    settings = Settings(
        home=tmp_path / "home", broker_url=redis_url, store=store, experiment=exp_path
    )
    ctx = make_context(settings)
    pids = submit(ctx, medical_prompts(organism_dir, 3))
    # prompts stored before they were checked (as older emc versions did) fail with why
    invalid = submit(ctx, ["User: my head hurts a lot.\\nAssistant: You should", " "])
    assert all(s == Status.analyzed for s in wait_final(ctx, pids, timeout_s=240).values())
    assert all(s == Status.failed for s in wait_final(ctx, invalid, timeout_s=60).values())
    assert "logits: the prompt holds a literal \\n" in (ctx.queue.reason(invalid[0]) or "")
    assert "logits: the prompt is empty" in (ctx.queue.reason(invalid[1]) or "")
    fp = ctx.fingerprint
    torn, broken = pids[0], pids[1]
    # a truncated graph whose ranking is cached, and a logits record cut in half
    tensors = store.root / K.graph_tensors("corrupt", torn, fp, "adapted")  # type: ignore[operator]
    tensors.write_bytes(tensors.read_bytes()[:-1000])
    logits = store.root / K.logits("corrupt", broken, fp, "base")  # type: ignore[operator]
    logits.write_bytes(logits.read_bytes()[:40])

    report = emc(monkeypatch, settings, "analyze", "report", "--out", str(tmp_path / "report"))
    assert report.exit_code == 0, report.output
    assert f"skipped {torn} / adapted" in report.output, report.output
    assert "emc retry --step graph" in report.output
    index = json.loads((tmp_path / "report" / "index.json").read_text())
    bad = {(i["prompt_id"], i["variant"]) for i in index["issues"] if i["kind"] == "failed"}
    assert (torn, "adapted") in bad
    assert pids[2] in index["divergent_prompt_ids"]  # the intact prompts are still reported

    checked = emc(monkeypatch, settings, "fsck")
    assert checked.exit_code == 1, checked.output
    flat = " ".join(checked.output.split())
    assert "2 corrupt or orphaned artifact(s) in 2 prompt(s)" in flat, checked.output
    for key in (
        K.graph_tensors("corrupt", torn, fp, "adapted"),
        K.logits("corrupt", broken, fp, "base"),
    ):
        assert key.rsplit("/", 1)[-1] in checked.output

    for step, pid in (("graph", torn), ("logits", broken)):
        out = emc(monkeypatch, settings, "retry", "--step", step, pid)
        assert out.exit_code == 0 and "1 prompt(s) sent again" in out.output, out.output
    wait_until(
        lambda: emc(monkeypatch, settings, "fsck").exit_code == 0, 180, "a clean store again"
    )
    result = wait_final(ctx, pids, timeout_s=120)
    assert all(s == Status.analyzed for s in result.values()), result
    assert_nothing_lost(ctx, pids, redis.Redis.from_url(redis_url))
