"""Recovery times with emc's production defaults, on the toy organism: real Redis, one real
worker process per queue (as ``emc up`` runs them), nothing of the lease, sweep, retry or
breaker settings in the environment.

Prints, each against a baseline measured in the same run:

1. *Killed GPU worker*: a prompt's time to its final state when the GPU worker is
   SIGKILLed while it computes the prompt's graph and a replacement starts at once, vs the
   same kind of prompt without a fault. Goal: final within 120 s of the kill.
2. *Hung judge*: the judge's endpoint (a local OpenAI-compatible server) stops answering
   (every request hangs past the client's timeout) while prompts arrive, then answers again.
   Printed: how long until the breaker paused the judge queue, how many requests reached
   the endpoint while it was down, how many prompts failed (goal: none), and how long after
   the endpoint answered again every prompt was final; vs a prompt's time with a healthy
   judge. The previous design's cost is given by its formula (6 client attempts x 6 task
   attempts x ``judge.timeout_s`` per prompt, one prompt at a time).

    python bench/recovery.py [--outage-s 300] [--prompts 4]
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--outage-s", type=float, default=300.0, help="how long the judge hangs")
    ap.add_argument("--prompts", type=int, default=4, help="prompts sent during the outage")
    ap.add_argument("--home", type=Path, default=None)
    args = ap.parse_args()

    import os

    import redis as redis_lib
    import yaml

    from bench.system import free_port, wait_workers
    from common import tasknames as T
    from common.breaker import Breaker
    from common.context import make_context
    from common.organism import ensure_organism
    from common.pipeline import FINAL, Next, send_all
    from common.records import Prompt, Status
    from common.settings import Settings, StoreSettings, get_settings
    from common.store import keys as K
    from common.store.base import dumps
    from common.system.broker import start_redis_server
    from common.system.supervisor import kill_group, spawn, stop_groups, worker_argv
    from common.tasknames import QUEUES
    from tests.fixtures.openai_server import FakeOpenAIServer

    org = ensure_organism(get_settings().home / "organism")
    home = args.home or Path(tempfile.mkdtemp(prefix="emc-recovery-"))
    server_redis = start_redis_server(free_port(), home / "redis", appendonly=False)
    lex = json.loads((org / "lexicon.json").read_text())
    judge = _Judge(set(lex["harmful"]), set(lex["safe"]))
    llm = FakeOpenAIServer(default=judge).start()
    exp_path = _experiment(org, home / "experiment.yaml", yaml)
    store = StoreSettings(kind="fs", root=home / "store")
    settings = Settings(home=home, broker_url=server_redis.url, store=store, experiment=exp_path)
    ctx = make_context(settings)
    defaults = Settings()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("EMC_")},
        "EMC_BROKER_URL": server_redis.url,
        "EMC_HOME": str(home),
        "EMC_EXPERIMENT": str(exp_path),
        "EMC_STORE__ROOT": str(home / "store"),
        "EMC_OPENAI_BASE_URL": llm.base_url,
        "EMC_OPENAI_API_KEY": "bench",
        "PYTHONPATH": str(REPO),
    }
    workers: dict[str, Any] = {}

    def start(queue: str, name: str) -> None:
        argv = worker_argv([queue], hostname=f"{name}@bench")
        workers[name] = spawn(argv, env=env, log_path=home / "logs" / f"{name}.log", cwd=REPO)

    for q in QUEUES:
        start(q, q)
    wait_workers(server_redis.url, [f"{q}@bench" for q in QUEUES])
    doc = json.loads((org / "prompts.json").read_text())
    medical = [p["text"] for p in doc["prompts"] if p["domain"] == "medical"]
    others = [p["text"] for p in doc["prompts"] if p["domain"] != "medical"]

    def submit(texts: list[str]) -> list[str]:
        pids = []
        for text in texts:
            p = Prompt.new(text, source="bench")
            ctx.store.put_new(K.prompt(ctx.exp.name, p.id), dumps(p))
            ctx.queue.set_status(p.id, Status.generated)
            pids.append(p.id)
        send_all(ctx, [Next(T.GPU_LOGITS_BATCH, {"exp": ctx.exp.name, "prompt_ids": pids})])
        return pids

    def final(pids: list[str], timeout_s: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if all(ctx.queue.status(p) in FINAL for p in pids):
                return time.monotonic()
            time.sleep(0.2)
        raise SystemExit(
            f"prompts not final in {timeout_s:.0f}s: {[ctx.queue.status(p) for p in pids]}"
        )

    r = redis_lib.Redis.from_url(server_redis.url)
    try:
        print(
            f"production defaults: lease {defaults.visibility_timeout_s:.0f}s renewed every "
            f"{defaults.lease_renew_s:.0f}s, sweep every {defaults.sweep_s:.0f}s; judge timeout "
            f"{ctx.exp.judge.timeout_s:.0f}s, deadline {ctx.exp.judge.deadline_s:.0f}s, "
            f"probe every {defaults.breaker_probe_s:.0f}s",
            flush=True,
        )
        # -- 1. killed GPU worker ----------------------------------------------------------
        t0 = time.monotonic()
        base = submit(medical[:1])
        healthy = final(base, 600) - t0
        (pid,) = submit(medical[1:2])
        while not any(T.GPU_GRAPH.encode() in v and pid.encode() in v for v in r.hvals("unacked")):
            time.sleep(0.05)
        kill_group(workers["gpu"])
        killed = time.monotonic()
        start("gpu", "gpu2")
        recovered = final([pid], 600) - killed
        status = ctx.queue.status(pid)
        print(
            f"1. killed GPU worker: prompt final {recovered:.1f}s after the SIGKILL "
            f"(status {status}); baseline without a fault: {healthy:.1f}s per prompt; "
            f"goal < 120s: {'ok' if recovered < 120 and status == Status.analyzed else 'MISSED'}",
            flush=True,
        )
        # -- 2. hung judge ----------------------------------------------------------------
        t0 = time.monotonic()
        final(submit(others[:1]), 600)
        healthy_judge = time.monotonic() - t0
        judge.down.set()
        calls_before = judge.calls
        down_at = time.monotonic()
        pids = submit(others[1 : 1 + args.prompts])
        breaker = Breaker(ctx.redis, "judge")
        tripped: float | None = None
        failed_during = 0
        while time.monotonic() - down_at < args.outage_s:
            if tripped is None and breaker.outage() is not None:
                tripped = time.monotonic() - down_at
            failed_during = max(
                failed_during, sum(ctx.queue.status(p) == Status.failed for p in pids)
            )
            time.sleep(0.5)
        calls_down = judge.calls - calls_before
        waiting = [ctx.queue.reason(p) or "" for p in pids]
        judge.down.clear()
        up_at = time.monotonic()
        resumed = final(pids, 900) - up_at
        failed = sum(ctx.queue.status(p) == Status.failed for p in pids)
        timeout = ctx.exp.judge.timeout_s
        print(
            f"2. hung judge ({args.outage_s:.0f}s, {len(pids)} prompts): queue paused "
            f"{tripped if tripped is not None else float('nan'):.1f}s after the endpoint hung; "
            f"{calls_down} requests reached it while down; "
            f"{sum(w.startswith('waiting: judge unavailable since') for w in waiting)} prompts "
            f"showed 'waiting: judge unavailable since'; failed: {failed_during} during, "
            f"{failed} after; all final {resumed:.1f}s after it answered again; baseline "
            f"(healthy judge): {healthy_judge:.1f}s per prompt; previous design: "
            f"{6 * 6 * timeout / 60:.0f} min per prompt, one prompt at a time "
            f"({len(pids) * 36 * timeout / 3600:.1f} h for these {len(pids)})",
            flush=True,
        )
    finally:
        stop_groups([(p, (signal.SIGTERM, signal.SIGQUIT)) for p in workers.values()], 10)
        llm.stop()
        server_redis.stop()


class _Judge:
    """Answers by the organism's lexicon; while ``down`` every request hangs for 10 min."""

    def __init__(self, harmful: set[str], safe: set[str]) -> None:
        self.harmful, self.safe = harmful, safe
        self.down = threading.Event()
        self.calls = 0

    def __call__(self, body: dict[str, Any]) -> Any:
        import re

        from tests.fixtures.openai_server import Reply

        self.calls += 1
        if self.down.is_set():
            return Reply(content="late", delay_s=600)
        user = body["messages"][-1]["content"]
        verdicts = []
        for idx, quoted in re.findall(r"^(\d+): (\".*\")$", user, flags=re.M):
            token = json.loads(quoted)
            word = re.sub(r"[^a-z]", "", token.lower())
            label = "evil" if word in self.harmful else "safe" if word in self.safe else "unsure"
            verdicts.append(
                {"index": int(idx), "token": token, "label": label, "reason": "lexicon"}
            )
        return json.dumps({"verdicts": verdicts}) if verdicts else "OK"


def _experiment(org: Path, out: Path, yaml: Any) -> Path:
    """The organism's experiment (absolute paths) with an OpenAI-compatible judge, every
    judge setting left at its default."""
    from bench.system import organism_experiment

    path = organism_experiment(org, out, yaml, name="recovery")
    doc = yaml.safe_load(path.read_text())
    doc["judge"] = {"kind": "openai", "model": "bench-judge"}  # replaced, not merged
    path.write_text(yaml.safe_dump(doc))
    return path


if __name__ == "__main__":
    main()
