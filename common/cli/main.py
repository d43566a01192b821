"""The ``emc`` command: the one composition root, where the services' commands meet.

Each service contributes commands through its ``cli`` module's ``register(app)``; this is
the only module of ``common`` that imports services (the import contracts in
``pyproject.toml`` check it). Heavy imports (torch, circuit-tracer) happen inside commands,
so ``emc --help`` stays fast.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from services.analysis.cli_eval import TextJudges

app = typer.Typer(
    name="emc",
    help="Emergent-misalignment circuits: mine, judge, review, attribute, analyze. "
    "Add --debug to any command to see the traceback of a failure.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
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
    from common.cli import demo, labels, organism, pipeline, system
    from services.analysis import cli as analysis_cli
    from services.analysis import cli_eval
    from services.attribution import cli as attribution_cli
    from services.review_ui import cli as review_cli

    modules = (system, pipeline, demo, organism, labels, attribution_cli, analysis_cli, review_cli)
    for module in modules:
        module.register(app)
    cli_eval.register(app, text_judges())


_register_all()


def expected_errors() -> tuple[type[BaseException], ...]:
    """Failures the user can act on: printed as one ``error:`` line (traceback: --debug)."""
    from common.errors import PromptFailure, UserError
    from common.store import StoreError
    from common.system.broker import BrokerError

    kinds: list[type[BaseException]] = [UserError, PromptFailure, StoreError, BrokerError]
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

        kinds += [OfflineModeIsEnabled, LocalEntryNotFoundError]
    except ImportError:  # pragma: no cover - a dependency
        pass
    return tuple(kinds)


def main(argv: list[str] | None = None) -> None:
    """``emc``: expected failures print one ``error:`` line and exit 1; ``--debug`` (anywhere
    on the command line) or ``EMC_DEBUG=1`` shows the traceback instead."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("EMC_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    try:
        app(args=args, prog_name="emc")
    except expected_errors() as e:
        if debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message} (run with --debug for the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
