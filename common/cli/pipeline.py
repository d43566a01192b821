"""`emc mine`, `emc status`, `emc reindex`, `emc retry`, `emc fsck`: the pipeline from the
command line."""

from __future__ import annotations

import math
import re
import time
from collections import Counter

import typer
from rich.console import Console
from rich.table import Table

from common import tasknames as T
from common.commands import fail
from common.context import Context, make_context
from common.records import Status

console = Console()


def _require_workers(ctx: Context) -> None:
    from common.system.broker import BrokerError, ping, redact_url
    from common.system.broker import broker_url as url_of

    url = url_of(ctx.settings)
    try:
        ping(url)
    except BrokerError as e:
        console.print(
            f"[red]no broker at {redact_url(url)} ({e})[/]: start the system with `emc up` "
            "in another terminal (or `make demo`), or set EMC_BROKER_URL"
        )
        raise typer.Exit(1) from None


class GeneratorFailed(RuntimeError):
    """The generator produced no prompt for a batch; the message says why."""


def mine_batch(
    ctx: Context, n: int, *, timeout_s: float, chunk: int, rounds: int = 3
) -> dict[str, Status | None]:
    """Ask the generator service for ``n`` prompts and follow them to a final state.

    Generation is split into tasks of ``chunk`` prompts; when the generator returns fewer
    than asked (rejections, duplicates), up to ``rounds`` more requests are made. Raises
    :class:`GeneratorFailed` when the generator answered with no prompt at all and an error.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from common.batches import batch_error, batch_pids, new_batch_id, statuses
    from common.pipeline import FINAL, Next, send_all

    batch = new_batch_id()
    asked_tasks = 0
    deadline = time.monotonic() + timeout_s
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        gen_bar = progress.add_task("generated", total=n, detail="")
        fin_bar = progress.add_task("final", total=n, detail="")
        for _ in range(rounds):
            pids, answers = batch_pids(ctx, batch)
            missing = n - len(pids)
            if missing <= 0:
                break
            tasks = math.ceil(missing / chunk)
            sizes = [min(chunk, missing - i * chunk) for i in range(tasks)]
            send_all(
                ctx,
                (
                    Next(T.GENERATE_BATCH, {"exp": ctx.exp.name, "n": s, "batch": batch})
                    for s in sizes
                ),
            )
            asked_tasks += tasks
            while answers < asked_tasks and time.monotonic() < deadline:
                pids, answers = batch_pids(ctx, batch)
                progress.update(gen_bar, completed=len(pids))
                time.sleep(0.3)
        pids, _ = batch_pids(ctx, batch)
        error = batch_error(ctx, batch)
        if not pids and error:
            raise GeneratorFailed(f"the generator produced no prompt: {error}")
        pids = pids[:n] if len(pids) > n else pids
        progress.update(gen_bar, completed=len(pids), total=len(pids))
        progress.update(fin_bar, total=len(pids))
        now = statuses(ctx, pids)
        while time.monotonic() < deadline:
            now = statuses(ctx, pids)
            counts = Counter(s.value if s else "queued" for s in now.values())
            final = sum(1 for s in now.values() if s in FINAL)
            detail = " ".join(f"{k}:{v}" for k, v in sorted(counts.items()))
            progress.update(fin_bar, completed=final, detail=detail)
            if final == len(pids):
                break
            time.sleep(0.5)
    return now


def unusable_count(ctx: Context, pids: list[str] | None = None) -> int:
    """Prompts whose judge answer was unusable (every token unsure), from the status index."""
    from common.index import UNUSABLE

    reasons = ctx.queue.reasons()
    return sum(
        1 for pid, r in reasons.items() if r.startswith(UNUSABLE) and (pids is None or pid in pids)
    )


def failure_summary(ctx: Context, failed: list[str]) -> list[tuple[str, int]]:
    """``(reason, prompts)`` of failed prompts, most frequent first (reasons cut to their
    first 100 characters so that the same fault groups together)."""
    counts = Counter((ctx.queue.reason(pid) or "no reason recorded")[:100] for pid in failed)
    return counts.most_common()


def summary_table(ctx: Context, result: dict[str, Status | None]) -> Table:
    """The ``emc mine``/``status`` summary of a batch: prompts per status, then how many wait for
    review, diverge, or got only unusable judge answers."""
    counts = Counter(s.value if s else "not started" for s in result.values())
    in_review = sum(1 for pid in result if ctx.queue.entry(pid) is not None)
    divergent = sum(1 for pid in result if (e := ctx.queue.entry(pid)) and e.divergent)
    table = Table(title=f"batch of {len(result)} prompts — experiment {ctx.exp.name}")
    table.add_column("status")
    table.add_column("prompts", justify="right")
    for status in Status:
        if counts.get(status.value):
            table.add_row(status.value, str(counts[status.value]))
    if counts.get("not started"):
        table.add_row("not started (timeout)", str(counts["not started"]))
    table.add_row("[bold]waiting for review[/]", str(in_review))
    table.add_row("[bold]divergent[/]", str(divergent))
    unusable = unusable_count(ctx, list(result))
    if unusable:
        table.add_row("[bold]judge answer unusable (all unsure)[/]", str(unusable))
    return table


def mine(
    n: int = typer.Option(50, "--n", help="number of prompts to mine"),
    timeout: float = typer.Option(1800, help="seconds to wait for the batch"),
    chunk: int = typer.Option(10, help="prompts per generator task"),
) -> None:
    """Mine a batch of prompts through the running system (`emc up`), with a progress bar.

    Exits 1 when prompts failed or did not finish in time, saying how many and why.
    """
    ctx = make_context()
    _require_workers(ctx)
    try:
        result = mine_batch(ctx, n, timeout_s=timeout, chunk=chunk)
    except GeneratorFailed as e:
        raise fail(f"{e}: see the generate worker's log") from None
    if not result:
        raise fail(
            f"the generator produced no prompt in {timeout:.0f}s: is a generate worker running?"
        )
    console.print(summary_table(ctx, result))
    failed = [pid for pid, s in result.items() if s == Status.failed]
    for reason, count in failure_summary(ctx, failed):
        console.print(f"[red]failed[/] {count} × {reason}", markup=True, highlight=False)
    unfinished = [pid for pid, s in result.items() if s not in FINAL_STATUSES]
    for line in outage_lines(ctx):
        console.print(f"[yellow]{line}[/]", highlight=False)
    problems = []
    if failed:
        problems.append(
            f"{len(failed)} of {len(result)} prompts failed (reasons above; `emc retry` runs "
            "them again)"
        )
    if unfinished:
        problems.append(f"{len(unfinished)} did not finish in {timeout:.0f}s (see `emc status`)")
    if problems:
        raise fail("; ".join(problems))


FINAL_STATUSES = frozenset({Status.done, Status.analyzed, Status.failed})


def status(failures: int = typer.Option(10, help="recent failures to show")) -> None:
    """Counts per status (from the Redis index) and the most recent failures."""
    from common.index import recent_failures

    ctx = make_context()
    _require_workers(ctx)
    table = Table(title=f"experiment {ctx.exp.name} (fingerprint {ctx.fingerprint})")
    table.add_column("status")
    table.add_column("prompts", justify="right")
    for name, count in ctx.queue.counts().items():
        table.add_row(name, str(count))
    table.add_row("[bold]review queue[/]", str(len(ctx.queue)))
    unusable = unusable_count(ctx)
    if unusable:
        table.add_row(
            "[bold]judge answer unusable (all unsure)[/]",
            f"{unusable} (`emc retry --step judge --reason unusable`)",
        )
    console.print(table)
    if ctx.exp.generator.kind == "answers":
        from common.answers import pts_progress

        console.print(
            pts_progress(ctx.store, ctx.exp.name, ctx.fingerprint).line(), highlight=False
        )
    for line in outage_lines(ctx):
        console.print(f"[yellow]{line}[/]", markup=True, highlight=False)
    recent = recent_failures(ctx, failures)
    if recent:
        ft = Table(title="recent failures")
        for col in ("prompt", "step", "variant", "when", "reason"):
            ft.add_column(col, overflow="fold")
        for f in recent:
            ft.add_row(
                f.prompt_id,
                f.step,
                f.variant or "",
                f.created_at.isoformat(timespec="seconds"),
                f.reason,
            )
        console.print(ft)


def outage_lines(ctx: Context) -> list[str]:
    """One line per paused queue: since when its service is down and who waits for it."""
    from common.breaker import outages
    from common.tasknames import QUEUES

    counts = ctx.queue.counts()
    lines = []
    for o in outages(ctx.redis, QUEUES):
        # the judge queue takes prompts with logits; other queues: no per-status count
        waiting = (
            f": {counts.get(Status.logits.value, 0)} prompt(s) wait for it"
            if o.queue == "judge"
            else ""
        )
        probes = f", {o.probes} probe(s) failed" if o.probes else ""
        lines.append(f"queue {o.queue} paused, {o.waiting}{probes}{waiting}")
    return lines


def reindex() -> None:
    """Rebuild the review queue and status index in Redis from the object store."""
    from rich.progress import track

    from common.index import reindex as rebuild_index

    ctx = make_context()
    _require_workers(ctx)
    n = rebuild_index(ctx, progress=lambda pids: track(list(pids), description="reindexing"))
    console.print(f"indexed {n} prompts; review queue holds {len(ctx.queue)}")


def retry(
    pids: list[str] = typer.Argument(None, help="prompt ids (default: every failed prompt)"),
    step: str | None = typer.Option(
        None, "--step", help="only this step: logits, judge, graph[-VARIANT], analysis"
    ),
    reason: str | None = typer.Option(
        None, "--reason", help="only failures whose reason matches this regular expression"
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="say what would be retried"),
) -> None:
    """Run failed prompts again (and unusable judge answers, and stalled prompts given by id):
    corrupt artifacts are deleted, the first missing steps are sent; a failure record goes
    once its step succeeds."""
    from common.redrive import RetryError
    from common.redrive import retry as run_retry

    ctx = make_context()
    _require_workers(ctx)
    try:
        done = run_retry(ctx, step=step, reason=reason, pids=pids or (), send=not dry_run)
    except (RetryError, re.error) as e:
        raise fail(e) from None
    table = Table(title=("would retry" if dry_run else "retried") + f" ({ctx.exp.name})")
    for col in ("prompt", "failed step", "reason", "sent", "deleted"):
        table.add_column(col, overflow="fold")
    for r in done:
        sent = ", ".join(
            f"{n.task}{'/' + str(n.kwargs['variant']) if 'variant' in n.kwargs else ''}"
            for n in r.sent
        )
        table.add_row(
            r.pid,
            ", ".join(r.steps),
            "; ".join(r.reasons)[:200],
            sent or r.note,
            str(len(r.deleted)),
        )
    console.print(table)
    n_sent = sum(1 for r in done if r.sent)
    console.print(
        f"{n_sent} prompt(s) {'would be ' if dry_run else ''}sent again; follow them with `emc status`"
    )
    if pids and not done:
        raise fail(f"nothing to retry among {', '.join(pids)}: not failed, and final")


def fsck() -> None:
    """Walk the experiment's prompts in the store; list corrupt and orphaned artifacts."""
    from rich.progress import track

    from common.fsck import fsck as check_store

    ctx = make_context()
    report = check_store(
        ctx.store, ctx.exp.name, progress=lambda pids: track(list(pids), description="checking")
    )
    if report.problems:
        table = Table(title=f"{len(report.problems)} problem(s) in {ctx.store.describe()}")
        for col in ("key", "problem", "what is wrong and what to do"):
            table.add_column(col, overflow="fold")
        for p in report.problems:
            table.add_row(p.key, p.kind, p.detail)
        console.print(table)
    console.print(f"checked {report.checked} objects of experiment {ctx.exp.name}")
    if report.problems:
        raise fail(
            f"{len(report.problems)} corrupt or orphaned artifact(s) in "
            f"{len(report.bad_prompts)} prompt(s): see above"
        )


def register(app: typer.Typer) -> None:
    """Add ``mine``, ``status``, ``reindex``, ``retry`` and ``fsck`` to the app."""
    app.command("mine")(mine)
    app.command("status")(status)
    app.command("reindex")(reindex)
    app.command("retry")(retry)
    app.command("fsck")(fsck)
