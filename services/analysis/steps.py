"""The analysis service's pipeline step (the ``emc.analysis.rank_prompt`` task runs it)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from common import tasknames as T
from common.context import Context
from common.errors import ANALYSIS_STEP, NothingToExplain, PromptFailure
from common.graph.artifact import graphs_done, load_graph
from common.graph.model import AttributionGraph
from common.pipeline import Next
from common.records import FeatureRanking, Prompt, Status
from common.scores import HarmVerdicts
from common.store import NotFound, ObjectStore, StoreError
from common.store import keys as K
from services.analysis.ranking import rank_prompt
from services.analysis.steering import (
    SteeringSamples,
    SteeringSpec,
    build_result,
    record_steering,
    sample_steering,
)

if TYPE_CHECKING:
    from services.attribution.runtime import Runtime

log = logging.getLogger(__name__)


def step_rank(ctx: Context, pid: str) -> list[Next]:
    """Feature rankings of every variant (cached by labels version); needs every graph."""
    variants = ctx.exp.variant_names
    if not graphs_done(ctx.store, ctx.exp.name, pid, ctx.fingerprint, variants):
        log.info("prompt %s: graphs not all there yet; analysis waits for the last one", pid)
        return []
    graphs: dict[str, AttributionGraph] = {}

    def load(store: ObjectStore, exp: str, pid: str, fp: str, variant: str) -> AttributionGraph:
        # read each graph once: the ranking and the feature index both need it
        if variant not in graphs:
            graphs[variant] = load_graph(store, exp, pid, fp, variant)
        return graphs[variant]

    rankings = {}
    for variant in variants:
        try:
            rankings[variant] = rank_prompt(
                ctx.store, ctx.exp, pid, variant, fingerprint=ctx.fingerprint, load_graph=load
            )
        except NothingToExplain as e:
            # e.g. the reference variant has no evil token: a finding, not a failure
            log.info("prompt %s/%s: no ranking: %s", pid, variant, e.reason)
        except StoreError as e:  # a corrupt artifact: its message names it and the retry
            raise PromptFailure(ANALYSIS_STEP, str(e), variant=variant) from None
    try:
        index_features(
            ctx,
            pid,
            rankings,
            {v: load(ctx.store, ctx.exp.name, pid, ctx.fingerprint, v) for v in variants},
        )
    except StoreError as e:
        raise PromptFailure(ANALYSIS_STEP, str(e)) from None
    ctx.queue.set_status(pid, Status.analyzed)
    return []


def index_features(
    ctx: Context,
    pid: str,
    rankings: dict[str, FeatureRanking],
    graphs: dict[str, AttributionGraph],
) -> None:
    """Put the prompt's features into the feature index (:mod:`common.feature_index`)."""
    from common.feature_index import FeatureIndex, index_prompt, shard_of

    exp, fp = ctx.exp.name, ctx.fingerprint
    prompt = ctx.store.get_record(K.prompt(exp, pid), Prompt)
    shard = shard_of(pid, prompt.text, prompt.source, graphs, rankings)
    index_prompt(ctx.store, FeatureIndex(ctx.redis, exp, fp), exp, fp, shard)


# ----------------------------------------------------------------------------- steering runs


def step_steering_samples(ctx: Context, runtime: Runtime, spec: dict[str, Any]) -> list[Next]:
    """A steering run's GPU stage: sample every arm, then ask the judge queue to label them.

    Idempotent: a run whose result is stored is not run again; stored samples are reused.
    """
    parsed = SteeringSpec.model_validate(spec)
    exp, fp = ctx.exp.name, ctx.fingerprint
    if ctx.store.exists(K.steering_result(exp, fp, parsed.spec_hash)):
        return []
    key = K.steering_samples(exp, fp, parsed.spec_hash)
    try:
        samples = ctx.store.get_record(key, SteeringSamples)
    except NotFound:
        samples = sample_steering(runtime, parsed)
        ctx.store.put_json(key, samples)
    batch = samples.harm_batch()
    ctx.store.put_json(K.harm_batch(exp, fp, batch.batch), batch)
    then = Next(T.ANALYSIS_STEERING, {"exp": exp, "spec_hash": parsed.spec_hash})
    return [
        Next(
            T.JUDGE_HARM,
            {"exp": exp, "batch": batch.batch, "then": then.task, "then_kwargs": then.kwargs},
        )
    ]


def step_steering_result(ctx: Context, spec_hash: str) -> list[Next]:
    """A steering run's last stage: counts, intervals and the plot, from the judged samples."""
    exp, fp = ctx.exp.name, ctx.fingerprint
    samples = ctx.store.get_record(K.steering_samples(exp, fp, spec_hash), SteeringSamples)
    batch = samples.harm_batch().batch
    verdicts = ctx.store.get_record(K.harm_verdicts(exp, fp, batch), HarmVerdicts)
    record_steering(ctx.store, build_result(samples, verdicts.verdicts))
    return []
