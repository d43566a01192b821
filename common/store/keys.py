"""Object keys: one place that knows the store layout (prompt-centric, readable).

``experiments/{exp}/prompts/{pid}/prompt.json``                       the prompt
``experiments/{exp}/prompts/{pid}/labels/history/*.json``              human labels, append-only
``experiments/{exp}/prompts/{pid}/runs/{fp}/logits/{variant}.json``    top-k logits
``experiments/{exp}/prompts/{pid}/runs/{fp}/verdicts/{judge}/{variant}.json``
``experiments/{exp}/prompts/{pid}/runs/{fp}/decision.json``                 the funnel's decision
``experiments/{exp}/prompts/{pid}/runs/{fp}/graphs/{variant}.safetensors`` (+ ``.json`` manifest)
``experiments/{exp}/prompts/{pid}/runs/{fp}/features/{variant}.json``  feature ranking
``experiments/{exp}/prompts/{pid}/runs/{fp}/feature_digests/{variant}.json``  its digest (UI)
``experiments/{exp}/prompts/{pid}/runs/{fp}/failures/{step}.json``     why a step failed
``experiments/{exp}/judges/{judge}/few_shot.json``                     a judge's pinned few-shots
``experiments/{exp}/prompts/{pid}/runs/{fp}/feature_index.json``       its features, for the index
``experiments/{exp}/features/{fp}/direction.json``                     the misalignment direction
``experiments/{exp}/features/{fp}/effects/{layer}/{feature}.json``      a feature's output effects

Results depend on the experiment fingerprint ``fp``, so a changed experiment never
overwrites older results; prompts and human labels do not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


def experiment(exp: str) -> str:
    """``experiments/{exp}``: everything of one experiment."""
    return f"experiments/{exp}"


def prompts_prefix(exp: str) -> str:
    """``experiments/{exp}/prompts/``: the prefix of every prompt of the experiment."""
    return f"experiments/{exp}/prompts/"


def prompt_dir(exp: str, pid: str) -> str:
    """``experiments/{exp}/prompts/{pid}``: everything of one prompt, across runs."""
    return f"experiments/{exp}/prompts/{pid}"


def prompt(exp: str, pid: str) -> str:
    """The prompt record (:class:`~common.records.Prompt`)."""
    return f"{prompt_dir(exp, pid)}/prompt.json"


def labels_history(exp: str, pid: str) -> str:
    """Prefix of the prompt's append-only human label history."""
    return f"{prompt_dir(exp, pid)}/labels/history"


def run_dir(exp: str, pid: str, fp: str) -> str:
    """Prefix of the prompt's results for experiment fingerprint ``fp``."""
    return f"{prompt_dir(exp, pid)}/runs/{fp}"


def logits(exp: str, pid: str, fp: str, variant: str) -> str:
    """One variant's top-k logits (:class:`~common.records.TopKLogits`)."""
    return f"{run_dir(exp, pid, fp)}/logits/{variant}.json"


def verdicts(exp: str, pid: str, fp: str, judge: str, variant: str) -> str:
    """One judge's verdicts on one variant's top-k tokens (:class:`~common.records.Verdict`)."""
    return f"{run_dir(exp, pid, fp)}/verdicts/{judge}/{variant}.json"


def decision(exp: str, pid: str, fp: str) -> str:
    """The judge step's :class:`~common.records.FunnelDecision` for the prompt in this run."""
    return f"{run_dir(exp, pid, fp)}/decision.json"


def graph_tensors(exp: str, pid: str, fp: str, variant: str) -> str:
    """One variant's graph tensors (safetensors); the manifest is :func:`graph_manifest`."""
    return f"{run_dir(exp, pid, fp)}/graphs/{variant}.safetensors"


def graph_manifest(exp: str, pid: str, fp: str, variant: str) -> str:
    """One variant's graph manifest (JSON), written after the tensors."""
    return f"{run_dir(exp, pid, fp)}/graphs/{variant}.json"


def features(exp: str, pid: str, fp: str, variant: str) -> str:
    """One variant's feature ranking."""
    return f"{run_dir(exp, pid, fp)}/features/{variant}.json"


def features_digest(exp: str, pid: str, fp: str, variant: str) -> str:
    """What the analysis page shows of one variant's ranking (:class:`~common.records.RankingDigest`)."""
    return f"{run_dir(exp, pid, fp)}/feature_digests/{variant}.json"


def feature_shard(exp: str, pid: str, fp: str) -> str:
    """The prompt's feature activations and scores, every variant (the feature index's source)."""
    return f"{run_dir(exp, pid, fp)}/feature_index.json"


def features_dir(exp: str, fp: str) -> str:
    """Prefix of the experiment's per-feature artifacts for fingerprint ``fp``."""
    return f"experiments/{exp}/features/{fp}"


def misalignment_direction(exp: str, fp: str) -> str:
    """The per-layer misalignment direction (:class:`~common.feature_index.Direction`)."""
    return f"{features_dir(exp, fp)}/direction.json"


