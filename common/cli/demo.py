"""`emc demo`: the main job on the embedded default, end to end, in one command.

Builds (or reuses) the toy organism, starts the embedded system (Redis, one worker per
queue, the review UI), mines a batch with the offline generator and judge, writes the
analysis report and prints where to look. With ``--serve`` (default when run in a
terminal) the system stays up for the review UI until Ctrl-C.
"""

from __future__ import annotations

import secrets
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from common.settings import Settings, get_settings

console = Console()


def wait_for_workers(url: str, queues: list[str], timeout_s: float) -> None:
    """Block until every queue has a consuming worker (they import torch: a few seconds)."""
    from celery import Celery

    ctl = Celery("emc-demo", broker=url, set_as_current=False)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            replies = ctl.control.inspect(timeout=1.0).active_queues() or {}
            served = {q["name"] for qs in replies.values() for q in qs}
            if set(queues) <= served:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"workers for {sorted(set(queues) - served)} did not start in "
                    f"{timeout_s:.0f} s: see the logs under <home>/logs"
                )
            time.sleep(0.5)
    finally:
        ctl.close()


def ensure_demo_reviewer(settings: Settings) -> tuple[str, str | None]:
    """A reviewer account to log in with: ``demo`` with a fresh password if none exists."""
    from common.store import open_store
    from services.review_ui.users import add_user, list_users

    store = open_store(settings)
    users = list_users(store)
    if users:
        return users[0].name, None
    password = secrets.token_urlsafe(9)
    add_user(store, "demo", password)
    return "demo", password


def top_features_table(settings: Settings, out_dir: Path, top: int = 10) -> Table | None:
    """Build the analysis report into ``out_dir``; the table of its top features."""
    from common.context import make_context
    from services.analysis.report import build_report

    ctx = make_context(settings)
    data = build_report(ctx.store, ctx.exp, out_dir, fingerprint=ctx.fingerprint)
    tables = []
    for variant, agg in data.aggregates.items():
        table = Table(
            title=f"top features of {variant} over {len(agg.prompt_ids)} divergent prompts "
            "(signed influence on evil minus safe tokens)"
        )
        for col in ("layer", "feature", "mean score", "prompts", "sign consistency", "tokens"):
            table.add_column(col)
        for f in agg.features[:top]:
            table.add_row(
                str(f.layer),
                str(f.feature),
                f"{f.mean_score:+.4f}",
                f"{f.n_prompts}/{len(agg.prompt_ids)}",
                f"{f.sign_consistency:.2f}",
                " ".join(repr(t) for t in f.tokens[:3]),
            )
        tables.append(table)
    return tables[0] if tables else None


def demo(
    n: int = typer.Option(50, "--n", help="prompts to mine"),
    serve: bool | None = typer.Option(
        None,
        "--serve/--no-serve",
        help="keep the system (and the review UI) running afterwards; default: if a terminal",
    ),
    timeout: float = typer.Option(600, help="seconds allowed for mining"),
) -> None:
    """Build the toy organism, start the embedded system, mine a batch, show the results."""
    from common.cli.pipeline import mine_batch, summary_table
    from common.cli.system import StartError, make_supervisor, print_processes, system_specs
    from common.organism import ensure_organism
    from common.tasknames import QUEUES

    settings = get_settings()
    home = Path(settings.home).resolve()
    t0 = time.monotonic()
    if settings.experiment is None:
        console.rule("1/4 toy model organism")
        ensure_organism(settings.home / "organism")
    console.rule("2/4 embedded system")
    try:
        url, specs = system_specs(settings, queues=list(QUEUES), ui=True, beat=False)
    except StartError as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(1) from None
    sup = make_supervisor(specs, settings, console)
    sup.start()
    try:
        print_processes(console, sup, url, home)
        wait_for_workers(url, list(QUEUES), timeout_s=180)
        user, password = ensure_demo_reviewer(settings)

        console.rule(f"3/4 mining {n} prompts (offline generator and judge)")
        from common.context import make_context

        ctx = make_context(settings)
        result = mine_batch(ctx, n, timeout_s=timeout, chunk=10)
        console.print(summary_table(ctx, result))
        for pid, status in list(result.items()):
            if status is not None and status.value == "failed":
                console.print(f"[red]failed[/] {pid}: {ctx.queue.reason(pid)}")

        console.rule("4/4 analysis")
        report_dir = home / "reports" / ctx.exp.name
        table = top_features_table(settings, report_dir)
        if table is not None:
            console.print(table)
        else:
            console.print("[yellow]no divergent prompt with graphs yet: no feature table[/]")

        ui = f"http://{settings.ui_host}:{settings.ui_port}/"
        login = f"user {user!r}" + (f", password {password!r}" if password else "")
        console.print(
            f"\n[bold]Where to look[/] (took {time.monotonic() - t0:.0f} s)\n"
            f"  review UI      {ui}  ({login}; more: `emc users add NAME`)\n"
            f"  report         {report_dir}/summary.md (+ PNG plots)\n"
            f"  object store   {ctx.store.describe()}\n"
            f"  logs           {home / 'logs'}\n"
            f"  status         `emc status` while `emc up` runs"
        )
        if serve is None:
            serve = sys.stdin.isatty()
        if serve:
            console.print("serving the review UI; Ctrl-C stops everything")
            sup.run()
    finally:
        sup.stop()


def register(app: typer.Typer) -> None:
    """Add ``emc demo`` to the app."""
    app.command("demo")(demo)
