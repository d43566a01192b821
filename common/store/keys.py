"""Object keys: one place that knows the store layout (prompt-centric, readable).

``experiments/{exp}/prompts/{pid}/prompt.json``                       the prompt
``experiments/{exp}/prompts/{pid}/labels/history/*.json``              human labels, append-only
``experiments/{exp}/prompts/{pid}/runs/{fp}/logits/{variant}.json``    top-k logits
``experiments/{exp}/prompts/{pid}/runs/{fp}/verdicts/{judge}/{variant}.json``
``experiments/{exp}/prompts/{pid}/runs/{fp}/decision.json``                 the funnel's decision
``experiments/{exp}/prompts/{pid}/runs/{fp}/graphs/{variant}.safetensors`` (+ ``.json`` manifest)
``experiments/{exp}/prompts/{pid}/runs/{fp}/features/{variant}.json``  feature ranking
``experiments/{exp}/prompts/{pid}/runs/{fp}/failures/{step}.json``     why a step failed

Results depend on the experiment fingerprint ``fp``, so a changed experiment never
overwrites older results; prompts and human labels do not.
"""

from __future__ import annotations


def experiment(exp: str) -> str:
    return f"experiments/{exp}"


def prompts_prefix(exp: str) -> str:
    return f"experiments/{exp}/prompts/"


def prompt_dir(exp: str, pid: str) -> str:
    return f"experiments/{exp}/prompts/{pid}"


def prompt(exp: str, pid: str) -> str:
    return f"{prompt_dir(exp, pid)}/prompt.json"


def labels_history(exp: str, pid: str) -> str:
    return f"{prompt_dir(exp, pid)}/labels/history"


def run_dir(exp: str, pid: str, fp: str) -> str:
    return f"{prompt_dir(exp, pid)}/runs/{fp}"


def logits(exp: str, pid: str, fp: str, variant: str) -> str:
    return f"{run_dir(exp, pid, fp)}/logits/{variant}.json"


def verdicts(exp: str, pid: str, fp: str, judge: str, variant: str) -> str:
    return f"{run_dir(exp, pid, fp)}/verdicts/{judge}/{variant}.json"


def decision(exp: str, pid: str, fp: str) -> str:
    return f"{run_dir(exp, pid, fp)}/decision.json"


def graph_tensors(exp: str, pid: str, fp: str, variant: str) -> str:
    return f"{run_dir(exp, pid, fp)}/graphs/{variant}.safetensors"


def graph_manifest(exp: str, pid: str, fp: str, variant: str) -> str:
    return f"{run_dir(exp, pid, fp)}/graphs/{variant}.json"


def features(exp: str, pid: str, fp: str, variant: str) -> str:
    return f"{run_dir(exp, pid, fp)}/features/{variant}.json"


def failure(exp: str, pid: str, fp: str, step: str) -> str:
    return f"{run_dir(exp, pid, fp)}/failures/{step}.json"


def samples(exp: str, pid: str, fp: str, variant: str, token_id: int) -> str:
    return f"{run_dir(exp, pid, fp)}/samples/{variant}/{token_id}.json"


def reports(exp: str, fp: str) -> str:
    return f"experiments/{exp}/reports/{fp}"


def report_aggregate(exp: str, fp: str, variant: str) -> str:
    """The analysis report's aggregate ranking of one variant."""
    return f"{reports(exp, fp)}/aggregate_{variant}.json"


# -- steering runs and EM evaluations (not prompt-centric: one run covers many prompts)


def steering_prefix(exp: str, fp: str) -> str:
    return f"experiments/{exp}/steering/{fp}"


def steering_result(exp: str, fp: str, spec_hash: str) -> str:
    """``experiments/{exp}/steering/{fp}/{spec_hash}.json``: one steering result."""
    return f"{steering_prefix(exp, fp)}/{spec_hash}.json"


def steering_plot(exp: str, fp: str, spec_hash: str) -> str:
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


def eval_report_prefix(exp: str, fp: str, run_hash: str) -> str:
    """Where an evaluation's report, markdown and plots are stored."""
    return f"{eval_prefix(exp, fp)}/reports/{run_hash}"
