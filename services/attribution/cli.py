"""``emc graph ...``: top-k logits, attribution graphs and viewer export from the command line."""

from __future__ import annotations

from pathlib import Path

import typer

from common.commands import EXPERIMENT_OPTION, experiment_context, fail


def register(app: typer.Typer) -> None:
    """Add the ``emc graph`` command group (``run``, ``export-viewer``) to the app."""
    graph = typer.Typer(
        help="Top-k logits, attribution graphs, viewer export.", no_args_is_help=True
    )
    app.add_typer(graph, name="graph")

    @graph.command("run")
    def run(
        prompt: str = typer.Option(
            ...,
            "--prompt",
            "-p",
            help="prompt text (house format); \\n is a line break, as in "
            '"User: ...\\nAssistant: You should"',
        ),
        variant: list[str] = typer.Option(
            None, "--variant", "-v", help="variant(s) to attribute (default: all)"
        ),
        targets: str = typer.Option(
            "union",
            help="logit nodes: union (every variant's top-k, the pipeline's), topk (this "
            "variant's), salient (experiment limits)",
        ),
        experiment: Path | None = EXPERIMENT_OPTION,
    ) -> None:
        """Compute top-k logits and the attribution graph of a prompt; write both to the store."""
        from rich.console import Console
        from rich.table import Table

        from common.errors import PromptFailure
        from common.prompt_check import InvalidPrompt, check_prompt, from_command_line
        from services.attribution.runtime import get_runtime
        from services.attribution.steps import (
            compute_graph,
            compute_logits,
            ensure_prompt,
            validate_prompt,
        )

        if targets not in ("salient", "topk", "union"):
            raise fail(f"--targets must be union, topk or salient, not {targets!r}")
        ctx = experiment_context(experiment)
        variants = variant or ctx.exp.variant_names
        unknown = [v for v in variants if v not in ctx.exp.variants]
        if unknown:
            raise fail(KeyError(f"unknown variant(s) {unknown}; have {ctx.exp.variant_names}"))
        text = from_command_line(prompt)
        try:  # cheap checks before the models load, then the token count; nothing stored yet
            check_prompt(text, max_tokens=ctx.exp.attribution.max_prompt_tokens)
            rt = get_runtime(ctx.exp, ctx.fingerprint)
            validate_prompt(rt, text, ctx.exp.attribution.max_prompt_tokens)
        except InvalidPrompt as e:
            raise fail(e) from None
        p = ensure_prompt(ctx.store, ctx.exp.name, text, source="cli")
        console = Console()
        try:
            for topk in compute_logits(rt, ctx.store, p, variants):
                table = Table("token", "id", "p", title=f"{p.id} {topk.variant}: top-k")
                for t in topk.tokens:
                    table.add_row(repr(t.token), str(t.token_id), f"{t.prob:.4f}")
                console.print(table)
            for v in variants:
                m = compute_graph(rt, ctx.store, p, v, targets=targets)  # type: ignore[arg-type]
                console.print(
                    f"graph {p.id} {v}: {m.n_features} features, {m.n_logits} logits, "
                    f"{m.elapsed_s:.1f}s, edges kept {m.limits['edges_feature_kept']}/"
                    f"{m.limits['edges_feature_nonzero']}"
                )
        except PromptFailure as e:
            raise fail(e) from None
        console.print(
            f"prompt id {p.id}, fingerprint {ctx.fingerprint}, store {ctx.store.describe()}"
        )

    @graph.command("export-viewer")
    def export_viewer(
        pid: str = typer.Argument(..., help="prompt id"),
        variant: str = typer.Argument(..., help="variant"),
        out: Path = typer.Option(..., "--out", "-o", help="output directory"),
        node_threshold: float = typer.Option(0.8, help="viewer node pruning threshold"),
        edge_threshold: float = typer.Option(0.98, help="viewer edge pruning threshold"),
        experiment: Path | None = EXPERIMENT_OPTION,
    ) -> None:
        """Write a stored graph as circuit-tracer viewer JSON into OUT (works offline)."""
        from common.store import NotFound
        from services.attribution.viewer import export_stored

        ctx = experiment_context(experiment)
        try:
            path = export_stored(
                ctx.store,
                ctx.exp,
                pid,
                variant,
                out,
                fingerprint=ctx.fingerprint,
                node_threshold=node_threshold,
                edge_threshold=edge_threshold,
            )
        except (NotFound, KeyError) as e:
            raise fail(
                ValueError(f"no graph for {pid}/{variant} under {ctx.fingerprint}: {e}")
            ) from None
        typer.echo(f"wrote {path} and {path.parent / 'graph-metadata.json'}")
