"""Run the embedded system as child processes: Redis, one Celery worker per queue, beat, UI.

:func:`embedded_processes` is the plain list of what ``emc up`` runs (later services add
theirs there); :class:`Supervisor` starts each in its own process group, restarts a child
that dies (up to ``settings.max_restarts`` times in 10 minutes), and on SIGINT/SIGTERM
stops them all: each its stop signals in turn (workers: SIGTERM for a warm shutdown, then
SIGQUIT, which cancels and requeues the running task) with a grace period after each,
then SIGKILL to whatever is left of its process group, and reaps them, so no orphan or
zombie is left. Redis stops last. Children also get SIGTERM if the supervisor itself
dies (Linux ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TextIO

from common.settings import Settings
from common.tasknames import GPU_QUEUES, QUEUES

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


@dataclass
class ProcessSpec:
    """One child process of the embedded system.

    ``ready`` (optional) returns True once the process serves; the supervisor waits for it
    before starting the next spec, so order matters (Redis first).
    """

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    ready: Callable[[], bool] | None = None
    ready_timeout_s: float = 30.0
    cwd: Path | None = None
    stop_signals: tuple[int, ...] = (signal.SIGTERM,)
    stop_last: bool = False  # infrastructure (Redis): stopped after everything else


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = _LIBC
    if libc is not None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _load_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
    cwd: Path | None = None,
    die_with_parent: bool = True,
) -> subprocess.Popen[bytes]:
    """Start a process in its own session/process group, output appended to ``log_path``.

    Its own group means a terminal's Ctrl-C reaches only the supervisor, which then stops
    children in order, and :func:`stop_group` can kill a child with all its descendants.
    """
    out: TextIO | int = subprocess.DEVNULL
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = log_path.open("a", buffering=1)
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start: {' '.join(argv)}\n")
    try:
        return subprocess.Popen(
            list(argv),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if die_with_parent and _LIBC is not None else None,
        )
    finally:
        if not isinstance(out, int):
            out.close()


def stop_group(
    proc: subprocess.Popen[bytes],
    timeout_s: float = 10.0,
    signals: Sequence[int] = (signal.SIGTERM,),
) -> int | None:
    """Stop ``proc`` gracefully, then kill its whole process group; reap; return its rc."""
    stop_groups([(proc, signals)], timeout_s)
    return proc.returncode


def stop_groups(
    procs: Sequence[tuple[subprocess.Popen[bytes], Sequence[int]]], timeout_s: float = 10.0
) -> None:
    """Stop several processes at once, each with its own escalation of signals.

    Stage by stage, each process still alive gets its next signal — sent to the group
    leader only (a Celery worker's pool children must not be hit directly) — and all get
    up to ``timeout_s`` to exit. Whatever is left of each process group then gets SIGKILL
    and every leader is reaped.
    """
    stage = 0
    while True:
        pending = [(p, sigs) for p, sigs in procs if p.poll() is None and stage < len(sigs)]
        if not pending:
            break
        for p, sigs in pending:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sigs[stage])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(p.poll() is None for p, _ in pending):
            time.sleep(0.05)
        stage += 1
    for p, _ in procs:
        if p.poll() is None:
            log.warning("pid %d did not stop in time: SIGKILL", p.pid)
        # Descendants (e.g. prefork pool children) may outlive the leader: kill what is left.
        _killpg(p, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(5)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a child and everything in its process group (a crash, as in the tests)."""
    _killpg(proc, signal.SIGKILL)
    proc.wait(10)


def _killpg(proc: subprocess.Popen[bytes], sig: int) -> None:
    # the child called setsid(), so its pgid is its pid (valid even after the leader exits)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def child_env(settings: Settings, broker_url: str) -> dict[str, str]:
    """Environment for children: ours plus the broker URL and an absolute home."""
    env = dict(os.environ)
    env["EMC_BROKER_URL"] = broker_url
    env["EMC_HOME"] = str(Path(settings.home).resolve())
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def worker_argv(
    queues: Sequence[str],
    *,
    hostname: str | None = None,
    pool: str | None = None,
    log_level: str = "INFO",
    include: Sequence[str] = (),
) -> list[str]:
    """A Celery worker: one task at a time; GPU lanes in-process (solo pool) by default."""
    pool = pool or ("solo" if set(queues) <= set(GPU_QUEUES) else "prefork")
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "common.celery_app",
        "worker",
        "-Q",
        ",".join(queues),
        "-n",
        hostname or f"{'-'.join(queues)}@%h",
        "-c",
        "1",
        "--pool",
        pool,
        "--without-mingle",
        "--without-gossip",
        "--loglevel",
        log_level,
    ]
    for module in include:
        argv += ["--include", module]
    return argv


