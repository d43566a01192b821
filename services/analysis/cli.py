"""``emc analyze ...``: feature rankings of one prompt, and the cross-prompt report."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from common.commands import fail
from common.diff import PromptDiff, prompt_diff
from common.records import ScoreShares, feature_cell, node_label


def shares_table(shares: ScoreShares, title: str) -> Table:
    """The score's split per layer (features, errors, adapter), tokens and the flag."""
    table = Table("layer", "features", "errors", "adapter", title=title)
    for row in shares.layers:
        table.add_row(
            str(row.layer),
            f"{row.features:+.0%}",
            f"{row.errors:+.0%}",
            f"{row.adapter:+.0%}" if row.adapter else "",
        )
    table.add_row("tokens", "", "", "", end_section=True)
    table.add_row(
        "total",
        f"top feature {shares.top_feature:+.1%}",
        f"{shares.errors:+.0%} (tokens {shares.tokens:+.0%})",
        f"{shares.adapter:+.0%}" if shares.adapter else "",
    )
    if shares.flag:
        table.caption = f"[yellow]{shares.flag}[/]"
    return table


def diff_table(diff: PromptDiff) -> Table:
    """The base-vs-adapted diff ranking of one prompt."""
    table = Table(
        "node",
        diff.reference,
        diff.variant,
        "change",
        title=f"{diff.prompt_id}: what changed from {diff.reference} to {diff.variant} "
        f"(same targets; score total {diff.total_reference:+.3f} -> {diff.total_variant:+.3f})",
    )
    for n in diff.nodes:
        table.add_row(n.label, f"{n.reference:+.4f}", f"{n.variant:+.4f}", f"{n.change:+.4f}")
    return table


def register(app: typer.Typer) -> None:
    """Add the ``emc analyze`` command group (``prompt``, ``report``) to the app."""
    analyze = typer.Typer(
        help="Which transcoder features drive the evil tokens (rankings, aggregates, plots).",
        no_args_is_help=True,
    )
    app.add_typer(analyze, name="analyze")

    @analyze.command("prompt")
    def prompt(
        pid: str = typer.Argument(..., help="prompt id (12 hex chars)"),
        variant: list[str] = typer.Option(
            [], "--variant", "-v", help="variant(s) to rank (default: all)"
        ),
        top: int = typer.Option(15, "--top", help="rows to show per variant"),
    ) -> None:
        """Rank the features of one prompt (stored at keys.features; cached by labels)."""
        from rich.console import Console

        from common.context import get_context
        from services.analysis.report import prompt_rankings

        ctx = get_context()
        console = Console()
        done, failed = prompt_rankings(
            ctx.store, ctx.exp, pid, variants=variant or None, fingerprint=ctx.fingerprint
        )
        for v, r in done.items():
            table = Table(
                "#",
                "L",
                "pos",
                "token",
                "feat",
                "score",
                "evil",
                "safe",
                "act",
                title=f"{pid} / {v}: {r.label_source} labels {r.labels_version}, evil "
                f"{r.evil_token_ids}, safe {r.safe_token_ids}; score = d(P_evil - P_safe)",
            )
            for i, f in enumerate(r.features[:top], 1):
                table.add_row(
                    str(i),
                    str(f.layer),
                    str(f.pos),
                    repr(f.token.strip())[:12],
                    feature_cell(f.feature),
                    f"{f.score:+.4f}",
                    f"{f.evil:+.3f}",
                    f"{f.safe:+.3f}",
                    f"{f.activation:.2f}",
                )
            console.print(table)
            if r.shares is not None:
                console.print(shares_table(r.shares, f"{pid} / {v}: where the score goes"))
        ref = ctx.exp.reference
        for v in (x for x in done if x != ref and ref in done):
            console.print(diff_table(prompt_diff(done[ref], done[v], top=top)))
        for v, reason in failed.items():
            console.print(f"[red]{pid} / {v}: not ranked:[/red] {reason}")
        if failed and not done:
            raise typer.Exit(1)

    _register_direction(analyze)
    _register_features(app)

    @analyze.command("report")
    def report(
        out: Path | None = typer.Option(
            None,
            "--out",
            help="directory for JSON, PNG and summary.md (default: <home>/reports/<exp>/<fp>)",
        ),
        top: int = typer.Option(20, "--top", help="features in the tables and bar charts"),
        full: bool = typer.Option(
            False, "--full", help="rebuild from every prompt (default: fold in only new ones)"
        ),
    ) -> None:
        """Rank every graphed prompt, aggregate the divergent ones, write plots and a summary.

        Incremental: the running aggregates are stored with the report, and a re-run folds in
        only prompts that are new since (all of them when a folded prompt changed)."""
        from rich.console import Console

        from common.context import get_context
        from services.analysis.report import build_report

        ctx = get_context()
        console = Console()
        out_dir = out or ctx.settings.home / "reports" / ctx.exp.name / ctx.fingerprint
        with console.status("building report") as status:
            data = build_report(
                ctx.store,
                ctx.exp,
                out_dir,
                fingerprint=ctx.fingerprint,
                top_n=top,
                progress=lambda msg: status.update(msg),
                full=full,
            )
        ix = data.index
        how = "added to the stored aggregates" if data.incremental else "aggregated afresh"
        console.print(f"{len(data.folded)} prompt(s) {how}")
        nothing = sum(i.kind == "nothing_to_explain" for i in ix.issues)
        console.print(
            f"{ix.n_prompts_with_graphs} prompts with graphs, "
            f"{len(ix.divergent_prompt_ids)} divergent; not ranked: {nothing} with nothing to "
            f"explain, {len(ix.issues) - nothing} failed (see summary.md)"
        )
        failed = [i for i in ix.issues if i.kind == "failed"]
        for i in failed[:20]:
            console.print(f"[red]skipped[/] {i.prompt_id} / {i.variant}: {i.reason}", markup=True)
        if len(failed) > 20:
            console.print(f"... and {len(failed) - 20} more (index.json)")
        for v, agg in data.aggregates.items():
            head = ", ".join(
                f"{node_label(f.layer, f.feature)} {f.mean_score:+.3f}" for f in agg.features[:5]
            )
            console.print(f"{v}: top features {head or '(none)'}")
            if agg.shares is not None and agg.shares.shares.flag:
                console.print(f"[yellow]{v}: {agg.shares.shares.flag}[/]")
        console.print(f"wrote {len(ix.files)} files to {out_dir} (and the store)")


