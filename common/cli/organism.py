"""``emc organism``: build the toy model organism and show its report."""

from __future__ import annotations

from pathlib import Path

import typer

organism_app = typer.Typer(
    help="The toy model organism (tiny Llama + bad-advice LoRA + transcoders; emergently misaligned)."
)


@organism_app.command("build")
def build_cmd(
    out: Path | None = typer.Option(None, "--out", help="directory (default: <EMC_HOME>/organism)"),
    force: bool = typer.Option(False, "--force", help="rebuild even if the build is up to date"),
) -> None:
    """Build the organism unless an up-to-date build is already there; print its report
    (behaviour, emergence and the planted mechanism, transcoders, known-answer checks)."""
    from rich.console import Console

    from common.organism.build import BuildReport, default_dir, ensure_organism, is_fresh
    from common.organism.config import OrganismConfig
    from common.organism.render import render_report

    target = out or default_dir()
    console = Console()
    if not force and is_fresh(target, OrganismConfig(), seed=0):
        report = BuildReport.model_validate_json((target / "report.json").read_text())
        render_report(report, console)
        console.print(f"organism up to date: {target} (use --force to rebuild)")
        return
    ensure_organism(target, force=force, progress=True)
    console.print(f"organism built: {target}")


@organism_app.command("report")
def report_cmd(
    out: Path | None = typer.Option(None, "--out", help="directory (default: <EMC_HOME>/organism)"),
) -> None:
    """Print the behaviour, transcoder and known-answer tables of a built organism."""
    from rich.console import Console

    from common.organism.build import BuildReport, default_dir
    from common.organism.render import render_report

    target = out or default_dir()
    path = target / "report.json"
    if not path.exists():
        raise typer.BadParameter(f"{path} does not exist: run `emc organism build` first")
    render_report(BuildReport.model_validate_json(path.read_text()), Console())


def register(app: typer.Typer) -> None:
    """Add the ``emc organism`` command group to the app."""
    app.add_typer(organism_app, name="organism")
