"""``emc labels export``: human labels with their provenance, as JSON lines or CSV."""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path

import typer

from common.commands import EXPERIMENT_OPTION, fail


class Format(StrEnum):
    """Export formats of ``emc labels export``."""

    jsonl = "jsonl"
    csv = "csv"


def register(app: typer.Typer) -> None:
    """Add the ``emc labels`` commands to ``app``."""
    labels = typer.Typer(help="Human labels of the review UI.", no_args_is_help=True)
    app.add_typer(labels, name="labels")

    @labels.command("export")
    def export(
        fmt: Format = typer.Option(Format.jsonl, "--format", "-f", help="jsonl or csv"),
        out: Path | None = typer.Option(
            None, "--out", "-o", help="file to write (default: standard output)"
        ),
        current_only: bool = typer.Option(
            False, "--current-only", help="only each prompt's current label, not the history"
        ),
        experiment: Path | None = EXPERIMENT_OPTION,
    ) -> None:
        """Write every label (reviewer, time, guide version, adjudicated or not) per token."""
        from common.context import experiment_path
        from common.experiment import load_experiment
        from common.label_export import export_rows, write_export
        from common.settings import get_settings
        from common.store import open_store

        settings = get_settings()
        if experiment is not None:
            settings = settings.model_copy(update={"experiment": experiment})
        exp = load_experiment(experiment_path(settings))
        rows = export_rows(open_store(settings), exp.name, current_only=current_only)
        if out is None:
            n = write_export(rows, fmt.value, sys.stdout)
        else:
            try:
                with out.open("w", encoding="utf-8", newline="") as f:
                    n = write_export(rows, fmt.value, f)
            except OSError as e:
                raise fail(f"cannot write {out}: {e}") from None
        typer.echo(f"{n} label row(s) of experiment {exp.name} exported", err=True)