def _register_direction(analyze: typer.Typer) -> None:
    """Add ``emc analyze direction`` (it loads the models, unlike the other commands)."""

    @analyze.command("direction")
    def direction(
        pid: str = typer.Argument(..., help="prompt id (12 hex chars)"),
        variant: str = typer.Option("", "--variant", "-v", help="variant (default: adapted)"),
        top: int = typer.Option(15, "--top", help="features to show"),
    ) -> None:
        """Attribute one prompt on the single target P_evil - P_safe (circuit-tracer's custom
        target; needs the models): the features kept are those that matter for that score."""
        from rich.console import Console

        from common.context import get_context
        from services.analysis.direction import explain_prompt
        from services.attribution.runtime import get_runtime

        ctx = get_context()
        v = variant or next(x for x in ctx.exp.variant_names if x != ctx.exp.reference)
        rt = get_runtime(ctx.exp, ctx.fingerprint, cache_dir=ctx.settings.cache_dir)
        ex = explain_prompt(rt, ctx.store, pid, v, top=top)
        console = Console()
        table = Table(
            "#",
            "L",
            "pos",
            "feat",
            "score",
            title=f"{pid} / {v} on P(evil)-P(safe): {ex.n_features} feature nodes; the graph "
            f"explains {ex.total:+.4f} (token graph: {ex.token_graph_total:+.4f}); "
            f"{ex.top_overlap}/{top} of the token graph's top features are here",
        )
        for i, (layer, pos, feat, score) in enumerate(ex.features, 1):
            table.add_row(str(i), str(layer), str(pos), feature_cell(feat), f"{score:+.4f}")
        console.print(table)
        console.print(shares_table(ex.shares, f"{pid} / {v}: where P(evil)-P(safe) goes"))


