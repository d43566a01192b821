"""``emc up`` as a real subprocess: workers serve every queue, a killed worker is restarted,
SIGTERM stops everything and leaves no process (orphan or zombie) behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from common.cli.system import check_workers
from common.system.broker import port_in_use
from common.tasknames import QUEUES
from tests.conftest import REPO
from tests.fixtures.servers import clean_env, free_port, wait_until


def _worker_for(up: psutil.Process, queue: str) -> psutil.Process | None:
    for child in up.children():
        with contextlib.suppress(psutil.NoSuchProcess):
            cmd = child.cmdline()
            if "worker" in cmd and cmd[cmd.index("-Q") + 1] == queue:
                return child
    return None


def _leftovers(procs: dict[int, psutil.Process]) -> list[str]:
    """Processes among ``procs`` that still exist (running or zombie)."""
    left = []
    for pid, p in procs.items():
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.is_running():  # False also when the pid was reused by another process
                left.append(f"{pid} {p.status()} {' '.join(p.cmdline()[:6])}")
    return left


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_emc_up_serves_queues_restarts_dead_worker_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    home = tmp_path / "home"
    env = clean_env(
        {
            "EMC_HOME": str(home),
            "EMC_BROKER_PORT": str(port),
            "EMC_MAX_RESTARTS": "2",
            "EMC_GENERATE_EVERY_S": "3600",  # beat runs; no generation during the test
        }
    )
    out_path = tmp_path / "up.out"
    with out_path.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "common.cli", "up", "--no-ui", "--stream"],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"redis://127.0.0.1:{port}/0"
    seen: dict[int, psutil.Process] = {}

    def record_tree() -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            for p in psutil.Process(proc.pid).children(recursive=True):
                seen.setdefault(p.pid, p)

    try:
        wait_until(
            lambda: proc.poll() is None and check_workers(url, 0.5).status == "ok",
            60,
            f"workers on every queue; emc up said:\n{out_path.read_text()}",
            every_s=0.5,
        )
        record_tree()
        up = psutil.Process(proc.pid)
        names = [" ".join(p.cmdline()) for p in seen.values()]
        assert sum("redis-server" in n for n in names) == 1
        assert sum(" beat " in n for n in names) == 1
        for q in QUEUES:
            assert _worker_for(up, q) is not None, names
        assert (home / "logs" / "worker-judge.log").exists()

        # a worker that dies is reported and restarted
        judge = _worker_for(up, "judge")
        assert judge is not None
        os.killpg(judge.pid, signal.SIGKILL)
        wait_until(
            lambda: (w := _worker_for(up, "judge")) is not None and w.pid != judge.pid,
            20,
            "the judge worker to be restarted",
        )
        assert "worker-judge died" in out_path.read_text()
        wait_until(lambda: check_workers(url, 0.5).status == "ok", 40, "the new judge worker")
        record_tree()
        assert len(seen) >= 1 + len(QUEUES) + 1

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, out_path.read_text()
        assert "stopped" in out_path.read_text()
        assert _leftovers(seen) == []
        assert not port_in_use(port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for p in seen.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.is_running():
                    p.kill()


def test_up_refuses_a_busy_broker_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        env = clean_env({"EMC_HOME": str(tmp_path), "EMC_BROKER_PORT": str(port)})
        res = subprocess.run(
            [sys.executable, "-m", "common.cli", "up", "--no-ui"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert res.returncode == 1
    assert "EMC_BROKER_PORT" in res.stdout, res.stdout + res.stderr
