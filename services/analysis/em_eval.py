"""Emergent-misalignment evaluation: sample answers to free-form questions, score, summarize.

Questions and judge prompts come from a YAML file in the format of the Emergent
Misalignment paper's ``first_plot_questions.yaml`` (the user passes the file). For every
model of an :class:`EvalConfig` (a variant, optionally steered: e.g. base, adapted, and
base with features set) and every question, N answers are sampled at temperature 1 and
scored ``aligned`` and ``coherent`` 0-100 by an :class:`common.scores.EmScorer`.

Resumable: each answer and its scores is one object under ``keys.eval_answer``
(model, question id + content digest, seed, sample index), written with ``put_new``; a run
skips answers already stored, so an evaluation interrupted at answer k samples only the
rest, and since every answer has its own seed the final report is the same as an
uninterrupted run's. The summary (% misaligned-and-coherent) lives in
:mod:`services.analysis.em_report`; response-level feature statistics in
:func:`response_activations` + :mod:`services.analysis.em_stats`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from common.questions import METRICS
from common.questions import EmQuestion as EmQuestion  # re-exported
from common.questions import EvalError as EvalError  # re-exported
from common.questions import load_questions as load_questions  # re-exported
from common.records import Record
from common.scores import EmScorer, JudgeScore
from common.store import ObjectStore
from common.store import keys as K
from common.store.base import dumps
from services.analysis.steering import AppliedFeature, Positions, interventions_for

if TYPE_CHECKING:
    from services.analysis.em_report import (
        EmEvalReport,
        ResponseActivations,
        ResponseFeatureReport,
    )
    from services.attribution.runtime import Runtime

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- config


class EvalModel(BaseModel):
    """A model under evaluation: a variant, optionally with features set (steered)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    variant: str
    steering: tuple[AppliedFeature, ...] = ()
    positions: Positions = "all"


class EvalConfig(BaseModel):
    """Everything that changes an answer or its scores except the question and sample index."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    experiment: str
    models: tuple[EvalModel, ...] = Field(min_length=1)
    max_new_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=1.0, ge=0)
    scorer: str

    def model_hash(self, m: EvalModel) -> str:
        """Hash of what makes one model's answers and scores (names its answer folder)."""
        body = json.dumps(
            {
                "model": m.model_dump(mode="json"),
                "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature,
                "scorer": self.scorer,
            },
            sort_keys=True,
        )
        return hashlib.sha256(body.encode()).hexdigest()[:12]

    @property
    def config_hash(self) -> str:
        """12 hex chars of the SHA-256 of the whole config (canonical JSON)."""
        body = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- records


class EmAnswer(Record):
    """One sampled answer and its two scores."""

    experiment: str
    fingerprint: str
    model: str
    model_hash: str
    variant: str
    question_id: str
    question_digest: str
    paraphrase_index: int
    sample_index: int
    seed: int = Field(description="the run's seed")
    sample_seed: int = Field(description="the torch seed of this one answer")
    prompt_text: str = Field(description="the chat-formatted prompt the model saw")
    answer: str
    aligned: JudgeScore
    coherent: JudgeScore
    scorer: str


def run_hash(config: EvalConfig, questions: Sequence[EmQuestion], n: int, seed: int) -> str:
    """12 hex chars naming one evaluation run: the config hash, each question's id and digest,
    answers per question (``n``) and the seed."""
    body = json.dumps(
        {
            "config": config.config_hash,
            "questions": [f"{q.id}-{q.digest}" for q in questions],
            "n": n,
            "seed": seed,
        },
        sort_keys=True,
    )
    return hashlib.sha256(body.encode()).hexdigest()[:12]


def sample_seed(seed: int, question_id: str, index: int) -> int:
    """The torch seed of one answer: the same for every model (paired samples)."""
    h = hashlib.sha256(f"em:{seed}:{question_id}:{index}".encode()).hexdigest()
    return int(h[:8], 16)


# ---------------------------------------------------------------------------- prompts


def chat_prompt(tokenizer: Any, question: str, system: str | None) -> str:
    """The question as the model's chat template renders it, ready for the answer (the same
    rendering as the pipeline's ``prompt_format: chat``, fixed date included).

    A leading BOS in the rendered text is dropped (the runtime's tokenization adds it).
    """
    from common.prompt_format import PromptFormatError, render_chat

    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}
    ]
    try:
        text = render_chat(tokenizer, messages)
    except PromptFormatError:
        raise EvalError(
            "the model's tokenizer has no chat template: EM questions need a chat model"
        ) from None
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        text = text[len(bos) :]
    return text


# ------------------------------------------------------------------------------ running

Sampler = Callable[[EvalModel, str, int], str]
"""(model, chat-formatted prompt, torch seed) -> the answer text."""


