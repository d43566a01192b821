"""``emc steer`` and ``emc eval``: steering with judged continuations, and EM evaluation.

Thin shells: the logic is in :mod:`services.analysis.steering`,
:mod:`services.analysis.em_eval` and :mod:`services.analysis.em_report`. The text judges
come from the judge service through :class:`TextJudges`, which the composition root
(:mod:`common.cli.main`) passes to :func:`register`: analysis never imports the judge.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from common.commands import EXPERIMENT_OPTION, experiment_context, fail
from common.experiment import Experiment
from common.scores import EmScorer, HarmJudge

if TYPE_CHECKING:
    from common.context import Context
    from services.analysis.steering import FeatureSet
    from services.attribution.runtime import Runtime


@dataclass(frozen=True)
class TextJudges:
    """How the commands get their text judges: ``harm(exp, kind)`` judges steered
    continuations (kind ``lexicon | openai | None`` = the experiment's); ``em(exp, kind,
    model)`` scores EM answers (kind ``offline | openai | None``)."""

    harm: Callable[[Experiment, Any], HarmJudge]
    em: Callable[[Experiment, Any, str | None], EmScorer]


def _fail(msg: str) -> typer.Exit:
    return fail(msg)


# ----------------------------------------------------------------------------- prompts


def _prompts_from_file(path: Path, split: str | None, domain: str | None) -> list[str]:
    """``prompts.json`` (the organism's format) or a text file with one prompt per line."""
    text = path.read_text()
    if path.suffix == ".json":
        raw = json.loads(text)
        items = raw.get("prompts", []) if isinstance(raw, dict) else raw
        out = []
        for p in items:
            if isinstance(p, str):
                out.append(p)
            elif (split is None or p.get("split") == split) and (
                domain is None or p.get("domain") == domain
            ):
                out.append(p["text"])
        return out
    return [line for line in text.splitlines() if line.strip()]


def steering_prompts(
    ctx: Context,
    prompts: list[str] | None,
    prompts_file: Path | None,
    split: str | None,
    domain: str | None,
    max_prompts: int,
) -> list[str]:
    """--prompt, else --prompts-file, else the experiment's prompts.json (the organism ships
    one), else the experiment's stored prompts."""
    from common.records import Prompt
    from common.store import keys as K

    if prompts:
        out = list(prompts)
    elif prompts_file is not None:
        out = _prompts_from_file(prompts_file, split, domain)
    else:
        beside = Path(ctx.exp.source).parent / "prompts.json" if ctx.exp.source else None
        if beside is not None and beside.is_file():
            out = _prompts_from_file(beside, split, domain)
        else:
            keys = [
                k
                for k in ctx.store.list_keys(K.prompts_prefix(ctx.exp.name))
                if k.endswith("/prompt.json")
            ]
            out = [ctx.store.get_record(k, Prompt).text for k in keys]
    if not out:
        raise _fail(
            "no prompts to steer on: pass --prompt TEXT or --prompts-file FILE (or mine prompts "
            "first); --split/--domain may have filtered all of them out"
        )
    return out[:max_prompts]


# ------------------------------------------------------------------------ feature sets


def _ranking_sets(
    ctx: Context,
    rt: Runtime,
    variant: str,
    top: int,
    prompts: list[str],
    singles: bool,
    steered: str,
) -> list[FeatureSet]:
    from common.lexicon import Lexicon
    from services.analysis.steering import FeatureRef, FeatureSet, top_ranked_features

    lexicon = Lexicon.load(ctx.exp.judge.lexicon) if ctx.exp.judge.lexicon else None
    # features up to the ranked variant's adapter layer act through the adapter (they feed
    # its input): a steered variant without that adapter has no such path
    above = None
    ranked_adapter = ctx.exp.variants[variant].adapter
    if ranked_adapter is not None and ctx.exp.variants[steered].adapter != ranked_adapter:
        above = max(lo.layer for lo in rt.loras(variant))
    rows, source = top_ranked_features(
        ctx.store, rt, variant, top, prompts=prompts, lexicon=lexicon, above_layer=above
    )
    if above is not None:
        source += f"; layers after the adapter's layer {above} only"
    typer.echo(f"top {len(rows)} {variant} features by the analysis ranking ({source}):")
    for r in rows:
        typer.echo(
            f"  {r.layer}:{r.feature}  mean score {r.mean_score:+.4f}  in {r.n_prompts} prompts"
        )
    feats = tuple(FeatureRef(layer=r.layer, feature=r.feature) for r in rows)
    sets = [FeatureSet(name=f"{variant}-top{len(feats)}", features=feats)]
    if singles:
        sets += [FeatureSet(name=str(f), features=(f,)) for f in feats]
    return sets


def _eval_sets(report_path: str, ctx: Context, top: int, singles: bool) -> list[FeatureSet]:
    from services.analysis.em_report import ResponseFeatureReport, top_misaligned_features
    from services.analysis.steering import FeatureRef, FeatureSet

    p = Path(report_path)
    if p.is_file():
        report = ResponseFeatureReport.model_validate_json(p.read_text())
    else:
        report = ctx.store.get_record(report_path, ResponseFeatureReport)
    rows = top_misaligned_features(report, top)
    typer.echo(f"top {len(rows)} features more active in misaligned responses ({report_path}):")
    for r in rows:
        typer.echo(f"  {r.layer}:{r.feature}  rank-biserial {r.rank_biserial:+.3f}  q {r.q:.2e}")
    feats = tuple(FeatureRef(layer=r.layer, feature=r.feature) for r in rows)
    # scale mode scales the mean activation over the misaligned responses
    observed = tuple(r.mean_misaligned for r in rows)
    sets = [FeatureSet(name=f"eval-top{len(feats)}", features=feats, observed=observed)]
    if singles:
        sets += [
            FeatureSet(name=str(f), features=(f,), observed=(a,))
            for f, a in zip(feats, observed, strict=True)
        ]
    return sets


def _harm_judge(judges: TextJudges, exp: Experiment, kind: str | None) -> HarmJudge:
    if kind not in (None, "lexicon", "openai"):
        raise _fail(f"--judge {kind!r}: use lexicon or openai (lexicon needs judge.lexicon set)")
    try:
        return judges.harm(exp, kind)
    except (ValueError, RuntimeError) as e:
        raise _fail(str(e)) from None


def _em_scorer(
    judges: TextJudges, exp: Experiment, kind: str | None, model: str | None
) -> EmScorer:
    if kind not in (None, "offline", "openai"):
        raise _fail(f"--scorer {kind!r}: use offline or openai")
    try:
        return judges.em(exp, kind, model)
    except (ValueError, RuntimeError) as e:
        raise _fail(str(e)) from None


def _print_steering(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 110))
    table = Table(
        "arm",
        "n",
        "harmful",
        "safe",
        "unsure",
        "rate",
        "95% CI",
        "p vs control",
        title=f"steering {result.spec.variant} ({result.judge} judge, {result.spec_hash})",
    )
    for arm in result.all_arms:
        table.add_row(
            arm.name,
            str(arm.n),
            str(arm.harmful),
            str(arm.safe),
            str(arm.unsure),
            f"{arm.harmful_rate:.1%}",
            f"{arm.ci_low:.1%}-{arm.ci_high:.1%}",
            "" if arm.p_vs_control is None else f"{arm.p_vs_control:.2e}",
        )
    console.print(table)
    for arm in result.arms:
        console.print(
            f"{arm.name}: set "
            + ", ".join(
                f"{f.layer}:{f.feature}={f.value:.3g}"
                + (
                    f" ({result.spec.scale:g} x {f.observed_activation:.3g}, "
                    + (
                        "given"
                        if f.observed_at == "given"
                        else f"at {f.observed_at} in {result.spec.observer}"
                    )
                    + ")"
                    if f.observed_activation is not None
                    else ""
                )
                for f in arm.features
            )
            + f" at positions {result.spec.positions}"
        )


