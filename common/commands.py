"""What every ``emc`` command module shares: the ``--experiment`` option, the context it
names, and the one-line ``error:`` exit."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from common.context import Context

EXPERIMENT_OPTION = typer.Option(
    None, "--experiment", "-e", help="experiment YAML (default: EMC_EXPERIMENT or the organism)"
)


def experiment_context(experiment: Path | None) -> Context:
    """The process context for ``--experiment`` (default: EMC_EXPERIMENT or the organism)."""
    from common.context import make_context
    from common.settings import get_settings

    settings = get_settings()
    if experiment is not None:
        settings = settings.model_copy(update={"experiment": experiment})
    return make_context(settings)


def fail(message: object) -> typer.Exit:
    """Print ``error: <message>`` on stderr; raise the returned exit (status 1)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)
