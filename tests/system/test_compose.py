"""``deploy/compose.yaml`` runs as written: every service's command started natively, with
its environment (compose file + .env + the image's ENV), on loopback.

There is no container engine here, so what the images provide comes from this machine:
Debian's ``redis-server`` with the compose file's AOF flags, a moto S3 server in place of
MinIO, and the emc image's commands from this checkout (the venv has what
``pip install .`` gives the image; :func:`test_image_installs_what_the_commands_need`
checks that the image installs them). Host names and published ports become 127.0.0.1
and free ports, container paths become temporary directories. The test mines a batch
through the running services, checks that Flower and the review UI (under gunicorn)
answer, then stops everything and checks that nothing is left running.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from common.cli.pipeline import mine_batch
from common.cli.system import check_workers
from common.context import make_context
from common.pipeline import FINAL
from common.records import Status
from common.settings import Settings, StoreSettings
from common.system.supervisor import log_tail, spawn, stop_groups
from tests.conftest import REPO, require
from tests.fixtures.servers import clean_env, free_port, wait_until
from tests.system.test_e2e import organism_experiment

COMPOSE = REPO / "deploy" / "compose.yaml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|:\?)(?P<arg>[^}]*))?\}")


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}``."""

    def one(m: re.Match[str]) -> str:
        name, op, arg = m["name"], m["op"], m["arg"]
        if env.get(name):
            return env[name]
        if op == ":?":
            raise ValueError(f"compose needs {name}: {arg}")
        return arg if op == ":-" else ""

    return _VAR.sub(one, value)


def image_env() -> dict[str, str]:
    """The ``ENV`` of the Dockerfile (``ENV A=1 B=2`` lines)."""
    out: dict[str, str] = {}
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("ENV "):
            for pair in line[4:].split():
                k, _, v = pair.partition("=")
                out[k] = v
    return out


@dataclass
class Service:
    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None


