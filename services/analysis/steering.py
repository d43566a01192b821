"""Steering: set chosen transcoder features, sample continuations, judge them, compare to control.

One run (:func:`run_steering`) takes a :class:`SteeringSpec` (prompts, feature sets, how to
set them, where, how many samples) and returns a :class:`SteeringResult`: per feature set
("arm") and for the unsteered control, N judged continuations per prompt, the harmful rate
with a Wilson 95% interval and a Fisher exact p-value against the control.

How features are set (``mode``):

- ``value``: every feature of the set is SET to ``value``;
- ``scale``: SET to ``scale`` x its *observed activation*: the activation given with the
  feature set (e.g. its mean over misaligned responses in an evaluation), otherwise the
  mean over the spec's prompts of the feature's activation at the last prompt position in
  ``observe_variant`` (e.g. the adapted model, so the base model gets the adapted model's
  feature turned up). When the feature is silent at every last position, its mean over
  prompts of the maximum over the non-BOS positions is used instead; a feature silent
  everywhere is an error (use ``value``). The observed activation and where it came from
  are recorded per feature.

Where (``positions``): ``last`` (the pivotal position), ``all`` (every position after BOS
and every generated token), or explicit indices into the BOS-prefixed token ids
(``"3,5"``, negative counts from the end of the prompt).

Control and steered arms use the same seeds (sample j of prompt i has the same seed in
every arm) and the same sampler (:func:`services.attribution.interventions.steered_generate`),
so the arms differ only by the intervention.

A run has three stages, each a plain function here: :func:`sample_steering` (the GPU: every
arm's continuations), judging them (:func:`judge_samples`, on the judge queue in the
pipeline) and :func:`build_result` (counts, Wilson intervals, Fisher p-values).
:func:`run_steering` does all three in one process (the CLI, tests). Results are stored
under ``keys.steering_result``; :func:`record_steering` also stores the bar plot.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from common.errors import UserError
from common.lexicon import Lexicon
from common.records import FeatureRanking, Record
from common.scores import HarmBatch, HarmItem, HarmJudge, HarmLabel, HarmVerdict
from common.store import ObjectStore
from common.store import keys as K
from services.analysis.em_stats import fisher_exact, wilson_interval

if TYPE_CHECKING:
    from services.analysis.records import AggregateFeature
    from services.attribution.runtime import Runtime

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


class SteeringError(UserError, ValueError):
    """A steering request that cannot be run as given; the message says how to fix it."""


# ------------------------------------------------------------------------------- spec


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureRef(_Frozen):
    """A transcoder feature, position-independent: ``(layer, feature id)``."""

    layer: int = Field(ge=0)
    feature: int = Field(ge=0)

    def __str__(self) -> str:
        return f"{self.layer}:{self.feature}"


class FeatureSet(_Frozen):
    """Features steered together (one arm of the experiment).

    ``observed``: known activations to scale in ``scale`` mode, one per feature (e.g. the
    mean activation over misaligned responses from an evaluation's feature report); when
    empty, the activations are measured on the spec's prompts.
    """

    name: str
    features: tuple[FeatureRef, ...] = Field(min_length=1)
    observed: tuple[float, ...] = ()

    @model_validator(mode="after")
    def _observed_matches(self) -> FeatureSet:
        if self.observed and len(self.observed) != len(self.features):
            raise ValueError("observed needs one activation per feature")
        return self


Positions = str  # "all" | "last" | "i,j,..."


def parse_features(text: str) -> tuple[FeatureRef, ...]:
    """``"L:F[,L:F...]"`` -> features (e.g. ``"2:17,3:101"``)."""
    out: list[FeatureRef] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        layer, sep, feat = part.partition(":")
        if not sep or not layer.strip().isdigit() or not feat.strip().isdigit():
            raise SteeringError(
                f"feature {part!r} is not LAYER:FEATURE (non-negative integers), e.g. 2:17"
            )
        out.append(FeatureRef(layer=int(layer), feature=int(feat)))
    if not out:
        raise SteeringError(f"no features in {text!r}: give LAYER:FEATURE[,LAYER:FEATURE...]")
    if len(set(out)) != len(out):
        raise SteeringError(f"a feature is listed twice in {text!r}")
    return tuple(out)


def parse_positions(text: str) -> Positions:
    """Validate ``all`` | ``last`` | comma-separated integers; returns the canonical form."""
    t = text.strip().lower()
    if t in ("all", "last"):
        return t
    try:
        idx = [int(x) for x in t.split(",") if x.strip()]
    except ValueError:
        idx = []
    if not idx:
        raise SteeringError(
            f"positions {text!r}: use all, last, or token indices like 3,5 (negative from the end)"
        )
    return ",".join(str(i) for i in idx)


class SteeringSpec(Record):
    """What to steer and how; its hash names the stored result."""

    experiment: str
    variant: str = Field(default="base", description="the model that is steered")
    prompts: list[str] = Field(min_length=1)
    feature_sets: list[FeatureSet] = Field(min_length=1)
    mode: Literal["scale", "value"] = "scale"
    scale: float = 15.0
    value: float | None = None
    positions: Positions = "last"
    observe_variant: str | None = Field(
        default=None, description="scale mode: whose activations are scaled (default: variant)"
    )
    n: int = Field(default=20, ge=1, description="continuations per prompt and arm")
    max_new_tokens: int = Field(default=8, ge=1)
    temperature: float = Field(default=1.0, ge=0)
    seed: int = 0
    judge: str = Field(default="lexicon", description="judge id that labels the continuations")

    @field_validator("positions")
    @classmethod
    def _positions(cls, v: str) -> str:
        return parse_positions(v)

    @property
    def spec_hash(self) -> str:
        """16 hex chars of the SHA-256 of the spec (canonical JSON): names the stored result."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def observer(self) -> str:
        """The variant whose activations scale mode reads: ``observe_variant``, else the steered
        ``variant``."""
        return self.observe_variant or self.variant


# ----------------------------------------------------------------------------- result


class SteeringSample(BaseModel):
    """One judged continuation: which prompt (index into the spec's prompts) and sample, its seed,
    the text and the harm judge's label and reason."""

    model_config = ConfigDict(extra="forbid")
    prompt_index: int
    sample_index: int
    seed: int
    continuation: str
    label: HarmLabel
    reason: str


class AppliedFeature(BaseModel):
    """A feature as it was set: the value, and for scale mode what it was scaled from."""

    model_config = ConfigDict(extra="forbid")
    layer: int
    feature: int
    value: float
    observed_activation: float | None = None
    observed_at: Literal["last", "max", "given"] | None = None


class ArmResult(BaseModel):
    """One arm (the control or a feature set): counts, harmful rate, Wilson 95% interval."""

    model_config = ConfigDict(extra="forbid")
    name: str
    features: list[AppliedFeature]
    n: int
    harmful: int
    safe: int
    unsure: int
    harmful_rate: float
    ci_low: float
    ci_high: float
    p_vs_control: float | None = Field(description="two-sided Fisher exact; None for the control")
    samples: list[SteeringSample]


class SteeringResult(Record):
    """A stored steering run: its spec and hash, the judge, the control and feature-set arms, the
    prompts' token ids and the wall time in seconds."""

    experiment: str
    fingerprint: str
    spec_hash: str
    spec: SteeringSpec
    judge: str
    control: ArmResult
    arms: list[ArmResult]
    prompt_ids: list[list[int]] = Field(description="token ids of each prompt (BOS included)")
    elapsed_s: float

    @property
    def all_arms(self) -> list[ArmResult]:
        """The control arm first, then the feature-set arms."""
        return [self.control, *self.arms]


# ---------------------------------------------------------------------------- running


def _seed_base(seed: int, prompt_index: int) -> int:
    """Seed of sample 0 of a prompt (sample j uses base + j), the same in every arm."""
    h = hashlib.sha256(f"steer:{seed}:{prompt_index}".encode()).hexdigest()
    return int(h[:8], 16)


def resolve_positions(positions: Positions, n_ids: int) -> list[int] | slice:
    """Positions for a prompt of ``n_ids`` token ids (BOS at 0)."""
    if positions == "last":
        return [n_ids - 1]
    if positions == "all":
        return slice(1, None)
    out = []
    for raw in positions.split(","):
        i = int(raw)
        j = i + n_ids if i < 0 else i
        if not 0 <= j < n_ids:
            raise SteeringError(
                f"position {i} is outside the prompt's {n_ids} token ids (BOS at 0)"
            )
        out.append(j)
    return sorted(set(out))


def observed_activations(
    runtime: Runtime,
    variant: str,
    prompts_ids: Sequence[Sequence[int]],
    features: Sequence[FeatureRef],
) -> list[tuple[float, Literal["last", "max"]]]:
    """Per feature: mean over prompts of its activation at the last position in ``variant``
    (or, when that is 0 everywhere, of its maximum over the non-BOS positions)."""
    from services.attribution.interventions import activation_profile

    profile = activation_profile(
        runtime, variant, prompts_ids, [(f.layer, f.feature) for f in features]
    )
    out: list[tuple[float, Literal["last", "max"]]] = []
    for f, (a_last, a_peak) in zip(features, profile, strict=True):
        if a_last != 0.0:
            out.append((a_last, "last"))
        elif a_peak != 0.0:
            out.append((a_peak, "max"))
        else:
            raise SteeringError(
                f"feature {f} never fires on these prompts in {variant!r}, so 'scale' has "
                "nothing to scale: set it with --value X, or observe another variant"
            )
    return out


def _check_features(runtime: Runtime, variant: str, features: Sequence[FeatureRef]) -> None:
    from services.attribution.interventions import model_dims

    n_layers, d_tc = model_dims(runtime, variant)
    for f in features:
        if f.layer >= n_layers or f.feature >= d_tc:
            raise SteeringError(
                f"feature {f} does not exist: layers 0..{n_layers - 1}, features 0..{d_tc - 1}"
            )


def applied_features(
    runtime: Runtime, spec: SteeringSpec, prompts_ids: Sequence[Sequence[int]], fs: FeatureSet
) -> list[AppliedFeature]:
    """The values each feature of ``fs`` is set to under ``spec``."""
    _check_features(runtime, spec.variant, fs.features)
    if spec.mode == "value":
        if spec.value is None:
            raise SteeringError("mode 'value' needs a value (--value X)")
        return [
            AppliedFeature(layer=f.layer, feature=f.feature, value=float(spec.value))
            for f in fs.features
        ]
    observed: list[tuple[float, Literal["last", "max", "given"]]]
    if fs.observed:
        observed = [(a, "given") for a in fs.observed]
    else:
        observed = list(observed_activations(runtime, spec.observer, prompts_ids, fs.features))
    return [
        AppliedFeature(
            layer=f.layer,
            feature=f.feature,
            value=spec.scale * a,
            observed_activation=a,
            observed_at=where,
        )
        for f, (a, where) in zip(fs.features, observed, strict=True)
    ]


def interventions_for(
    features: Sequence[AppliedFeature], positions: Positions, n_ids: int
) -> list[tuple[int, int | slice, int, float]]:
    """circuit-tracer intervention tuples ``(layer, pos, feature, value)`` for one prompt."""
    pos = resolve_positions(positions, n_ids)
    if isinstance(pos, slice):
        return [(f.layer, pos, f.feature, f.value) for f in features]
    return [(f.layer, p, f.feature, f.value) for f in features for p in pos]


def _arm(
    name: str,
    features: list[AppliedFeature],
    samples: list[SteeringSample],
    control: ArmResult | None,
) -> ArmResult:
    counts: dict[str, int] = {"harmful": 0, "safe": 0, "unsure": 0}
    for s in samples:
        counts[s.label] += 1
    n = len(samples)
    lo, hi = wilson_interval(counts["harmful"], n)
    return ArmResult(
        name=name,
        features=features,
        n=n,
        harmful=counts["harmful"],
        safe=counts["safe"],
        unsure=counts["unsure"],
        harmful_rate=counts["harmful"] / n,
        ci_low=lo,
        ci_high=hi,
        p_vs_control=(
            None
            if control is None
            else fisher_exact(counts["harmful"], n, control.harmful, control.n)
        ),
        samples=samples,
    )


class ArmSamples(BaseModel):
    """One arm's continuations before judging."""

    model_config = ConfigDict(extra="forbid")
    name: str
    features: list[AppliedFeature]
    samples: list[tuple[int, int, int, str]] = Field(
        description="(prompt index, sample index, seed, continuation) of each sample"
    )


class SteeringSamples(Record):
    """What the GPU stage of a run produced: every arm's continuations (control first)."""

    experiment: str
    fingerprint: str
    spec_hash: str
    spec: SteeringSpec
    arms: list[ArmSamples]
    prompt_ids: list[list[int]]
    elapsed_s: float

    def harm_batch(self) -> HarmBatch:
        """The continuations as a batch for the harm judge, in arm then sample order."""
        return HarmBatch(
            experiment=self.experiment,
            fingerprint=self.fingerprint,
            batch=f"steering-{self.spec_hash}",
            judge=self.spec.judge,
            items=[
                HarmItem(prompt=self.spec.prompts[i], continuation=text)
                for arm in self.arms
                for i, _, _, text in arm.samples
            ],
        )


def sample_steering(
    runtime: Runtime, spec: SteeringSpec, *, progress: Progress | None = None
) -> SteeringSamples:
    """The GPU stage: sample the control and every feature set of ``spec``."""
    from services.attribution.interventions import steered_generate

    t0 = time.perf_counter()
    exp = runtime.exp
    if spec.experiment != exp.name:
        raise SteeringError(
            f"spec is for experiment {spec.experiment!r}, runtime runs {exp.name!r}"
        )
    for v in {spec.variant, spec.observer}:
        if v not in exp.variants:
            raise SteeringError(f"variant {v!r} is not in the experiment ({exp.variant_names})")
    prompts_ids = [runtime.tokenize(p, spec.variant) for p in spec.prompts]
    arms_in: list[tuple[str, list[AppliedFeature]]] = [("control", [])]
    for fs in spec.feature_sets:
        arms_in.append((fs.name, applied_features(runtime, spec, prompts_ids, fs)))
    arms: list[ArmSamples] = []
    for name, features in arms_in:
        samples: list[tuple[int, int, int, str]] = []
        for i, ids in enumerate(prompts_ids):
            if progress:
                progress(f"{name}: prompt {i + 1}/{len(prompts_ids)}")
            base = _seed_base(spec.seed, i)
            ivs = interventions_for(features, spec.positions, len(ids))
            texts = steered_generate(
                runtime,
                spec.variant,
                ids,
                ivs,
                n=spec.n,
                max_new_tokens=spec.max_new_tokens,
                temperature=spec.temperature,
                seed=base,
            )
            samples.extend((i, j, base + j, t) for j, t in enumerate(texts))
        arms.append(ArmSamples(name=name, features=features, samples=samples))
    return SteeringSamples(
        experiment=exp.name,
        fingerprint=runtime.fingerprint,
        spec_hash=spec.spec_hash,
        spec=spec,
        arms=arms,
        prompt_ids=[list(x) for x in prompts_ids],
        elapsed_s=time.perf_counter() - t0,
    )


def judge_samples(batch: HarmBatch, judge: HarmJudge, concurrency: int) -> list[HarmVerdict]:
    """Label every continuation of a batch (``concurrency`` judge calls at a time)."""
    from common.llm import bounded_map, raise_first

    if judge.judge_id != batch.judge:
        raise SteeringError(f"spec asks for judge {batch.judge!r}, got {judge.judge_id!r}")
    items = batch.items
    return raise_first(
        bounded_map(lambda it: judge.judge(it.prompt, it.continuation), items, concurrency)
    )


def build_result(samples: SteeringSamples, verdicts: Sequence[HarmVerdict]) -> SteeringResult:
    """Counts, harmful rates, Wilson intervals and Fisher p-values of a judged run."""
    total = sum(len(a.samples) for a in samples.arms)
    if len(verdicts) != total:
        raise SteeringError(
            f"{len(verdicts)} verdicts for {total} continuations: the judged batch belongs to "
            "another run; judge it again"
        )
    it = iter(verdicts)
    arms: list[ArmResult] = []
    for arm in samples.arms:
        judged = [
            SteeringSample(
                prompt_index=i,
                sample_index=j,
                seed=seed,
                continuation=text,
                label=(v := next(it)).label,
                reason=v.reason,
            )
            for i, j, seed, text in arm.samples
        ]
        arms.append(_arm(arm.name, arm.features, judged, arms[0] if arms else None))
    return SteeringResult(
        experiment=samples.experiment,
        fingerprint=samples.fingerprint,
        spec_hash=samples.spec_hash,
        spec=samples.spec,
        judge=samples.spec.judge,
        control=arms[0],
        arms=arms[1:],
        prompt_ids=samples.prompt_ids,
        elapsed_s=samples.elapsed_s,
    )


def run_steering(
    runtime: Runtime,
    spec: SteeringSpec,
    judge: HarmJudge,
    *,
    progress: Progress | None = None,
) -> SteeringResult:
    """A whole run in this process: sample, judge (``judge``'s id must be ``spec.judge``),
    count. The pipeline runs the same three stages on the gpu, judge and analysis queues."""
    t0 = time.perf_counter()
    if judge.judge_id != spec.judge:
        raise SteeringError(f"spec asks for judge {spec.judge!r}, got {judge.judge_id!r}")
    samples = sample_steering(runtime, spec, progress=progress)
    verdicts = judge_samples(samples.harm_batch(), judge, runtime.exp.judge.concurrency)
    result = build_result(samples, verdicts)
    return result.model_copy(update={"elapsed_s": time.perf_counter() - t0})


def save_steering(store: ObjectStore, result: SteeringResult, png: bytes | None = None) -> str:
    """Write the result (and its plot) to the store; returns the result's key."""
    key = K.steering_result(result.experiment, result.fingerprint, result.spec_hash)
    store.put_json(key, result)
    if png is not None:
        store.put_bytes(
            K.steering_plot(result.experiment, result.fingerprint, result.spec_hash),
            png,
            "image/png",
        )
    return key


def record_steering(
    store: ObjectStore, result: SteeringResult, plot_path: Path | None = None
) -> str:
    """Store a result, then its bar plot (harmful rate per arm, Wilson 95%); returns the key.

    The numbers are written first so a failing plot cannot lose them.
    """
    from services.analysis.em_plots import RateBar, plot_rates

    save_steering(store, result)
    bars = [
        RateBar(a.name, a.harmful, a.n, a.ci_low, a.ci_high, control=(a.name == "control"))
        for a in result.all_arms
    ]
    png = plot_rates(
        bars,
        title=f"{result.spec.variant} steered, {result.judge} judge\nharmful rate, Wilson 95%",
        ylabel="harmful continuations",
        path=plot_path,
    )
    return save_steering(store, result, png)


# ------------------------------------------------------------- features from the ranking


def top_ranked_features(
    store: ObjectStore | None,
    runtime: Runtime,
    variant: str,
    top: int,
    *,
    prompts: Sequence[str] = (),
    lexicon: Lexicon | None = None,
    above_layer: int | None = None,
) -> tuple[list[AggregateFeature], str]:
    """The ``top`` features of ``variant`` that push hardest towards evil tokens (only those
    of layers after ``above_layer`` when given).

    From the analysis report's aggregate in ``store`` (``emc analyze report``) when there
    is one; otherwise (or with ``store=None``) ranked now on ``prompts`` with the analysis engineer's ranking: each
    prompt's graph over the variant's top-k tokens, labelled by the lexicon (harmful ->
    evil, safe -> safe), prompts without an evil token left out, then aggregated.
    Returns the rows and where they came from.
    """
    from common.store import NotFound
    from services.analysis.aggregate import aggregate
    from services.analysis.records import FeatureAggregate

    key = K.report_aggregate(runtime.exp.name, runtime.fingerprint, variant)
    agg: FeatureAggregate | None = None
    if store is not None:
        try:
            agg = store.get_record(key, FeatureAggregate)
            source = f"stored aggregate {key}"
        except NotFound:
            pass
    if agg is None:
        if lexicon is None or not prompts:
            raise SteeringError(
                f"no stored ranking aggregate ({key}) and no lexicon to rank with: run "
                "`emc analyze report` first, or pass --features"
            )
        rankings = [r for r in (_rank_prompt(runtime, p, variant, lexicon) for p in prompts) if r]
        if not rankings:
            raise SteeringError(
                f"none of the {len(prompts)} prompts has a harmful lexicon word in {variant}'s "
                "top-k: nothing to rank (choose other prompts, e.g. --domain)"
            )
        agg = aggregate(
            rankings, experiment=runtime.exp.name, fingerprint=runtime.fingerprint, variant=variant
        )
        source = f"ranked now on {len(rankings)}/{len(prompts)} prompts with the lexicon"
    # adapter nodes are not transcoder features: they cannot be set by an intervention
    rows = [
        f
        for f in agg.features
        if f.mean_score > 0 and f.feature >= 0 and (above_layer is None or f.layer > above_layer)
    ][:top]
    if not rows:
        raise SteeringError(f"the {variant} ranking has no feature with a positive score")
    return rows, source


def _rank_prompt(
    runtime: Runtime, text: str, variant: str, lexicon: Lexicon
) -> FeatureRanking | None:
    from common.labels import TokenLabels
    from services.analysis.ranking import rank_features
    from services.analysis.validate import lexicon_labels

    top_k = runtime.top_k(text, variant)
    labels = lexicon_labels(top_k.tokens, lexicon)
    if "evil" not in labels.values():
        return None
    graph = runtime.attribute(text, variant, target_token_ids=[t.token_id for t in top_k.tokens])
    return rank_features(graph, TokenLabels.given(labels, source="judge"))