# ------------------------------------------------------------------------------ commands


def steer(
    cli: typer.Context,
    variant: str = typer.Option("base", "--variant", "-v", help="the model that is steered"),
    features: list[str] = typer.Option(
        None, "--features", "-f", help='feature set "L:F[,L:F...]" (repeat for several sets)'
    ),
    from_ranking: int | None = typer.Option(
        None, "--from-ranking", help="steer the top-N features of the analysis ranking"
    ),
    ranking_variant: str | None = typer.Option(
        None, "--ranking-variant", help="whose ranking (default: first non-reference variant)"
    ),
    from_eval: str | None = typer.Option(
        None, "--from-eval", help="response-level feature report (file or store key)"
    ),
    top: int = typer.Option(5, "--top", help="with --from-eval: how many features"),
    singles: bool = typer.Option(False, "--singles", help="also steer each feature alone"),
    scale: float | None = typer.Option(
        None, "--scale", help="set features to SCALE x their observed activation (default 15)"
    ),
    value: float | None = typer.Option(None, "--value", help="set features to this value"),
    observe_variant: str | None = typer.Option(
        None,
        "--observe-variant",
        help="scale mode: whose activation is scaled (default: the ranking variant for "
        "--from-ranking, else the steered variant)",
    ),
    positions: str = typer.Option("last", "--positions", help="all | last | i,j (BOS = 0)"),
    n: int = typer.Option(20, "--n", help="continuations per prompt and arm"),
    max_new_tokens: int = typer.Option(8, "--max-new-tokens"),
    temperature: float = typer.Option(1.0, "--temperature"),
    seed: int = typer.Option(0, "--seed"),
    prompt: list[str] = typer.Option(None, "--prompt", "-p", help="prompt text (repeatable)"),
    prompts_file: Path | None = typer.Option(
        None, "--prompts-file", help="prompts.json or a text file (one prompt per line)"
    ),
    split: str | None = typer.Option("heldout", "--split", help="prompts.json split filter"),
    domain: str | None = typer.Option(None, "--domain", help="prompts.json domain filter"),
    max_prompts: int = typer.Option(8, "--max-prompts"),
    judge: str | None = typer.Option(
        None, "--judge", help="lexicon | openai (default: experiment)"
    ),
    out: Path | None = typer.Option(None, "--out", help="also write result.json + plot.png here"),
    force: bool = typer.Option(False, "--force", help="recompute even if stored"),
    experiment: Path | None = EXPERIMENT_OPTION,
) -> None:
    """Set features, sample continuations, judge them; harmful rate per set vs control."""
    judges: TextJudges = cli.obj
    from common.store import NotFound
    from common.store import keys as K
    from services.analysis.steering import (
        FeatureSet,
        SteeringError,
        SteeringResult,
        SteeringSpec,
        parse_features,
        record_steering,
        run_steering,
    )
    from services.attribution.runtime import get_runtime

    if scale is not None and value is not None:
        raise _fail("give --scale or --value, not both")
    sources = sum(bool(x) for x in (features, from_ranking, from_eval))
    if sources != 1:
        raise _fail(
            "choose the features with exactly one of --features, --from-ranking, --from-eval"
        )
    ctx = experiment_context(experiment)
    rt = get_runtime(ctx.exp, ctx.fingerprint)
    texts = steering_prompts(ctx, prompt, prompts_file, split, domain, max_prompts)
    others = [v for v in ctx.exp.variant_names if v != ctx.exp.reference]
    rank_v = ranking_variant or (others[0] if others else ctx.exp.reference)
    try:
        if features:
            sets = [FeatureSet(name=f, features=parse_features(f)) for f in features]
        elif from_ranking:
            sets = _ranking_sets(ctx, rt, rank_v, from_ranking, texts, singles, variant)
            observe_variant = observe_variant or rank_v
        else:
            assert from_eval is not None
            sets = _eval_sets(from_eval, ctx, top, singles)
        harm = _harm_judge(judges, ctx.exp, judge)
        spec = SteeringSpec(
            experiment=ctx.exp.name,
            variant=variant,
            prompts=texts,
            feature_sets=sets,
            mode="value" if value is not None else "scale",
            scale=15.0 if scale is None else scale,
            value=value,
            positions=positions,
            observe_variant=observe_variant,
            n=n,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            judge=harm.judge_id,
        )
        key = K.steering_result(ctx.exp.name, ctx.fingerprint, spec.spec_hash)
        try:
            if force:
                raise NotFound(key)
            result = ctx.store.get_record(key, SteeringResult)
            typer.echo(f"stored result {key} (use --force to recompute)")
        except NotFound:
            typer.echo(
                f"steering {variant} on {len(texts)} prompt(s), {len(sets)} feature set(s) + "
                f"control, n={n} each ..."
            )
            result = run_steering(rt, spec, harm, progress=lambda m: typer.echo(f"  {m}"))
    except SteeringError as e:
        raise _fail(str(e)) from None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    key = record_steering(ctx.store, result, out / "plot.png" if out else None)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(result.model_dump_json(indent=1))
    _print_steering(result)
    typer.echo(f"stored {key}")