def load_compose(dotenv: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    raw = yaml.safe_load(COMPOSE.read_text())  # merge keys (<<: *emc) resolved by PyYAML
    services: dict[str, dict[str, Any]] = raw["services"]
    for spec in services.values():
        spec["environment"] = {
            k: interpolate(str(v), dotenv) for k, v in (spec.get("environment") or {}).items()
        }
        spec["command"] = [interpolate(str(a), dotenv) for a in spec.get("command", [])]
    return services


def test_image_installs_what_the_commands_need() -> None:
    """Every executable and celery sub-command of the emc services comes from a *main*
    dependency (the image runs ``pip install -c constraints.txt .``, no extras)."""
    assert re.search(r"pip install -c constraints\.txt \.(\s|$)", DOCKERFILE.read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    main = {re.split(r"[\[<>=!~ ]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    scripts = {
        ep.name: d.metadata["Name"].lower()
        for d in md.distributions()
        for ep in d.entry_points
        if ep.group == "console_scripts"
    }
    celery_cmds = {
        ep.name: d.metadata["Name"].lower()
        for d in md.distributions()
        for ep in d.entry_points
        if ep.group == "celery.commands"
    }
    needed = set()
    services = load_compose({"MINIO_ROOT_USER": "u", "MINIO_ROOT_PASSWORD": "p"})
    for spec in services.values():
        if spec.get("image", "").startswith("emc"):
            argv = spec["command"]
            needed.add(scripts[argv[0]])
            if argv[0] == "celery":
                sub = argv[argv.index("-A") + 2]
                needed.add(celery_cmds.get(sub, "celery"))
    assert {"celery", "flower", "gunicorn"} <= needed
    assert needed <= main, f"only in extras, not in the image: {sorted(needed - main)}"


@pytest.fixture
def running(
    tmp_path: Path, organism_dir: Path
) -> Iterator[tuple[dict[str, Service], dict[str, Any]]]:
    require(
        shutil.which("redis-server") is not None,
        "redis-server is missing: run scripts/system-deps.sh (apt)",
    )
    require(shutil.which("moto_server") is not None, "moto_server is missing: run `make install`")
    ports = {
        "redis": free_port(),
        "minio": free_port(),
        "flower": free_port(),
        "review-ui": free_port(),
    }
    dirs = {
        p: tmp_path / p.strip("/").replace("/", "_") for p in ("/experiments", "/models", "/data")
    }
    for d in dirs.values():
        d.mkdir(parents=True)
    organism_experiment(
        organism_dir,
        dirs["/experiments"] / "experiment.yaml",
        name="compose",
        generator={"batch_size": 2},
    )
    dotenv = {
        "MINIO_ROOT_USER": "emc",
        "MINIO_ROOT_PASSWORD": "change-me-long-random",
        "EMC_EXPERIMENT_FILE": "experiment.yaml",
    }
    specs = load_compose(dotenv)
    hosts = {
        "redis:6379": f"127.0.0.1:{ports['redis']}",
        "minio:9000": f"127.0.0.1:{ports['minio']}",
    }

    def local(value: str) -> str:
        for host, here in hosts.items():
            value = value.replace(host, here)
        for container, d in dirs.items():
            if value == container or value.startswith(container + "/"):
                value = str(d) + value[len(container) :]
        return value

    base = clean_env({})
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"
    services: dict[str, Service] = {}
    for name, spec in specs.items():
        argv = list(spec["command"])
        if name == "redis":
            argv += [
                "--port",
                str(ports["redis"]),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(tmp_path / "redis-data"),
                "--daemonize",
                "no",
            ]
            (tmp_path / "redis-data").mkdir()
        elif name == "minio":  # no MinIO binary here: moto speaks the same S3 API
            argv = [
                shutil.which("moto_server") or "moto_server",
                "-H",
                "127.0.0.1",
                "-p",
                str(ports["minio"]),
            ]
        elif name == "flower":
            argv = [a for a in argv if not a.startswith("--port")] + [
                f"--port={ports['flower']}",
                "--address=127.0.0.1",
            ]
        elif name == "review-ui":
            argv = [f"127.0.0.1:{ports['review-ui']}" if a == "0.0.0.0:8000" else a for a in argv]
        env = {**base}
        if spec.get("image", "").startswith("emc"):
            env.update({k: local(v) for k, v in image_env().items()})
        env.update({k: local(v) for k, v in spec["environment"].items()})
        services[name] = Service(name, argv, env)
    order = ["redis", "minio", *[n for n in services if n not in ("redis", "minio")]]
    try:
        for name in order:
            svc = services[name]
            svc.log = tmp_path / "logs" / f"{name}.log"
            svc.proc = spawn(
                svc.argv, env=svc.env, log_path=svc.log, cwd=REPO, die_with_parent=False
            )
            if name == "redis":
                broker = f"redis://127.0.0.1:{ports['redis']}/0"
                wait_until(lambda b=broker: _answers(b), 20, f"redis-server:\n{log_tail(svc.log)}")
            if name == "minio":
                wait_until(lambda: _http_up(f"http://127.0.0.1:{ports['minio']}/"), 30, "moto")
        yield services, {"ports": ports, "dirs": dirs, "tmp": tmp_path}
    finally:
        stop_all(services)


def stop_all(services: Mapping[str, Service]) -> None:
    """Workers, beat, Flower, UI and moto (warm, then cold shutdown), then Redis (AOF flushed)."""
    procs = [(s.name, s.proc) for s in services.values() if s.proc is not None]
    stop_groups([(p, (signal.SIGTERM, signal.SIGQUIT)) for n, p in procs if n != "redis"], 15)
    stop_groups([(p, (signal.SIGTERM,)) for n, p in procs if n == "redis"], 10)


def group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


def _http_up(url: str) -> bool:
    try:
        httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compose_services_run_natively_mine_a_batch_and_stop(
    running: tuple[dict[str, Service], dict[str, Any]],
) -> None:
    services, info = running
    ports, tmp = info["ports"], info["tmp"]
    url = f"redis://127.0.0.1:{ports['redis']}/0"

    def alive() -> None:
        dead = [
            f"{s.name} ({s.proc.returncode}):\n{log_tail(s.log)}"
            for s in services.values()
            if s.proc and s.proc.poll() is not None
        ]
        assert not dead, "services exited:\n" + "\n".join(dead)

    def workers_ready() -> bool:
        alive()
        return check_workers(url, 1.0).status == "ok"

    wait_until(workers_ready, 240, "a worker on every queue", every_s=1)
    r = redis.Redis.from_url(url)
    assert r.config_get("appendonly")["appendonly"] == "yes"  # the compose file's AOF flags
    ui = f"http://127.0.0.1:{ports['review-ui']}"
    wait_until(
        lambda: _http_up(ui + "/healthz"),
        120,
        f"the review UI:\n{log_tail(services['review-ui'].log)}",
    )

    env = services["generator"].env
    store = StoreSettings(
        kind="s3",
        endpoint=env["EMC_STORE__ENDPOINT"],
        bucket=env["EMC_STORE__BUCKET"],
        access_key=env["EMC_STORE__ACCESS_KEY"],  # type: ignore[arg-type]
        secret_key=env["EMC_STORE__SECRET_KEY"],  # type: ignore[arg-type]
    )
    settings = Settings(
        home=tmp / "cli-home",
        broker_url=env["EMC_BROKER_URL"],
        store=store,
        experiment=Path(env["EMC_EXPERIMENT"]),
    )
    ctx = make_context(settings)
    result = mine_batch(ctx, 4, timeout_s=300, chunk=4)
    assert len(result) == 4, result
    assert all(s in FINAL and s != Status.failed for s in result.values()), {
        p: (s, ctx.queue.reason(p)) for p, s in result.items()
    }
    alive()

    # Flower watches the workers; the UI (gunicorn, 2 workers) serves the queue from S3 + Redis
    flower = httpx.get(f"http://127.0.0.1:{ports['flower']}/workers", timeout=10)
    assert flower.status_code == 200
    wait_until(
        lambda: "gpu@" in httpx.get(f"http://127.0.0.1:{ports['flower']}/workers", timeout=10).text,
        60,
        "Flower to list the GPU worker",
        every_s=2,
    )
    from services.review_ui.users import add_user

    add_user(ctx.store, "alice", "correct-horse-battery")
    with httpx.Client(base_url=ui, timeout=10) as web:
        assert web.get("/healthz").json() == {"status": "ok"}
        page = web.get("/login").text
        token = re.search(r'name="csrf-token" content="([^"]+)"', page)
        assert token, page[:500]
        resp = web.post(
            "/login",
            data={
                "username": "alice",
                "password": "correct-horse-battery",
                "csrf_token": token.group(1),
            },
        )
        assert resp.status_code == 302, resp.text[:500]
        queue = web.get("/api/queue").json()
        assert sum(queue["counts"].values()) >= 4, queue

    procs = {s.name: s.proc for s in services.values() if s.proc is not None}
    assert set(procs) == set(services) and all(p.poll() is None for p in procs.values())
    stop_all(services)
    left = [n for n, p in procs.items() if p.poll() is None or group_alive(p.pid)]
    assert not left, f"still running after the stop: {left}"
