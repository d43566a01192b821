"""The ``emc`` command line: a thin shell over plain functions in each service.

Each service contributes a sub-app from its own ``cli`` module; heavy imports (torch,
circuit-tracer) happen inside commands so ``emc --help`` stays fast.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="emc",
    help="Emergent-misalignment circuits: mine, judge, review, attribute, analyze.",
    no_args_is_help=True,
    add_completion=False,
)

# (module, attribute, name): sub-apps or single commands contributed by the services.
_SUBAPPS: list[tuple[str, str]] = [
    ("common.system_cli", "register"),
    ("common.pipeline_cli", "register"),
    ("common.demo", "register"),
    ("common.organism.cli", "register"),
    ("services.attribution.cli", "register"),
    ("services.attribution.cli_eval", "register"),
    ("services.generator.cli", "register"),
    ("services.judge.cli", "register"),
    ("services.analysis.cli", "register"),
    ("services.review_ui.cli", "register"),
]


def _register_all() -> None:
    for module, attr in _SUBAPPS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:  # that service has no CLI yet
                continue
            raise
        getattr(mod, attr)(app)


_register_all()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