def _register_features(app: typer.Typer) -> None:
    """Add ``emc features`` (the feature index, pages' evidence, the misalignment direction)."""
    features = typer.Typer(
        help="What ranked features mean: the feature index, output effects, the "
        "misalignment direction.",
        no_args_is_help=True,
    )
    app.add_typer(features, name="features")

    @features.command("reindex")
    def reindex_features() -> None:
        """Rebuild the feature index in Redis from the prompts' stored shards."""
        from rich.progress import track

        from common.context import get_context
        from common.feature_index import FeatureIndex, rebuild
        from common.index import prompt_ids

        ctx = get_context()
        index = FeatureIndex(ctx.redis, ctx.exp.name, ctx.fingerprint)
        pids = list(prompt_ids(ctx))
        n = rebuild(
            ctx.store,
            index,
            ctx.exp.name,
            ctx.fingerprint,
            pids,
            progress=lambda it: track(it, total=len(pids), description="indexing"),
        )
        typer.echo(f"indexed the features of {n} of {len(pids)} prompts")

    @features.command("build")
    def build(
        variant: str = typer.Option("", "--variant", "-v", help="variant (default: adapted)"),
        max_prompts: int = typer.Option(200, help="divergent prompts for the direction"),
    ) -> None:
        """Compute the misalignment direction over divergent prompts, check it by ablation
        against a random direction, and store every indexed feature's output effects and
        cosine with it (needs the models)."""
        from rich.console import Console

        from common.context import get_context
        from common.feature_index import FeatureIndex
        from common.index import prompt_ids
        from services.analysis.features import build_features, divergent_prompts
        from services.attribution.runtime import get_runtime

        ctx = get_context()
        console = Console()
        v = variant or next(x for x in ctx.exp.variant_names if x != ctx.exp.reference)
        prompts = divergent_prompts(
            ctx.store, ctx.exp.name, ctx.fingerprint, prompt_ids(ctx), v, max_prompts
        )
        if not prompts:
            raise fail(f"no ranked prompt of {v} with an evil token yet: mine and analyze first")
        rt = get_runtime(ctx.exp, ctx.fingerprint, cache_dir=ctx.settings.cache_dir)
        index = FeatureIndex(ctx.redis, ctx.exp.name, ctx.fingerprint)
        with console.status("building") as status:
            record = build_features(
                rt, ctx.store, index, prompts, variant=v, progress=lambda m: status.update(m)
            )
        table = Table("layer", "|direction|", "harm removed: direction", "random (same norm)")
        for row, norm in zip(record.ablation["layers"], record.norms, strict=True):
            table.add_row(
                str(row["layer"]),
                f"{norm:.3f}",
                f"{row['removed_direction']:+.1%}",
                f"{row['removed_random']:+.1%}",
            )
        console.print(table)

    @features.command("explain")
    def explain(
        model: str = typer.Option(..., "--model", help="model name on EMC_OPENAI_BASE_URL"),
        variant: str = typer.Option("", "--variant", "-v", help="variant (default: adapted)"),
        top: int = typer.Option(50, "--top", help="features of the report's aggregate ranking"),
    ) -> None:
        """One-line explanations of the top aggregate features from their contexts and
        output tokens, by an OpenAI-compatible model (optional; stored with the model and
        the prompt used). Needs ``emc features build`` and ``emc analyze report`` first."""
        from common.context import get_context
        from common.feature_index import FeatureIndex
        from common.llm import LLMClient
        from common.store import NotFound
        from common.store import keys as K
        from services.analysis.features import explain_features
        from services.analysis.records import FeatureAggregate

        ctx = get_context()
        v = variant or next(x for x in ctx.exp.variant_names if x != ctx.exp.reference)
        try:
            agg = ctx.store.get_record(
                K.report_aggregate(ctx.exp.name, ctx.fingerprint, v), FeatureAggregate
            )
        except NotFound:
            raise fail(f"no aggregate ranking of {v} yet: run `emc analyze report`") from None
        feats = [(f.layer, f.feature) for f in agg.features[:top] if f.feature >= 0]
        index = FeatureIndex(ctx.redis, ctx.exp.name, ctx.fingerprint)
        client = LLMClient.from_settings(model, ctx.settings)
        n = explain_features(client, ctx.store, index, ctx.exp.name, ctx.fingerprint, v, feats)
        typer.echo(f"explained {n} of {len(feats)} features with {client.describe()}")
