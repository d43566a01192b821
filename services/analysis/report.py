"""``emc analyze report``: rank every graphed prompt, aggregate the divergent ones, write files.

Output (to a directory and to the store under ``keys.reports(exp, fp)``):

- ``index.json`` (:class:`ReportIndex`): what was written, the divergent prompts, and every
  prompt/variant that could not be used with the reason;
- ``aggregate_{variant}.json`` (:class:`FeatureAggregate`) per variant;
- ``compare_{reference}_vs_{variant}.json`` (:class:`VariantComparison`) per other variant;
- ``top_features_{variant}.png``, ``layers_{variant}.png``, ``compare_{reference}_vs_{variant}.png``;
- ``summary.md``: the numbers and tables above in prose.

A prompt is *divergent* when a token of the variant's top-k is labelled evil (human label,
else judge) and is not in the reference variant's top-k; prompts a reviewer flagged
``bad_prompt`` are left out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import AnalysisError, NothingToExplain
from common.experiment import Experiment
from common.labels import current_label, resolve_labels
from common.records import FeatureRanking, TopKLogits, feature_cell
from common.store import NotFound, ObjectStore, StoreError
from common.store import keys as K
from services.analysis.aggregate import PromptFeatures, aggregate, compare, feature_changes
from services.analysis.plots import plot_comparison, plot_layers, plot_top_features
from services.analysis.ranking import GraphLoader, default_graph_loader, rank_prompt
from services.analysis.records import (
    FeatureAggregate,
    PromptIssue,
    ReportIndex,
    VariantComparison,
)

log = logging.getLogger(__name__)


def graphed_prompts(store: ObjectStore, exp: str, fp: str) -> dict[str, set[str]]:
    """prompt id -> variants with a stored graph manifest under fingerprint ``fp``."""
    prefix = K.prompts_prefix(exp)
    found: dict[str, set[str]] = {}
    for key in store.list_keys(prefix):
        pid, _, rest = key[len(prefix) :].partition("/")
        head = f"runs/{fp}/graphs/"
        if rest.startswith(head) and rest.endswith(".json") and rest.count("/") == 3:
            found.setdefault(pid, set()).add(rest[len(head) : -len(".json")])
    return found


def divergence(
    store: ObjectStore,
    exp: Experiment,
    pid: str,
    fp: str,
    variant: str,
) -> str | None:
    """None if the prompt is divergent for ``variant``, else the reason it is not."""
    ref = exp.reference
    try:
        top_v = store.get_record(K.logits(exp.name, pid, fp, variant), TopKLogits)
        top_r = store.get_record(K.logits(exp.name, pid, fp, ref), TopKLogits)
    except NotFound as e:
        return f"no top-k logits ({e})"
    except StoreError as e:  # a corrupt logits record: the prompt is left out, with why
        return str(e)
    human = current_label(store, exp.name, pid)
    if human is not None and human.bad_prompt:
        return "flagged bad_prompt by a reviewer"
    try:
        labels = resolve_labels(store, exp.name, pid, fp, variant, exp.judge.judge_id)
    except AnalysisError as e:
        return e.reason
    in_ref = {t.token_id for t in top_r.tokens}
    evil_new = [
        t.token_id
        for t in top_v.tokens
        if labels.labels.get(t.token_id) == "evil" and t.token_id not in in_ref
    ]
    return None if evil_new else f"no evil token of {variant} outside {ref}'s top-k"


@dataclass
class ReportData:
    """Everything the report is drawn from (kept for tests and notebooks)."""

    index: ReportIndex
    aggregates: dict[str, FeatureAggregate] = field(default_factory=dict)
    comparisons: dict[str, VariantComparison] = field(default_factory=dict)


def build_report(
    store: ObjectStore,
    exp: Experiment,
    out_dir: Path,
    *,
    fingerprint: str | None = None,
    load_graph: GraphLoader | None = None,
    top_n: int = 20,
    progress: Callable[[str], None] | None = None,
) -> ReportData:
    """Rank, aggregate and compare; write JSON, PNG and markdown to ``out_dir`` and the store."""
    fp = fingerprint or exp.fingerprint
    loader = load_graph or default_graph_loader()
    out_dir.mkdir(parents=True, exist_ok=True)
    ref = exp.reference
    others = [v for v in exp.variant_names if v != ref]
    graphed = graphed_prompts(store, exp.name, fp)
    rankings, issues = _rank_all(store, exp, graphed, fp, loader, progress)
    divergent: dict[str, list[str]] = {}
    for v in others:
        divergent[v] = []
        for pid in sorted(graphed):
            if (pid, v) not in rankings:
                continue
            why = divergence(store, exp, pid, fp, v)
            if why is None:
                divergent[v].append(pid)
    data = ReportData(
        index=ReportIndex(
            experiment=exp.name,
            fingerprint=fp,
            reference=ref,
            variants=exp.variant_names,
            n_prompts_with_graphs=len(graphed),
            divergent_prompt_ids=sorted({p for ps in divergent.values() for p in ps}),
            files=[],
            issues=issues,
        )
    )
    files: list[Path] = []
    for v in others:
        pids = divergent[v]
        agg = aggregate(
            [rankings[p, v] for p in pids], experiment=exp.name, fingerprint=fp, variant=v
        )
        data.aggregates[v] = agg
        files.append(_write_json(out_dir / f"aggregate_{v}.json", agg))
        files.append(plot_top_features(agg, out_dir / f"top_features_{v}.png", top_n=top_n))
        files.append(plot_layers(agg, out_dir / f"layers_{v}.png"))
        pairs = []
        for p in pids:
            if ref not in graphed[p]:
                continue
            if (p, ref) in rankings:
                ref_side = PromptFeatures.from_ranking(rankings[p, ref])
            else:
                try:
                    ref_side = PromptFeatures.from_graph(loader(store, exp.name, p, fp, ref))
                except StoreError as e:  # a corrupt reference graph: left out, listed
                    data.index.issues.append(
                        PromptIssue(prompt_id=p, variant=ref, kind="failed", reason=str(e))
                    )
                    continue
            pairs.append((ref_side, PromptFeatures.from_ranking(rankings[p, v])))
        if pairs:
            cmp = compare(pairs, experiment=exp.name, fingerprint=fp, reference=ref, variant=v)
            data.comparisons[v] = cmp
            files.append(_write_json(out_dir / f"compare_{ref}_vs_{v}.json", cmp))
            top_keys = [(f.layer, f.feature) for f in agg.features[:10] if f.mean_score > 0]
            files.append(
                plot_comparison(
                    feature_changes(pairs),
                    out_dir / f"compare_{ref}_vs_{v}.png",
                    reference=ref,
                    variant=v,
                    highlight=top_keys,
                )
            )
    summary = out_dir / "summary.md"
    summary.write_text(render_summary(data, top_n=top_n))
    files.append(summary)
    data.index = data.index.model_copy(update={"files": [f.name for f in files] + ["index.json"]})
    files.append(_write_json(out_dir / "index.json", data.index))
    for f in files:
        ctype = {".json": "application/json", ".png": "image/png", ".md": "text/markdown"}
        store.put_file(f"{K.reports(exp.name, fp)}/{f.name}", f, ctype.get(f.suffix, "text/plain"))
    return data


def _rank_all(
    store: ObjectStore,
    exp: Experiment,
    graphed: dict[str, set[str]],
    fp: str,
    loader: GraphLoader,
    progress: Callable[[str], None] | None,
) -> tuple[dict[tuple[str, str], FeatureRanking], list[PromptIssue]]:
    """Rank every graphed (prompt, variant); what could not be ranked becomes an issue."""
    issues: list[PromptIssue] = []
    rankings: dict[tuple[str, str], FeatureRanking] = {}
    for i, (pid, variants) in enumerate(sorted(graphed.items())):
        if progress:
            progress(f"ranking {i + 1}/{len(graphed)} {pid}")
        for v in sorted(variants):
            try:
                rankings[pid, v] = rank_prompt(
                    store, exp, pid, v, fingerprint=fp, load_graph=loader
                )
            except AnalysisError as e:
                nothing = isinstance(e, NothingToExplain)
                issues.append(
                    PromptIssue(
                        prompt_id=pid,
                        variant=v,
                        kind="nothing_to_explain" if nothing else "failed",
                        reason=e.reason,
                    )
                )
            except StoreError as e:  # unreadable graph (torn write, other format version)
                issues.append(PromptIssue(prompt_id=pid, variant=v, kind="failed", reason=str(e)))
    return rankings, issues


def _write_json(path: Path, record: FeatureAggregate | VariantComparison | ReportIndex) -> Path:
    path.write_text(record.model_dump_json(indent=1))
    return path


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.4f}"


def render_summary(data: ReportData, *, top_n: int = 20) -> str:
    """The markdown summary of a report."""
    ix = data.index
    lines = [
        f"# Feature analysis: {ix.experiment} (fingerprint `{ix.fingerprint}`)",
        "",
        f"- prompts with graphs: {ix.n_prompts_with_graphs}",
        f"- divergent prompts (evil token outside `{ix.reference}`'s top-k): "
        f"{len(ix.divergent_prompt_ids)}",
        f"- prompt/variant pairs with nothing to explain (no evil token): "
        f"{sum(i.kind == 'nothing_to_explain' for i in ix.issues)}",
        f"- prompt/variant pairs that failed: {sum(i.kind == 'failed' for i in ix.issues)}",
        "",
        "Score of a feature = first-order change of P_evil - P_safe (probability mass) from the feature at its "
        "activation, through all paths of the attribution graph (signed); per prompt summed "
        "over positions, then averaged over the divergent prompts (absent = 0).",
        "",
    ]
    for v, agg in data.aggregates.items():
        lines += [
            f"## Variant `{v}`: top features over {len(agg.prompt_ids)} divergent prompts",
            "",
            f"![top features](top_features_{v}.png) ![layers](layers_{v}.png)",
            "",
            "| rank | layer | feature | mean score | in prompts | sign consistency | tokens |",
            "|---:|---:|---:|---:|---:|---:|---|",
        ]
        for i, f in enumerate(agg.features[:top_n], 1):
            lines.append(
                f"| {i} | {f.layer} | {feature_cell(f.feature)} | {f.mean_score:+.4f} | "
                f"{f.n_prompts}/{len(agg.prompt_ids)} | {f.sign_consistency:.0%} | "
                f"{', '.join(repr(t) for t in f.tokens)} |"
            )
        lines.append("")
        cmp = data.comparisons.get(v)
        if cmp is not None:
            lines += [
                f"### `{cmp.reference}` vs `{v}` on the same {len(cmp.prompt_ids)} prompts",
                "",
                f"![comparison](compare_{cmp.reference}_vs_{v}.png)",
                "",
                f"Scores compared on {len(cmp.scored_prompt_ids)} prompts where both variants "
                "could be ranked (the reference often has no evil token among its logit nodes).",
                "",
                "| layer | feature | activation ref -> var | score ref -> var |",
                "|---:|---:|---|---|",
            ]
            for c in cmp.by_activation[:10]:
                lines.append(
                    f"| {c.layer} | {c.feature} | {c.reference_activation:.3f} -> "
                    f"{c.variant_activation:.3f} | {_fmt(c.reference_score)} -> "
                    f"{_fmt(c.variant_score)} |"
                )
            lines.append("")
    if ix.issues:
        lines += ["## Not ranked", ""]
        lines += [f"- `{i.prompt_id}` / {i.variant} ({i.kind}): {i.reason}" for i in ix.issues[:50]]
        if len(ix.issues) > 50:
            lines.append(f"- ... and {len(ix.issues) - 50} more (index.json)")
        lines.append("")
    return "\n".join(lines)


def prompt_rankings(
    store: ObjectStore,
    exp: Experiment,
    pid: str,
    *,
    variants: Sequence[str] | None = None,
    fingerprint: str | None = None,
    load_graph: GraphLoader | None = None,
) -> tuple[dict[str, FeatureRanking], dict[str, str]]:
    """Rankings of one prompt per variant, and the reason for each variant that failed."""
    fp = fingerprint or exp.fingerprint
    done: dict[str, FeatureRanking] = {}
    failed: dict[str, str] = {}
    for v in variants or exp.variant_names:
        try:
            done[v] = rank_prompt(store, exp, pid, v, fingerprint=fp, load_graph=load_graph)
        except AnalysisError as e:
            failed[v] = e.reason
        except NotFound as e:
            failed[v] = f"no graph stored ({e}): run the attribution step for this prompt"
        except StoreError as e:
            failed[v] = str(e)
    return done, failed
