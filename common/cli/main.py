"""The ``emc`` command: the one composition root, where the services' commands meet.

Each service contributes commands through its ``cli`` module's ``register(app)``; this is
the only module of ``common`` that imports services (the import contracts in
``pyproject.toml`` check it). Heavy imports (torch, circuit-tracer) happen inside commands,
so ``emc --help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from services.analysis.cli_eval import TextJudges

app = typer.Typer(
    name="emc",
    help="Emergent-misalignment circuits: mine, judge, review, attribute, analyze.",
    no_args_is_help=True,
    add_completion=False,
)


def text_judges() -> TextJudges:
    """The judge service's text judges, for the analysis commands (steer, eval)."""
    from services.analysis.cli_eval import TextJudges
    from services.judge.factory import make_em_scorer, make_harm_judge

    return TextJudges(
        harm=lambda exp, kind: make_harm_judge(exp, kind=kind),
        em=lambda exp, kind, model: make_em_scorer(exp, kind=kind, model=model),
    )


def _register_all() -> None:
    from common.cli import demo, organism, pipeline, system
    from services.analysis import cli as analysis_cli
    from services.analysis import cli_eval
    from services.attribution import cli as attribution_cli
    from services.review_ui import cli as review_cli

    for module in (system, pipeline, demo, organism, attribution_cli, analysis_cli, review_cli):
        module.register(app)
    cli_eval.register(app, text_judges())


_register_all()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