def worker_groups(queues: Sequence[str], gpu_lanes: str) -> list[list[str]]:
    """One worker per queue; with ``gpu_lanes="shared"`` one worker serves both GPU lanes
    (fast lane first)."""
    if gpu_lanes != "shared" or not set(GPU_QUEUES) <= set(queues):
        return [[q] for q in queues]
    groups: list[list[str]] = []
    for q in queues:
        if q in GPU_QUEUES:
            if list(GPU_QUEUES) not in groups:
                groups.append(list(GPU_QUEUES))
        else:
            groups.append([q])
    return groups


def embedded_processes(
    settings: Settings,
    *,
    broker_url: str,
    queues: Sequence[str] = QUEUES,
    ui: bool = True,
    beat: bool = False,
) -> list[ProcessSpec]:
    """What ``emc up`` runs besides the embedded Redis: workers, the review UI, and beat
    (``emc up --stream``: periodic tasks such as the generator's ``emc.generate.tick``)."""
    unknown = sorted(set(queues) - set(QUEUES))
    if unknown:
        raise ValueError(f"unknown queue(s) {unknown}: choose among {', '.join(QUEUES)}")
    home = Path(settings.home).resolve()
    logs = home / "logs"
    env = child_env(settings, broker_url)
    specs = [
        ProcessSpec(
            name=f"worker-{'-'.join(group)}",
            argv=worker_argv(group, log_level=settings.log_level),
            env=env,
            log_path=logs / f"worker-{'-'.join(group)}.log",
            # warm shutdown (finish the task), then cold (cancel it: acks_late requeues it)
            stop_signals=(signal.SIGTERM, signal.SIGQUIT),
        )
        for group in worker_groups(queues, settings.gpu_lanes)
    ]
    if beat:
        # in-memory scheduler: no pickled schedule file; periodic tasks restart with beat
        specs.append(
            ProcessSpec(
                name="beat",
                argv=[
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "common.celery_app",
                    "beat",
                    "-S",
                    "celery.beat:Scheduler",
                    "--loglevel",
                    settings.log_level,
                ],
                env=env,
                log_path=logs / "beat.log",
            )
        )
    if ui:
        specs.append(
            ProcessSpec(
                name="review-ui",
                argv=[sys.executable, "-m", "services.review_ui"],
                env={
                    **env,
                    "EMC_UI_HOST": settings.ui_host,
                    "EMC_UI_PORT": str(settings.ui_port),
                },
                log_path=logs / "review-ui.log",
            )
        )
    return specs


class SupervisorError(RuntimeError):
    """A child could not be started or kept running; the message names it and its log."""


@dataclass
class _Child:
    spec: ProcessSpec
    proc: subprocess.Popen[bytes]
    deaths: list[float] = field(default_factory=list)  # monotonic times, within the window


