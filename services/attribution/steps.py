"""The attribution service's steps on one prompt, reading and writing the object store.

Celery tasks and CLI commands are thin shells around these. Each step is idempotent: the
same prompt and fingerprint write the same keys with the same content. A step raises
:class:`~common.errors.PromptFailure` (not a zero result) when the model misbehaves.
"""

from __future__ import annotations

from typing import Literal

from common.records import GraphManifest, Prompt, TopKLogits
from common.store import NotFound, ObjectStore, keys
from common.store.base import dumps
from services.attribution.artifact import save_graph
from services.attribution.runtime import Runtime

Targets = Literal["salient", "topk"]


def logits_step(
    runtime: Runtime, store: ObjectStore, prompt: Prompt, variants: list[str] | None = None
) -> list[TopKLogits]:
    """Top-k next tokens of every variant (reference first), stored at ``keys.logits``."""
    exp = runtime.exp
    out = []
    for variant in variants or exp.variant_names:
        topk = runtime.top_k(prompt.text, variant)
        store.put_json(keys.logits(exp.name, prompt.id, runtime.fingerprint, variant), topk)
        out.append(topk)
    return out


def graph_step(
    runtime: Runtime,
    store: ObjectStore,
    prompt: Prompt,
    variant: str,
    *,
    targets: Targets = "salient",
) -> GraphManifest:
    """Attribution graph of (prompt, variant), stored at ``keys.graph_tensors``/``graph_manifest``.

    ``targets="topk"`` makes the variant's stored top-k tokens the logit nodes (computed and
    stored first if missing), so every judged token can be explained; ``"salient"`` uses the
    experiment's ``max_n_logits``/``desired_logit_prob``.
    """
    exp = runtime.exp
    target_ids: list[int] | None = None
    if targets == "topk":
        key = keys.logits(exp.name, prompt.id, runtime.fingerprint, variant)
        try:
            topk = store.get_record(key, TopKLogits)
        except NotFound:
            topk = logits_step(runtime, store, prompt, [variant])[0]
        target_ids = [t.token_id for t in topk.tokens]
    graph = runtime.attribute(prompt.text, variant, target_token_ids=target_ids)
    return save_graph(store, exp, graph)


def ensure_prompt(store: ObjectStore, exp_name: str, text: str, source: str) -> Prompt:
    """The stored prompt with this exact text (created if absent, never overwritten)."""
    prompt = Prompt.new(text, source=source)
    key = keys.prompt(exp_name, prompt.id)
    if store.put_new(key, dumps(prompt)):
        return prompt
    return store.get_record(key, Prompt)
