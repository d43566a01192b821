"""Sampling for the answers generator: answers to open questions and rollouts from their
prefixes (records in :mod:`common.answers`), through the runtime's tokenization.

The model's input for a question answered up to a prefix is the house text
``User: <question>\\nAssistant:<prefix>`` rendered in the experiment's ``prompt_format``
(chat: the question through the chat template, then the prefix), so the rollouts from the
prefix at a pivot see the same tokens as the prompt emitted for it. Sampling is seeded per
answer and per prefix: a re-run writes the same texts.
"""

from __future__ import annotations

from common.answers import PtsAnswer, RolloutBatch, answer_prefix_input, answer_seed
from common.experiment import PtsSpec
from common.prompt_format import render_chat
from common.questions import EmQuestion
from common.store import ObjectStore
from common.store import keys as K
from services.attribution.runtime import Runtime, sample_ids


def prefix_ids(runtime: Runtime, variant: str, question: str, prefix: str) -> list[int]:
    """Token ids of ``question`` answered up to ``prefix`` (BOS included)."""
    if runtime.exp.prompt_format == "house":
        return runtime.tokenize(answer_prefix_input(question, prefix), variant)
    tok = runtime.variant(variant).tokenizer
    rendered = render_chat(tok, [{"role": "user", "content": question}])
    sep = "" if rendered[-1:].isspace() or not prefix.strip() else " "
    return runtime.tokenize(rendered + sep + prefix.lstrip(), variant, rendered=True)


def sample_answer(
    runtime: Runtime,
    question: EmQuestion,
    paraphrase: int,
    sample: int,
    variant: str,
    answer_id: str,
    spec: PtsSpec,
) -> PtsAnswer:
    """One answer of ``variant`` (unscored), with the character offset of every token."""
    text = question.paraphrases[paraphrase]
    seed = answer_seed(answer_id, -1)
    ids = prefix_ids(runtime, variant, text, "")
    (new,) = sample_ids(runtime, ids, variant, 1, spec.max_new_tokens, spec.temperature, seed)
    tok = runtime.variant(variant).tokenizer
    answer = str(tok.decode(new, skip_special_tokens=True))
    offsets = [len(str(tok.decode(new[:k], skip_special_tokens=True))) for k in range(len(new))]
    offsets.append(len(answer))
    return PtsAnswer(
        experiment=runtime.exp.name,
        fingerprint=runtime.fingerprint,
        answer_id=answer_id,
        variant=variant,
        question_id=question.id,
        question_digest=question.digest,
        paraphrase_index=paraphrase,
        sample_index=sample,
        question=text,
        seed=seed,
        answer=answer,
        token_ids=new,
        offsets=[min(o, len(answer)) for o in offsets],
    )


def sample_rollouts(
    runtime: Runtime, store: ObjectStore, answer: PtsAnswer, prefixes: list[int], spec: PtsSpec
) -> list[str]:
    """``spec.rollouts`` rollouts per prefix (one batched generate call each), stored
    unscored; prefixes already stored are kept. Returns the keys of every prefix asked."""
    tok = runtime.variant(answer.variant).tokenizer
    out = []
    for k in prefixes:
        key = K.pts_rollouts(answer.experiment, answer.fingerprint, answer.answer_id, k)
        out.append(key)
        if store.exists(key):
            continue
        prefix = answer.prefix(k)
        ids = prefix_ids(runtime, answer.variant, answer.question, prefix)
        seed = answer_seed(answer.answer_id, k)
        budget = max(1, spec.max_new_tokens - k)
        news = sample_ids(
            runtime, ids, answer.variant, spec.rollouts, budget, spec.temperature, seed
        )
        batch = RolloutBatch(
            experiment=answer.experiment,
            fingerprint=answer.fingerprint,
            answer_id=answer.answer_id,
            prefix_tokens=k,
            prefix=prefix,
            seed=seed,
            continuations=[str(tok.decode(n, skip_special_tokens=True)) for n in news],
        )
        store.put_json(key, batch)
    return out