class Supervisor:
    """Start specs in order, watch them, restart the ones that die, stop all on a signal."""

    def __init__(
        self,
        specs: Sequence[ProcessSpec],
        *,
        max_restarts: int = 3,
        restart_window_s: float = 600.0,
        stop_timeout_s: float = 10.0,
        poll_s: float = 0.5,
        report: Callable[[str], None] = print,
    ) -> None:
        self.specs = list(specs)
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self.stop_timeout_s = stop_timeout_s
        self.poll_s = poll_s
        self.report = report
        self.children: list[_Child] = []
        self._stop_signal: int | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Start every spec in order, waiting for each ``ready`` check."""
        try:
            for spec in self.specs:
                self.children.append(_Child(spec, self._start(spec)))
        except BaseException:
            self.stop()
            raise

    def _start(self, spec: ProcessSpec) -> subprocess.Popen[bytes]:
        proc = spawn(spec.argv, env=spec.env or None, log_path=spec.log_path, cwd=spec.cwd)
        if spec.ready is not None:
            deadline = time.monotonic() + spec.ready_timeout_s
            while not spec.ready():
                if proc.poll() is not None:
                    raise SupervisorError(
                        f"{spec.name} exited with code {proc.returncode} while starting: "
                        f"see {spec.log_path}\n{log_tail(spec.log_path)}"
                    )
                if time.monotonic() > deadline:
                    stop_group(proc, self.stop_timeout_s, spec.stop_signals)
                    raise SupervisorError(
                        f"{spec.name} did not become ready in {spec.ready_timeout_s:.0f} s: "
                        f"see {spec.log_path}\n{log_tail(spec.log_path)}"
                    )
                time.sleep(0.1)
        return proc

    def run(self, on_started: Callable[[Supervisor], None] | None = None) -> int:
        """Start (if not yet), then watch until SIGINT/SIGTERM; stop all; return exit code."""
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            if not self.children:
                self.start()
            if on_started is not None:
                on_started(self)
            return self._watch()
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop_signal = signum

    def _sleep(self, seconds: float) -> None:
        """Sleep, but wake up as soon as a stop signal arrived."""
        deadline = time.monotonic() + seconds
        while self._stop_signal is None and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def _watch(self) -> int:
        """Restart children that die; more than ``max_restarts`` deaths of one child within
        ``restart_window_s`` stops everything (exit code 1)."""
        while self._stop_signal is None:
            for child in self.children:
                rc = child.proc.poll()
                if rc is None or self._stop_signal is not None:
                    continue
                spec = child.spec
                now = time.monotonic()
                child.deaths = [t for t in child.deaths if now - t < self.restart_window_s]
                child.deaths.append(now)
                restarts = len(child.deaths)
                if restarts > self.max_restarts:
                    self.report(
                        f"{spec.name} died (exit code {rc}) {restarts} times in "
                        f"{self.restart_window_s:.0f} s: stopping everything; see "
                        f"{spec.log_path}\n{log_tail(spec.log_path)}"
                    )
                    return 1
                self.report(
                    f"{spec.name} died (exit code {rc}); restart {restarts}/{self.max_restarts}; "
                    f"log: {spec.log_path}"
                )
                self._sleep(min(2.0 ** (restarts - 1), 10.0))
                if self._stop_signal is None:
                    child.proc = self._start(spec)
            self._sleep(self.poll_s)
        self.report(f"received {signal.Signals(self._stop_signal).name}: stopping")
        return 0

    def stop(self) -> None:
        """Stop all children (workers etc. together, then ``stop_last`` ones) and reap them."""
        for last in (False, True):
            stop_groups(
                [(c.proc, c.spec.stop_signals) for c in self.children if c.spec.stop_last == last],
                self.stop_timeout_s,
            )
        self.children.clear()

    def pids(self) -> dict[str, int]:
        """Process id of each supervised child, by process name."""
        return {c.spec.name: c.proc.pid for c in self.children}


def log_tail(path: Path | None, lines: int = 15) -> str:
    """The last lines of a log file, for error messages."""
    if path is None or not path.exists():
        return ""
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 8192))
        text = f.read().decode("utf-8", "replace")
    return "\n".join("  | " + line for line in text.splitlines()[-lines:])