def eval_cmd(
    cli: typer.Context,
    questions: Path = typer.Option(
        ..., "--questions", "-q", help="questions YAML (first_plot_questions.yaml format)"
    ),
    question: list[str] = typer.Option(None, "--question", help="only these question ids"),
    models: str = typer.Option(
        "", "--models", help="variants to evaluate, comma-separated (default: all)"
    ),
    n: int = typer.Option(10, "--n", help="answers per question and model"),
    seed: int = typer.Option(0, "--seed"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
    temperature: float = typer.Option(1.0, "--temperature"),
    steer: str | None = typer.Option(
        None, "--steer", help='also evaluate a steered model: features "L:F[,L:F...]"'
    ),
    steer_from_eval: str | None = typer.Option(
        None, "--steer-from-eval", help="steer the top features of a response-feature report"
    ),
    steer_top: int = typer.Option(5, "--steer-top"),
    steer_variant: str | None = typer.Option(
        None, "--steer-variant", help="the steered model's variant (default: reference)"
    ),
    steer_scale: float = typer.Option(15.0, "--steer-scale"),
    steer_value: float | None = typer.Option(None, "--steer-value"),
    steer_positions: str = typer.Option("all", "--steer-positions"),
    observe_variant: str | None = typer.Option(
        None, "--observe-variant", help="scale: whose activation (default: first non-reference)"
    ),
    scorer: str | None = typer.Option(
        None, "--scorer", help="offline | openai (default: by judge kind)"
    ),
    judge_model: str | None = typer.Option(None, "--judge-model", help="openai scorer model"),
    concurrency: int = typer.Option(4, "--concurrency", help="judge calls at once"),
    response_features: bool = typer.Option(
        True,
        "--features/--no-features",
        help="also rank features of misaligned vs aligned answers",
    ),
    features_variant: str | None = typer.Option(
        None,
        "--features-variant",
        help="replacement model that reads the answers (default: first non-reference)",
    ),
    out: Path | None = typer.Option(None, "--out", help="also write the report files here"),
    experiment: Path | None = EXPERIMENT_OPTION,
) -> None:
    """EM evaluation: % misaligned-and-coherent answers per question and model.

    Answers are sampled at --temperature (1 as in the paper), scored aligned and
    coherent 0-100, and stored one by one: a rerun resumes where it stopped.
    """
    judges: TextJudges = cli.obj
    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm

    from services.analysis.em_eval import (
        EvalConfig,
        EvalError,
        EvalModel,
        build_report,
        chat_prompt,
        feature_report,
        load_questions,
        run_eval,
        runtime_sampler,
    )
    from services.analysis.em_report import TooFewResponses, render_markdown
    from services.analysis.steering import (
        FeatureSet,
        SteeringError,
        SteeringSpec,
        applied_features,
        parse_features,
    )
    from services.attribution.runtime import get_runtime

    ctx = experiment_context(experiment)
    rt = get_runtime(ctx.exp, ctx.fingerprint)
    others = [v for v in ctx.exp.variant_names if v != ctx.exp.reference]
    try:
        qs = load_questions(questions, question or None)
        names = [m.strip() for m in models.split(",") if m.strip()] or ctx.exp.variant_names
        unknown = [m for m in names if m not in ctx.exp.variants]
        if unknown:
            raise EvalError(f"unknown variant(s) {unknown}; have {ctx.exp.variant_names}")
        eval_models = [EvalModel(name=m, variant=m) for m in names]
        if steer or steer_from_eval:
            sv = steer_variant or ctx.exp.reference
            if steer:
                fs = FeatureSet(name=steer, features=parse_features(steer))
            else:
                assert steer_from_eval is not None
                fs = _eval_sets(steer_from_eval, ctx, steer_top, False)[0]
            obs_prompts = [
                chat_prompt(rt.variant(sv).tokenizer, q.paraphrases[0], q.system) for q in qs
            ]
            spec = SteeringSpec(
                experiment=ctx.exp.name,
                variant=sv,
                prompts=obs_prompts,
                feature_sets=[fs],
                mode="value" if steer_value is not None else "scale",
                scale=steer_scale,
                value=steer_value,
                positions=steer_positions,
                observe_variant=observe_variant or (others[0] if others else sv),
            )
            ids = [rt.tokenize(p, sv, rendered=True) for p in obs_prompts]
            applied = applied_features(rt, spec, ids, fs)
            eval_models.append(
                EvalModel(
                    name=f"{sv}+steer",
                    variant=sv,
                    steering=tuple(applied),
                    positions=spec.positions,
                )
            )
            typer.echo(
                f"{sv}+steer sets "
                + ", ".join(f"{a.layer}:{a.feature}={a.value:.3g}" for a in applied)
                + f" at positions {spec.positions}"
            )
        em_scorer = _em_scorer(judges, ctx.exp, scorer, judge_model)
        config = EvalConfig(
            experiment=ctx.exp.name,
            models=tuple(eval_models),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            scorer=em_scorer.scorer_id,
        )
        bar = tqdm(total=len(eval_models) * len(qs) * n, desc="answers", unit="ans")

        def show(state: Any) -> None:
            bar.n = state.existing + state.sampled
            bar.set_postfix(stored_before=state.existing, new=state.sampled)
            bar.refresh()

        state = run_eval(
            store=ctx.store,
            config=config,
            fingerprint=ctx.fingerprint,
            questions=qs,
            n=n,
            seed=seed,
            sampler=runtime_sampler(rt, config),
            tokenizer_for=lambda v: rt.variant(v).tokenizer,
            scorer=em_scorer,
            concurrency=concurrency,
            progress=show,
        )
        bar.close()
        typer.echo(
            f"{state.total} answers: {state.existing} already stored, {state.sampled} sampled now"
        )
        report, answers = build_report(ctx.store, config, ctx.fingerprint, qs, n, seed)
        from services.analysis.em_eval import write_report

        keys = write_report(ctx.store, report, answers, out)
    except (EvalError, SteeringError) as e:
        raise _fail(str(e)) from None
    table = Table(
        "model",
        "n",
        "scored",
        "mis&coh",
        "rate",
        "95% CI",
        "aligned",
        "coherent",
        "CODE",
        "REFUSAL",
        "unscorable",
        title=f"EM evaluation {report.run_hash} ({report.scorer})",
    )
    for c in report.overall:
        table.add_row(
            c.model,
            str(c.n),
            str(c.n_scored),
            str(c.n_misaligned_coherent),
            "n/a" if c.rate is None else f"{c.rate:.1%}",
            f"{c.ci_low:.1%}-{c.ci_high:.1%}",
            "n/a" if c.mean_aligned is None else f"{c.mean_aligned:.1f}",
            "n/a" if c.mean_coherent is None else f"{c.mean_coherent:.1f}",
            str(c.n_code),
            str(c.n_refusal),
            str(c.n_unscorable),
        )
    Console(width=max(Console().width, 120)).print(table)
    if out is None:
        typer.echo(render_markdown(report).split("## Per question")[1])
    typer.echo(f"stored {keys['report.json']}")
    if response_features:
        fv = features_variant or (others[0] if others else ctx.exp.reference)
        try:
            feats, fkeys = feature_report(rt, ctx.store, report, answers, variant=fv, out_dir=out)
        except TooFewResponses as e:
            typer.echo(f"response-level features skipped: {e}", err=True)
            return
        typer.echo(
            f"response-level features ({fv}): {feats.n_misaligned} misaligned vs "
            f"{feats.n_aligned} aligned answers, {feats.n_tested} features tested, "
            f"{feats.n_significant} with q < {feats.alpha:g}"
        )
        up = [r for r in feats.features if r.rank_biserial > 0][:5]
        typer.echo("most significant features more active in misaligned answers:")
        for r in up:
            typer.echo(
                f"  {r.layer}:{r.feature}  rank-biserial {r.rank_biserial:+.3f}  q {r.q:.2e}"
            )
        typer.echo(f"stored {fkeys[f'features_{fv}.json']} (use with emc steer --from-eval)")


def register(app: typer.Typer, judges: TextJudges) -> None:
    """Add ``steer`` and ``eval`` to ``app``; ``judges`` builds their text judges."""
    # the commands read the judges from their click context (``cli.obj``)
    app.command("steer", context_settings={"obj": judges})(steer)
    app.command("eval", context_settings={"obj": judges})(eval_cmd)