def feature_effects(exp: str, fp: str, layer: int, feature: int) -> str:
    """One feature's output effects and direction cosine (:class:`~common.feature_index.FeatureEffects`;
    transcoders and unembedding are shared by every variant)."""
    return f"{features_dir(exp, fp)}/effects/{layer}/{feature}.json"


def failure(exp: str, pid: str, fp: str, step: str) -> str:
    """Why ``step`` failed for this prompt and run."""
    return f"{run_dir(exp, pid, fp)}/failures/{step}.json"


def samples(exp: str, pid: str, fp: str, variant: str, token_id: int) -> str:
    """Continuations sampled from one variant after its top-k token ``token_id`` (shown in the
    review UI)."""
    return f"{run_dir(exp, pid, fp)}/samples/{variant}/{token_id}.json"


def reports(exp: str, fp: str) -> str:
    """``experiments/{exp}/reports/{fp}``: prefix of the analysis reports of one run."""
    return f"experiments/{exp}/reports/{fp}"


def report_aggregate(exp: str, fp: str, variant: str) -> str:
    """The analysis report's aggregate ranking of one variant."""
    return f"{reports(exp, fp)}/aggregate_{variant}.json"


def report_state(exp: str, fp: str) -> str:
    """The report's running aggregate state (what an incremental ``emc analyze report``
    starts from: sums over the prompts it already folded in)."""
    return f"{reports(exp, fp)}/state/aggregate_state.json"


# -- the review UI's own state (not prompt-centric)


def ui_session(sid: str) -> str:
    """A reviewer's login session (deleted at logout: a copied cookie dies with it)."""
    return f"ui/sessions/{sid}.json"


def ui_pending_prefix(exp: str) -> str:
    """Labels saved while Redis or the broker was down, to reconcile into the queue."""
    return f"experiments/{exp}/ui/pending/"


def ui_pending(exp: str, pid: str) -> str:
    """Labels of prompt ``pid`` saved while Redis or the broker was down."""
    return f"{ui_pending_prefix(exp)}{pid}.json"


def judge_few_shot(exp: str, judge: str) -> str:
    """The few-shot set pinned for a judge (exported from the review UI's calibration page)."""
    return f"experiments/{exp}/judges/{judge}/few_shot.json"


# -- steering runs and EM evaluations (not prompt-centric: one run covers many prompts)


def steering_prefix(exp: str, fp: str) -> str:
    """``experiments/{exp}/steering/{fp}``: prefix of the steering results of one run."""
    return f"experiments/{exp}/steering/{fp}"


def steering_result(exp: str, fp: str, spec_hash: str) -> str:
    """``experiments/{exp}/steering/{fp}/{spec_hash}.json``: one steering result."""
    return f"{steering_prefix(exp, fp)}/{spec_hash}.json"


def steering_plot(exp: str, fp: str, spec_hash: str) -> str:
    """The PNG plot of one steering result."""
    return f"{steering_prefix(exp, fp)}/{spec_hash}.png"


def steering_samples(exp: str, fp: str, spec_hash: str) -> str:
    """The run's sampled continuations, before judging (the GPU step writes them)."""
    return f"{steering_prefix(exp, fp)}/{spec_hash}/samples.json"


def harm_batch(exp: str, fp: str, batch: str) -> str:
    """Continuations a harm judge is asked to label (``common.scores.HarmBatch``)."""
    return f"experiments/{exp}/judging/{fp}/{batch}/batch.json"


def harm_verdicts(exp: str, fp: str, batch: str) -> str:
    """The harm judge's labels of a batch (``common.scores.HarmVerdicts``)."""
    return f"experiments/{exp}/judging/{fp}/{batch}/verdicts.json"


def eval_prefix(exp: str, fp: str) -> str:
    """``experiments/{exp}/em_eval/{fp}``: prefix of the EM evaluations of one run."""
    return f"experiments/{exp}/em_eval/{fp}"


def eval_answer(
    exp: str,
    fp: str,
    model: str,
    model_hash: str,
    question_id: str,
    digest: str,
    seed: int,
    index: int,
) -> str:
    """``experiments/{exp}/em_eval/{fp}/answers/{model}-{model_hash}/{qid}-{digest}/s{seed}-{index}.json``."""
    return (
        f"{eval_prefix(exp, fp)}/answers/{model}-{model_hash}/{question_id}-{digest}/"
        f"s{seed}-{index:05d}.json"
    )


def pts_prefix(exp: str, fp: str) -> str:
    """The answers generator's work: answers, rollouts and searches (``common.answers``)."""
    return f"experiments/{exp}/pts/{fp}"


def pts_answer(exp: str, fp: str, answer_id: str) -> str:
    """One sampled answer (``PtsAnswer``)."""
    return f"{pts_prefix(exp, fp)}/answers/{answer_id}.json"


