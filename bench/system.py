"""A throwaway embedded system for benchmarks: a Redis server, worker processes started as
``emc up`` starts them, a store and a context, all under one home directory.

    with BenchSystem(home, exp_path) as sys_:
        sys_.start_workers([["judge"], ["gpu_fast"], ["gpu"], ["analysis"]])
        pids = sys_.submit(texts)          # stored + ``generated`` + one logits batch task
        sys_.wait_status(pids, {Status.in_review, ...})
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from common import tasknames as T  # noqa: E402
from common.context import Context, make_context  # noqa: E402
from common.pipeline import Next, send_all  # noqa: E402
from common.records import Prompt, Status  # noqa: E402
from common.settings import Settings, StoreSettings  # noqa: E402
from common.store import keys as K  # noqa: E402
from common.store.base import dumps  # noqa: E402
from common.system.broker import start_redis_server  # noqa: E402
from common.system.supervisor import spawn, stop_groups, worker_argv  # noqa: E402


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_workers(url: str, hostnames: Iterable[str], timeout_s: float = 180) -> None:
    """Until every named worker answers a ping."""
    from celery import Celery

    ctl = Celery("bench-control", broker=url, set_as_current=False)
    wanted = set(hostnames)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            replies = ctl.control.ping(timeout=1.0) or []
            if wanted <= {h for r in replies for h in r}:
                return
        raise SystemExit(f"workers {sorted(wanted)} not ready in {timeout_s:.0f}s")
    finally:
        ctl.close()


class BenchSystem:
    """Redis + workers + a context on ``home`` (see the module docstring)."""

    def __init__(self, home: Path, experiment: Path, *, env: dict[str, str] | None = None):
        self.home = home
        self.redis = start_redis_server(free_port(), home / "redis", appendonly=False)
        store = StoreSettings(kind="fs", root=home / "store")
        self.settings = Settings(
            home=home, broker_url=self.redis.url, store=store, experiment=experiment
        )
        self.ctx: Context = make_context(self.settings)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("EMC_")},
            "EMC_BROKER_URL": self.redis.url,
            "EMC_HOME": str(home),
            "EMC_EXPERIMENT": str(experiment),
            "EMC_STORE__KIND": "fs",
            "EMC_STORE__ROOT": str(home / "store"),
            "PYTHONPATH": str(REPO),
            **(env or {}),
        }
        self.workers: dict[str, subprocess.Popen[bytes]] = {}

    def start_workers(self, groups: Sequence[Sequence[str]]) -> None:
        """One worker per group of queues (named after them), as ``emc up`` starts them."""
        names = []
        for queues in groups:
            name = "-".join(queues)
            argv = worker_argv(list(queues), hostname=f"{name}@bench")
            log = self.home / "logs" / f"worker-{name}.log"
            self.workers[name] = spawn(argv, env=self.env, log_path=log, cwd=REPO)
            names.append(f"{name}@bench")
        wait_workers(self.redis.url, names)

    def stop_workers(self) -> None:
        import signal

        stop_groups([(p, (signal.SIGTERM, signal.SIGQUIT)) for p in self.workers.values()])
        self.workers.clear()

    def submit(self, texts: Sequence[str], source: str = "bench") -> list[str]:
        """Store prompts as the generator does and send their logits batch task."""
        pids = []
        for text in texts:
            p = Prompt.new(text, source=source)
            self.ctx.store.put_new(K.prompt(self.ctx.exp.name, p.id), dumps(p))
            self.ctx.queue.set_status(p.id, Status.generated)
            pids.append(p.id)
        send_all(
            self.ctx, [Next(T.GPU_LOGITS_BATCH, {"exp": self.ctx.exp.name, "prompt_ids": pids})]
        )
        return pids

    def wait(self, done: Callable[[], bool], what: str, timeout_s: float = 1200) -> float:
        """Poll until ``done()``; returns the monotonic time it became true."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if done():
                return time.monotonic()
            dead = [n for n, p in self.workers.items() if p.poll() is not None]
            if dead:
                raise SystemExit(f"worker(s) {dead} died: see {self.home / 'logs'}")
            time.sleep(0.02)
        raise SystemExit(f"{what} not done in {timeout_s:.0f}s")

    def statuses(self, pids: Iterable[str]) -> list[Status | None]:
        return [self.ctx.queue.status(p) for p in pids]

    def __enter__(self) -> BenchSystem:
        return self

    def __exit__(self, *exc: object | type[BaseException] | TracebackType | None) -> None:
        self.stop_workers()
        self.redis.stop()


def organism_experiment(org: Path, out: Path, yaml: Any, **overrides: Any) -> Path:
    """The organism's experiment with absolute paths, ``overrides`` merged in at the top."""
    raw = yaml.safe_load((org / "experiment.yaml").read_text())
    for spec in raw["variants"].values():
        for field in ("model", "adapter"):
            if spec.get(field):
                spec[field] = str((org / spec[field]).resolve())
    raw["transcoders"]["path"] = str((org / raw["transcoders"]["path"]).resolve())
    for section, field in (("judge", "lexicon"), ("generator", "templates")):
        if raw.get(section, {}).get(field):
            raw[section][field] = str((org / raw[section][field]).resolve())
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(raw))
    return out
