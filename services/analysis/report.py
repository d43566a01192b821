"""``emc analyze report``: rank every graphed prompt, aggregate the divergent ones, write files.

Output (to a directory and to the store under ``keys.reports(exp, fp)``):

- ``index.json`` (:class:`ReportIndex`): what was written, the divergent prompts, and every
  prompt/variant that could not be used with the reason;
- ``aggregate_{variant}.json`` (:class:`FeatureAggregate`) per variant;
- ``compare_{reference}_vs_{variant}.json`` (:class:`VariantComparison`) per other variant;
- ``top_features_{variant}.png``, ``layers_{variant}.png``, ``shares_{variant}.png`` (where the
  score goes: features, error nodes, adapter per layer, averaged over prompts),
  ``compare_{reference}_vs_{variant}.png``;
- ``summary.md``: the numbers and tables above in prose, with the score shares (flagged when
  error nodes carry more than features, naming the layer) and the diff ranking.

The report streams: it holds one prompt's rankings at a time and running aggregates
(O(distinct features)), stored under ``keys.report_state`` with each prompt's digest, so a
re-run after new prompts folds in only those (``--full`` rebuilds).

A prompt is *divergent* when a token of the variant's top-k is labelled evil (human label,
else judge) and is not in the reference variant's top-k; prompts a reviewer flagged
``bad_prompt`` are left out.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from common.errors import AnalysisError, NothingToExplain
from common.experiment import Experiment
from common.labels import current_label, resolve_labels
from common.records import FeatureRanking, Record, TopKLogits, feature_cell
from common.store import NotFound, ObjectStore, StoreError
from common.store import keys as K
from services.analysis.aggregate import PromptFeatures, RunningAggregate, RunningComparison
from services.analysis.plots import plot_comparison, plot_layers, plot_shares, plot_top_features
from services.analysis.ranking import GraphLoader, default_graph_loader, rank_prompt
from services.analysis.records import (
    FeatureAggregate,
    PromptIssue,
    ReportIndex,
    SharesAggregate,
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
    #: prompts folded in by this run (all of them unless the stored state was extended)
    folded: list[str] = field(default_factory=list)
    #: whether this run started from the stored state of an earlier run
    incremental: bool = False
    #: seconds per phase: digests (every prompt), fold (new prompts), write (files, plots)
    seconds: dict[str, float] = field(default_factory=dict)


#: version of :class:`ReportState`'s layout; a state of another version is rebuilt
STATE_VERSION = 1


class ReportState(Record):
    """The report's running aggregates over the prompts folded in so far, keyed by each
    prompt's digest (:func:`prompt_digest`): a later run folds in only new prompts, and
    starts afresh when a folded prompt changed or went away."""

    schema_version: int = STATE_VERSION
    experiment: str
    fingerprint: str
    reference: str
    variants: list[str]
    digests: dict[str, str] = Field(description="prompt id -> digest of what it was folded from")
    issues: list[PromptIssue]
    divergent: dict[str, list[str]] = Field(description="variant -> divergent prompts folded")
    aggregates: dict[str, dict[str, Any]] = Field(description="RunningAggregate.dump per variant")
    comparisons: dict[str, dict[str, Any]] = Field(description="RunningComparison.dump per variant")


@dataclass
class _Running:
    """The in-memory side of :class:`ReportState`."""

    digests: dict[str, str]
    issues: list[PromptIssue]
    divergent: dict[str, list[str]]
    aggregates: dict[str, RunningAggregate]
    comparisons: dict[str, RunningComparison]

    @classmethod
    def empty(cls, others: Sequence[str]) -> _Running:
        return cls(
            {},
            [],
            {v: [] for v in others},
            {v: RunningAggregate() for v in others},
            {v: RunningComparison() for v in others},
        )

    @classmethod
    def load(cls, state: ReportState) -> _Running:
        return cls(
            dict(state.digests),
            list(state.issues),
            {v: list(p) for v, p in state.divergent.items()},
            {v: RunningAggregate.load(d) for v, d in state.aggregates.items()},
            {v: RunningComparison.load(d) for v, d in state.comparisons.items()},
        )

    def dump(self, exp: Experiment, fp: str) -> ReportState:
        return ReportState(
            experiment=exp.name,
            fingerprint=fp,
            reference=exp.reference,
            variants=exp.variant_names,
            digests=self.digests,
            issues=self.issues,
            divergent=self.divergent,
            aggregates={v: a.dump() for v, a in self.aggregates.items()},
            comparisons={v: c.dump() for v, c in self.comparisons.items()},
        )


def prompt_digest(
    store: ObjectStore, exp: Experiment, pid: str, fp: str, variants: Iterable[str]
) -> str:
    """Digest of everything a prompt's part of the report follows from: its logits and judge
    verdicts per variant, the key of its newest human label (labels are append-only) and
    the manifest of each stored graph (which names its tensors' sha256). Raw bytes are
    hashed, nothing is parsed: cheap next to reading a ranking."""
    h = hashlib.sha256(pid.encode())
    label_key = store.latest(K.labels_history(exp.name, pid))
    h.update(f"|labels:{label_key}".encode())
    graphed = set(variants)
    for v in exp.variant_names:
        keys = [
            K.logits(exp.name, pid, fp, v),
            K.verdicts(exp.name, pid, fp, exp.judge.judge_id, v),
        ]
        if v in graphed:
            keys.append(K.graph_manifest(exp.name, pid, fp, v))
        for key in keys:
            try:
                data = store.get_bytes(key)
            except NotFound:
                data = b"-"
            h.update(f"|{key}:{len(data)}:".encode())
            h.update(data)
    return h.hexdigest()[:24]


def load_state(store: ObjectStore, exp: Experiment, fp: str) -> ReportState | None:
    """The stored report state, or None when there is none or it cannot be used (another
    version, corrupt, another experiment's variants): the report then starts afresh."""
    try:
        state = store.get_record(K.report_state(exp.name, fp), ReportState)
    except NotFound:
        return None
    except StoreError as e:
        log.warning("rebuilding the report from scratch: %s", e)
        return None
    if state.variants != exp.variant_names or state.reference != exp.reference:
        return None
    return state


def build_report(
    store: ObjectStore,
    exp: Experiment,
    out_dir: Path,
    *,
    fingerprint: str | None = None,
    load_graph: GraphLoader | None = None,
    top_n: int = 20,
    progress: Callable[[str], None] | None = None,
    full: bool = False,
) -> ReportData:
    """Rank, aggregate and compare; write JSON, PNG and markdown to ``out_dir`` and the store.

    Streams: one prompt's rankings are in memory at a time, folded into running aggregates
    (:mod:`services.analysis.aggregate`). The aggregates are stored (``keys.report_state``)
    with each prompt's digest; the next run folds in only new prompts, unless a folded one
    changed or went away, or ``full`` asks for a rebuild.
    """
    fp = fingerprint or exp.fingerprint
    loader = load_graph or default_graph_loader()
    out_dir.mkdir(parents=True, exist_ok=True)
    ref = exp.reference
    others = [v for v in exp.variant_names if v != ref]
    t0 = time.perf_counter()
    graphed = graphed_prompts(store, exp.name, fp)
    pids = sorted(graphed)
    digests = {}
    for i, pid in enumerate(pids):
        if progress and i % 100 == 0:
            progress(f"checking {i + 1}/{len(pids)} prompts")
        digests[pid] = prompt_digest(store, exp, pid, fp, graphed[pid])
    state = None if full else load_state(store, exp, fp)
    usable = state is not None and all(digests.get(p) == d for p, d in state.digests.items())
    run = _Running.load(state) if state is not None and usable else _Running.empty(others)
    new = [p for p in pids if p not in run.digests]
    t1 = time.perf_counter()
    for i, pid in enumerate(new):
        if progress:
            progress(f"ranking {i + 1}/{len(new)} {pid}")
        _fold_prompt(run, store, exp, pid, graphed[pid], fp, loader)
        run.digests[pid] = digests[pid]
    if new or not usable:
        store.put_json(K.report_state(exp.name, fp), run.dump(exp, fp))
    t2 = time.perf_counter()
    data = ReportData(
        index=ReportIndex(
            experiment=exp.name,
            fingerprint=fp,
            reference=ref,
            variants=exp.variant_names,
            n_prompts_with_graphs=len(graphed),
            divergent_prompt_ids=sorted({p for ps in run.divergent.values() for p in ps}),
            files=[],
            issues=sorted(run.issues, key=lambda i: (i.prompt_id, i.variant)),
        ),
        folded=new,
        incremental=usable,
    )
    _write_files(data, run, store, exp, fp, out_dir, top_n)
    data.seconds = {"digests": t1 - t0, "fold": t2 - t1, "write": time.perf_counter() - t2}
    return data


def _fold_prompt(
    run: _Running,
    store: ObjectStore,
    exp: Experiment,
    pid: str,
    variants: set[str],
    fp: str,
    loader: GraphLoader,
) -> None:
    """Rank one prompt's variants and fold it into the running aggregates."""
    ref = exp.reference
    rankings: dict[str, FeatureRanking] = {}
    for v in sorted(variants):
        try:
            rankings[v] = rank_prompt(store, exp, pid, v, fingerprint=fp, load_graph=loader)
        except AnalysisError as e:
            nothing = isinstance(e, NothingToExplain)
            kind: Literal["nothing_to_explain", "failed"] = (
                "nothing_to_explain" if nothing else "failed"
            )
            run.issues.append(PromptIssue(prompt_id=pid, variant=v, kind=kind, reason=e.reason))
        except StoreError as e:  # unreadable graph (torn write, other format version)
            run.issues.append(PromptIssue(prompt_id=pid, variant=v, kind="failed", reason=str(e)))
    ref_side: PromptFeatures | None = None
    ref_read = False
    for v in run.aggregates:
        if v not in rankings or divergence(store, exp, pid, fp, v) is not None:
            continue
        run.divergent[v].append(pid)
        var_side = PromptFeatures.from_ranking(rankings[v])
        run.aggregates[v].add(var_side)
        if ref not in variants:
            continue
        if not ref_read:
            ref_read = True
            if ref in rankings:
                ref_side = PromptFeatures.from_ranking(rankings[ref])
            else:
                try:
                    ref_side = PromptFeatures.from_graph(loader(store, exp.name, pid, fp, ref))
                except StoreError as e:  # a corrupt reference graph: left out, listed
                    run.issues.append(
                        PromptIssue(prompt_id=pid, variant=ref, kind="failed", reason=str(e))
                    )
        if ref_side is not None:
            run.comparisons[v].add(ref_side, var_side)


def _write_files(
    data: ReportData,
    run: _Running,
    store: ObjectStore,
    exp: Experiment,
    fp: str,
    out_dir: Path,
    top_n: int,
) -> None:
    """JSON, plots and summary.md from the running aggregates, to ``out_dir`` and the store."""
    ref = exp.reference
    files: list[Path] = []
    for v, running in run.aggregates.items():
        agg = running.result(experiment=exp.name, fingerprint=fp, variant=v)
        data.aggregates[v] = agg
        files.append(_write_json(out_dir / f"aggregate_{v}.json", agg))
        files.append(plot_top_features(agg, out_dir / f"top_features_{v}.png", top_n=top_n))
        files.append(plot_layers(agg, out_dir / f"layers_{v}.png"))
        if agg.shares is not None:
            files.append(plot_shares(agg.shares, out_dir / f"shares_{v}.png", variant=v))
        cmp_run = run.comparisons[v]
        if not cmp_run.prompt_ids:
            continue
        cmp = cmp_run.result(experiment=exp.name, fingerprint=fp, reference=ref, variant=v)
        data.comparisons[v] = cmp
        files.append(_write_json(out_dir / f"compare_{ref}_vs_{v}.json", cmp))
        top_keys = [(f.layer, f.feature) for f in agg.features[:10] if f.mean_score > 0]
        files.append(
            plot_comparison(
                cmp_run.changes(),
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
        if agg.shares is not None:
            lines += shares_lines(agg.shares, v)
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
            lines += diff_lines(cmp)
    if ix.issues:
        lines += ["## Not ranked", ""]
        lines += [f"- `{i.prompt_id}` / {i.variant} ({i.kind}): {i.reason}" for i in ix.issues[:50]]
        if len(ix.issues) > 50:
            lines.append(f"- ... and {len(ix.issues) - 50} more (index.json)")
        lines.append("")
    return "\n".join(lines)


def shares_lines(agg: SharesAggregate, variant: str) -> list[str]:
    """Markdown: where the score goes for a variant, averaged over prompts, with the flag."""
    s = agg.shares
    lines = [
        f"### Where the score goes (`{variant}`, mean over {agg.n_prompts} prompts)",
        "",
        f"![score shares](shares_{variant}.png)",
        "",
        f"Mean linearised score {agg.mean_total:+.4f}; shares of it: error nodes "
        f"{s.errors:+.0%}, tokens {s.tokens:+.0%}"
        + (f", adapter nodes {s.adapter:+.0%}" if s.adapter else "")
        + f", largest single feature {s.top_feature:+.1%}. Prompts flagged (error nodes "
        f"carry more than features): {agg.n_flagged}/{agg.n_prompts}"
        + (
            " (layers: "
            + ", ".join(f"L{layer} x{n}" for layer, n in agg.flagged_layers.items())
            + ")"
            if agg.flagged_layers
            else ""
        )
        + ".",
        "",
    ]
    if s.flag:
        lines += [f"**Warning:** {s.flag}.", ""]
    lines += ["| layer | features | errors | adapter |", "|---:|---:|---:|---:|"]
    for row in s.layers:
        adapter = f"{row.adapter:+.1%}" if row.adapter else ""
        lines.append(f"| {row.layer} | {row.features:+.1%} | {row.errors:+.1%} | {adapter} |")
    lines.append("")
    return lines


def diff_lines(cmp: VariantComparison, top: int = 15) -> list[str]:
    """Markdown: the aggregated diff ranking (nodes whose score changed most)."""
    if not cmp.diff:
        return []
    lines = [
        f"### Diff ranking: what changed from `{cmp.reference}` to `{cmp.variant}`",
        "",
        f"Mean score per node over the {len(cmp.scored_prompt_ids)} prompts ranked in both "
        "variants (features and adapter nodes with positions folded; error nodes per layer).",
        "",
        f"| node | {cmp.reference} | {cmp.variant} | change |",
        "|---|---:|---:|---:|",
    ]
    for n in cmp.diff[:top]:
        lines.append(f"| {n.label} | {n.reference:+.4f} | {n.variant:+.4f} | {n.change:+.4f} |")
    lines.append("")
    return lines


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