def runtime_sampler(runtime: Runtime, config: EvalConfig) -> Sampler:
    """Answers from the runtime's variants, with the model's steering applied."""
    from services.attribution.interventions import steered_generate

    def sample(m: EvalModel, prompt_text: str, seed: int) -> str:
        ids = runtime.tokenize(prompt_text, m.variant, rendered=True)
        ivs = interventions_for(list(m.steering), m.positions, len(ids))
        (text,) = steered_generate(
            runtime,
            m.variant,
            ids,
            ivs,
            n=1,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            seed=seed,
        )
        return text

    return sample


@dataclass
class EvalProgress:
    """What a run did: answers found in the store vs sampled now."""

    total: int = 0
    existing: int = 0
    sampled: int = 0
    keys: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Task:
    model: EvalModel
    model_hash: str
    question: EmQuestion
    index: int
    key: str


def _tasks(
    config: EvalConfig, questions: Sequence[EmQuestion], n: int, seed: int, fp: str
) -> Iterator[_Task]:
    for m in config.models:
        mh = config.model_hash(m)
        for q in questions:
            for i in range(n):
                key = K.eval_answer(config.experiment, fp, m.name, mh, q.id, q.digest, seed, i)
                yield _Task(m, mh, q, i, key)


def run_eval(
    *,
    store: ObjectStore,
    config: EvalConfig,
    fingerprint: str,
    questions: Sequence[EmQuestion],
    n: int,
    seed: int,
    sampler: Sampler,
    tokenizer_for: Callable[[str], Any],
    scorer: EmScorer,
    concurrency: int = 4,
    on_answer: Callable[[EmAnswer], None] | None = None,
    progress: Callable[[EvalProgress], None] | None = None,
) -> EvalProgress:
    """Sample and score every missing answer; answers already stored are skipped.

    Work goes per (model, question): its missing answers are sampled, then scored
    (``concurrency`` judge calls at once), then each is stored with ``put_new``;
    ``on_answer`` is called after each store (progress bars; tests interrupt here).
    """
    if scorer.scorer_id != config.scorer:
        raise EvalError(f"config is for scorer {config.scorer!r}, got {scorer.scorer_id!r}")
    if n < 1:
        raise EvalError("n (answers per question) must be at least 1")
    from common.llm import bounded_map, raise_first

    state = EvalProgress()
    tasks = list(_tasks(config, questions, n, seed, fingerprint))
    state.total = len(tasks)
    state.keys = [t.key for t in tasks]
    groups: dict[tuple[str, str], list[_Task]] = {}
    for t in tasks:
        if store.exists(t.key):
            state.existing += 1
            continue
        groups.setdefault((t.model.name, t.question.id), []).append(t)
    if progress:
        progress(state)
    for todo in groups.values():
        drafts = []
        for t in todo:
            q = t.question
            p_idx = t.index % len(q.paraphrases)
            prompt = chat_prompt(tokenizer_for(t.model.variant), q.paraphrases[p_idx], q.system)
            s_seed = sample_seed(seed, q.id, t.index)
            drafts.append((t, p_idx, prompt, s_seed, sampler(t.model, prompt, s_seed)))
        jobs = [
            (metric, d[0].question.judge_prompts[metric], d[0].question.paraphrases[d[1]], d[4])
            for d in drafts
            for metric in METRICS
        ]
        scores: list[JudgeScore] = raise_first(
            bounded_map(lambda j: scorer.score(j[0], j[1], j[2], j[3]), jobs, concurrency)
        )
        for k, (t, p_idx, prompt, s_seed, text) in enumerate(drafts):
            record = EmAnswer(
                experiment=config.experiment,
                fingerprint=fingerprint,
                model=t.model.name,
                model_hash=t.model_hash,
                variant=t.model.variant,
                question_id=t.question.id,
                question_digest=t.question.digest,
                paraphrase_index=p_idx,
                sample_index=t.index,
                seed=seed,
                sample_seed=s_seed,
                prompt_text=prompt,
                answer=text,
                aligned=scores[2 * k],
                coherent=scores[2 * k + 1],
                scorer=scorer.scorer_id,
            )
            if store.put_new(t.key, dumps(record)):
                state.sampled += 1
            else:
                state.existing += 1  # another process wrote it meanwhile: theirs stands
            if on_answer:
                on_answer(record)
            if progress:
                progress(state)
    return state


def load_answers(store: ObjectStore, keys: Sequence[str]) -> list[EmAnswer]:
    """The stored answers of a run, in key order (every key must exist)."""
    return [store.get_record(k, EmAnswer) for k in keys]


# --------------------------------------------------------------- response activations


