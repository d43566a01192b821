"""The Supervisor with plain processes: restart limit, escalation to SIGKILL, whole groups."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import psutil

from common.settings import Settings
from common.system.supervisor import ProcessSpec, Supervisor, embedded_processes, spawn, stop_group
from common.tasknames import QUEUES


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_child_dying_too_often_stops_everything(tmp_path: Path) -> None:
    messages: list[str] = []
    sup = Supervisor(
        [
            ProcessSpec("crasher", _py("import sys; sys.exit(3)"), log_path=tmp_path / "c.log"),
            ProcessSpec("steady", _py("import time; time.sleep(60)")),
        ],
        max_restarts=2,
        report=messages.append,
        poll_s=0.05,
    )
    started = time.monotonic()
    assert sup.run() == 1
    assert time.monotonic() - started < 20
    assert [m.split(";")[0] for m in messages[:2]] == ["crasher died (exit code 3)"] * 2
    assert "3 times" in messages[-1] and "stopping everything" in messages[-1]
    assert sup.children == []
    assert (tmp_path / "c.log").read_text().count("=== ") == 3  # started 3 times, one log


def test_stop_escalates_to_sigkill_and_takes_the_whole_group(tmp_path: Path) -> None:
    # a leader that ignores SIGTERM, with a grandchild in its process group
    code = (
        "import signal, subprocess, sys, time;"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
        "print(p.pid, flush=True); time.sleep(60)"
    )
    log = tmp_path / "stubborn.log"
    proc = spawn(_py(code), log_path=log)
    deadline = time.monotonic() + 10
    while not log.read_text().strip().splitlines()[-1].isdigit():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    grandchild = psutil.Process(int(log.read_text().strip().splitlines()[-1]))
    started = time.monotonic()
    rc = stop_group(proc, timeout_s=0.5)
    assert rc == -signal.SIGKILL
    assert time.monotonic() - started < 5
    grandchild.wait(5)  # reaped by init once killed; raises TimeoutExpired if still alive
    assert not grandchild.is_running()


def test_sigterm_to_the_supervisor_stops_children(tmp_path: Path) -> None:
    sup = Supervisor(
        [ProcessSpec(f"sleeper{i}", _py("import time; time.sleep(60)")) for i in range(2)],
        report=lambda m: None,
        poll_s=0.05,
    )
    pids: list[int] = []

    def send_term() -> None:
        deadline = time.monotonic() + 10
        while len(sup.children) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        pids.extend(c.proc.pid for c in sup.children)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send_term).start()
    assert sup.run() == 0
    assert len(pids) == 2
    assert not any(psutil.pid_exists(p) for p in pids)


def test_embedded_processes_lists_workers_beat_ui(tmp_path: Path) -> None:
    specs = embedded_processes(
        Settings(home=tmp_path),
        broker_url="redis://127.0.0.1:1/0",
        queues=["gpu", "judge"],
        beat=True,
    )
    names = [s.name for s in specs]
    assert names[:3] == ["worker-gpu", "worker-judge", "beat"]
    gpu = specs[0].argv
    assert gpu[gpu.index("--pool") + 1] == "solo" and gpu[gpu.index("-Q") + 1] == "gpu"
    assert all(s.env["EMC_BROKER_URL"] == "redis://127.0.0.1:1/0" for s in specs)
    assert all(s.log_path and s.log_path.parent == tmp_path / "logs" for s in specs)
    no_extras = embedded_processes(
        Settings(home=tmp_path), broker_url="redis://x:1/0", queues=["gpu"], ui=False
    )
    assert [s.name for s in no_extras] == ["worker-gpu"]


def test_gpu_lanes_split_or_shared(tmp_path: Path) -> None:
    """Split (default): one solo worker per GPU lane; shared: one worker serving the fast lane
    first, then graphs."""
    split = embedded_processes(Settings(home=tmp_path), broker_url="redis://x:1/0", ui=False)
    assert [s.name for s in split] == [f"worker-{q}" for q in QUEUES]
    shared = embedded_processes(
        Settings(home=tmp_path, gpu_lanes="shared"), broker_url="redis://x:1/0", ui=False
    )
    names = [s.name for s in shared]
    assert names == ["worker-generate", "worker-judge", "worker-gpu_fast-gpu", "worker-analysis"]
    gpu = shared[2].argv
    assert gpu[gpu.index("-Q") + 1] == "gpu_fast,gpu" and gpu[gpu.index("--pool") + 1] == "solo"
