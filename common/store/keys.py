"""Object keys: one place that knows the store layout (prompt-centric, readable).

``experiments/{exp}/prompts/{pid}/prompt.json``                       the prompt
``experiments/{exp}/prompts/{pid}/labels/history/*.json``              human labels, append-only
``experiments/{exp}/prompts/{pid}/runs/{fp}/logits/{variant}.json``    top-k logits
``experiments/{exp}/prompts/{pid}/runs/{fp}/verdicts/{judge}/{variant}.json``
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