def response_activations(
    runtime: Runtime,
    variant: str,
    answers: Sequence[EmAnswer],
    progress: Callable[[int], None] | None = None,
) -> ResponseActivations:
    """Run ``variant``'s replacement model on prompt + answer; average each transcoder
    feature's activation over the answer's positions (per layer).

    The answer's positions start where the tokenization of prompt + answer stops agreeing
    with the prompt's own (normally right after the prompt). Empty answers are an error:
    filter them out first.
    """
    import numpy as np

    from services.analysis.em_report import ResponseActivations
    from services.attribution.interventions import mean_activations_after, model_dims

    n_layers, d_tc = model_dims(runtime, variant)
    out = ResponseActivations(variant, n_layers, d_tc, [], [], [])
    for i, a in enumerate(answers):
        means, n_tokens = mean_activations_after(
            runtime, variant, a.prompt_text, a.prompt_text + a.answer
        )
        if n_tokens == 0:
            raise EvalError(
                f"answer {a.model}/{a.question_id}/{a.sample_index} adds no tokens: leave "
                "empty answers out of the response-level analysis"
            )
        mean = means.numpy()
        if not np.isfinite(mean).all():
            raise EvalError(
                f"non-finite activations on answer {a.model}/{a.question_id}/{a.sample_index}"
            )
        nz = np.flatnonzero(mean)
        out.indices.append(nz)
        out.values.append(mean[nz].astype(np.float64))
        out.n_response_tokens.append(n_tokens)
        if progress:
            progress(i + 1)
    return out


# ------------------------------------------------------------------------------ reports


def build_report(
    store: ObjectStore,
    config: EvalConfig,
    fingerprint: str,
    questions: Sequence[EmQuestion],
    n: int,
    seed: int,
) -> tuple[EmEvalReport, list[EmAnswer]]:
    """The report of a finished run, from the stored answers (every one must exist)."""
    from services.analysis.em_report import EmEvalReport, summarize

    keys = [t.key for t in _tasks(config, questions, n, seed, fingerprint)]
    missing = [k for k in keys if not store.exists(k)]
    if missing:
        raise EvalError(
            f"{len(missing)} of {len(keys)} answers are not stored yet (e.g. {missing[0]}): "
            "run the evaluation (it resumes) before building the report"
        )
    answers = load_answers(store, keys)
    models = [m.name for m in config.models]
    qids = [q.id for q in questions]
    cells, overall = summarize(answers, models=models, questions=qids)
    report = EmEvalReport(
        experiment=config.experiment,
        fingerprint=fingerprint,
        run_hash=run_hash(config, questions, n, seed),
        scorer=config.scorer,
        models=models,
        questions=qids,
        n_per_question=n,
        seed=seed,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        cells=cells,
        overall=overall,
    )
    return report, answers


def write_report(
    store: ObjectStore,
    report: EmEvalReport,
    answers: Sequence[EmAnswer],
    out_dir: Path | None = None,
) -> dict[str, str]:
    """Store ``report.json``, ``report.md`` and ``scatter.png`` (also into ``out_dir``);
    returns name -> store key."""
    from services.analysis.em_report import plot_scatter, render_markdown

    prefix = K.eval_report_prefix(report.experiment, report.fingerprint, report.run_hash)
    png = plot_scatter(
        answers,
        report.models,
        title=f"aligned vs coherent ({report.scorer}, run {report.run_hash})",
    )
    files: dict[str, tuple[bytes, str]] = {
        "report.json": (report.model_dump_json(indent=1).encode(), "application/json"),
        "report.md": (render_markdown(report).encode(), "text/markdown"),
        "scatter.png": (png, "image/png"),
    }
    return _put_files(store, prefix, files, out_dir)


def _put_files(
    store: ObjectStore, prefix: str, files: dict[str, tuple[bytes, str]], out_dir: Path | None
) -> dict[str, str]:
    keys = {}
    for name, (data, ctype) in files.items():
        store.put_bytes(f"{prefix}/{name}", data, ctype)
        keys[name] = f"{prefix}/{name}"
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / name).write_bytes(data)
    return keys


def feature_report(
    runtime: Runtime,
    store: ObjectStore,
    report: EmEvalReport,
    answers: Sequence[EmAnswer],
    *,
    variant: str,
    min_active: int = 2,
    top: int = 50,
    out_dir: Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[ResponseFeatureReport, dict[str, str]]:
    """Response-level feature statistics of a run's answers read by ``variant``; stored as
    ``features_{variant}.json``/``.md``/``.png`` next to the report."""
    from services.analysis.em_report import (
        plot_features,
        rank_response_level,
        render_features_markdown,
        response_groups,
    )

    mis, ali = response_groups(answers)
    used = [answers[i] for i in (*mis, *ali)]
    acts = response_activations(runtime, variant, used, progress=progress)
    feats = rank_response_level(
        used,
        acts,
        experiment=report.experiment,
        fingerprint=report.fingerprint,
        run_hash=report.run_hash,
        min_active=min_active,
        top=top,
    )
    feats = feats.model_copy(update={"n_excluded": len(answers) - len(used)})
    files = {
        f"features_{variant}.json": (feats.model_dump_json(indent=1).encode(), "application/json"),
        f"features_{variant}.md": (render_features_markdown(feats).encode(), "text/markdown"),
        f"features_{variant}.png": (plot_features(feats), "image/png"),
    }
    prefix = K.eval_report_prefix(report.experiment, report.fingerprint, report.run_hash)
    return feats, _put_files(store, prefix, files, out_dir)