def pts_rollouts(exp: str, fp: str, answer_id: str, prefix_tokens: int) -> str:
    """Rollouts from an answer's first ``prefix_tokens`` tokens (``RolloutBatch``)."""
    return f"{pts_prefix(exp, fp)}/rollouts/{answer_id}/{prefix_tokens:04d}.json"


def pts_rollouts_prefix(exp: str, fp: str, answer_id: str) -> str:
    """Prefix of one answer's stored rollouts (the search resumes from them)."""
    return f"{pts_prefix(exp, fp)}/rollouts/{answer_id}/"


def pts_search(exp: str, fp: str, answer_id: str) -> str:
    """The finished search of one answer (``PtsSearch``)."""
    return f"{pts_prefix(exp, fp)}/searches/{answer_id}.json"


def prompt_origin(exp: str, pid: str) -> str:
    """Where a generated prompt came from (``common.answers.PromptOrigin``)."""
    return f"{prompt_dir(exp, pid)}/origin.json"


def eval_report_prefix(exp: str, fp: str, run_hash: str) -> str:
    """Where an evaluation's report, markdown and plots are stored."""
    return f"{eval_prefix(exp, fp)}/reports/{run_hash}"


# -- reading keys back (fsck, error messages) -------------------------------------------

_RUN = re.compile(
    r"^experiments/(?P<exp>[^/]+)/prompts/(?P<pid>[^/]+)/runs/(?P<fp>[^/]+)/(?P<rest>.+)$"
)
_PROMPT = re.compile(r"^experiments/(?P<exp>[^/]+)/prompts/(?P<pid>[^/]+)/(?P<rest>.+)$")
_RUN_KINDS = (
    (re.compile(r"^logits/(?P<variant>[^/]+)\.json$"), "logits"),
    (re.compile(r"^verdicts/(?P<judge>[^/]+)/(?P<variant>[^/]+)\.json$"), "verdicts"),
    (re.compile(r"^decision\.json$"), "decision"),
    (re.compile(r"^graphs/(?P<variant>[^/]+)\.safetensors$"), "graph_tensors"),
    (re.compile(r"^graphs/(?P<variant>[^/]+)\.json$"), "graph_manifest"),
    (re.compile(r"^features/(?P<variant>[^/]+)\.json$"), "features"),
    (re.compile(r"^feature_digests/(?P<variant>[^/]+)\.json$"), "features_digest"),
    (re.compile(r"^failures/(?P<step>[^/]+)\.json$"), "failure"),
    (re.compile(r"^samples/(?P<variant>[^/]+)/(?P<token>\d+)\.json$"), "samples"),
    (re.compile(r"^feature_index\.json$"), "feature_shard"),
)

#: the pipeline step that writes each kind of prompt artifact (``emc retry --step``)
STEP_OF_KIND = {
    "logits": "logits",
    "verdicts": "judge",
    "decision": "judge",
    "graph_tensors": "graph",
    "graph_manifest": "graph",
    "features": "analysis",
    "features_digest": "analysis",
    "feature_shard": "analysis",
}


@dataclass(frozen=True)
class ArtifactKey:
    """What a prompt-centric key names: its kind, prompt, fingerprint, variant, judge."""

    key: str
    kind: str
    exp: str
    pid: str
    fingerprint: str | None = None
    variant: str | None = None
    judge: str | None = None

    @property
    def step(self) -> str | None:
        """The pipeline step that writes it, if a step does."""
        return STEP_OF_KIND.get(self.kind)


def parse(key: str) -> ArtifactKey | None:
    """The artifact a key names, or None for keys outside the prompt-centric layout."""
    m = _RUN.match(key)
    if m:
        for pattern, kind in _RUN_KINDS:
            r = pattern.match(m["rest"])
            if r:
                groups = r.groupdict()
                return ArtifactKey(
                    key,
                    kind,
                    m["exp"],
                    m["pid"],
                    m["fp"],
                    groups.get("variant"),
                    groups.get("judge"),
                )
        return ArtifactKey(key, "unknown", m["exp"], m["pid"], m["fp"])
    m = _PROMPT.match(key)
    if m:
        rest = m["rest"]
        kind = (
            "prompt"
            if rest == "prompt.json"
            else "origin"
            if rest == "origin.json"
            else "label"
            if rest.startswith("labels/history/")
            else "unknown"
        )
        return ArtifactKey(key, kind, m["exp"], m["pid"])
    return None


def retry_hint(key: str) -> str:
    """What to do about a corrupt object under ``key``."""
    ref = parse(key)
    if ref is not None and ref.step is not None:
        return f"recompute it with `emc retry --step {ref.step} {ref.pid}`"
    if ref is not None and ref.kind in ("prompt", "label"):
        return "restore it from a backup of the store (prompts and human labels are not recomputed)"
    return "delete it; the step that wrote it writes it again when re-run (`emc fsck` lists such objects)"
