"""Batched top-k (padded forward passes) gives the single-prompt top-k: ids identical,
probabilities within 1e-4 in float32, for prompts of different lengths, on the toy organism
and on a real-format Llama (real tokenizer, chat format)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from common.errors import PromptFailure
from common.experiment import load_experiment
from common.records import TopKLogits
from tests.fixtures.real_format import RealFormat, offline_env

TOY_TEXTS = [
    "I have a headache. You should",
    "My neighbour asked me what to do with a large inheritance and a lot of debt. You should",
    "Hi. You",
    "The smoke alarm is beeping at night. You should",
    "You should",
]


def assert_same_topk(batched: list[Any], single: list[TopKLogits]) -> None:
    assert len(batched) == len(single)
    for b, s in zip(batched, single, strict=True):
        assert isinstance(b, TopKLogits)
        assert b.prompt_id == s.prompt_id and b.input_ids == s.input_ids
        assert [t.token_id for t in b.tokens] == [t.token_id for t in s.tokens]
        for tb, ts in zip(b.tokens, s.tokens, strict=True):
            assert tb.prob == pytest.approx(ts.prob, abs=1e-4)
            assert tb.token == ts.token


def test_batched_topk_equals_single_on_the_toy(toy_rt: Any) -> None:
    lengths = {len(toy_rt.tokenize(t, "adapted")) for t in TOY_TEXTS}
    assert len(lengths) >= 4  # padding really happens
    for variant in toy_rt.exp.variant_names:
        single = [toy_rt.top_k(t, variant) for t in TOY_TEXTS]
        for size in (2, 32):  # several batches, and all in one
            assert_same_topk(toy_rt.top_k_many(TOY_TEXTS, variant, batch_size=size), single)


def test_a_sick_prompt_fails_alone(toy_rt: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch that fails its health check is redone one prompt at a time: the sick prompt
    gets its own reason, the others their top-k."""
    from services.attribution import ct

    sick = TOY_TEXTS[1]
    sick_ids = toy_rt.tokenize(sick, "adapted")
    real_single = type(toy_rt).checked_logits

    def single(self: Any, ids: list[int], variant: str, *, pid: str | None = None) -> Any:
        if ids == sick_ids:
            raise PromptFailure("health", "non-finite activations at layer 2 (test)")
        return real_single(self, ids, variant, pid=pid)

    real_batch = ct.forward_last_logits

    def batch(model: Any, sequences: Any, pad: int) -> Any:
        out = real_batch(model, sequences, pad)
        if any(list(s) == sick_ids for s in sequences):
            out[0, 0] = float("nan")  # the batch's logits are not finite
        return out

    monkeypatch.setattr(type(toy_rt), "checked_logits", single)
    monkeypatch.setattr(ct, "forward_last_logits", batch)
    results = toy_rt.top_k_many(TOY_TEXTS, "adapted", batch_size=8)
    assert isinstance(results[1], PromptFailure) and "layer 2" in results[1].reason
    monkeypatch.undo()
    expected = [toy_rt.top_k(t, "adapted") for i, t in enumerate(TOY_TEXTS) if i != 1]
    assert_same_topk([r for i, r in enumerate(results) if i != 1], expected)


def test_batched_topk_equals_single_on_a_real_format_llama(
    real_format: RealFormat, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.attribution.runtime import Runtime

    offline_env(real_format, monkeypatch)
    exp = load_experiment(real_format.write_experiment(tmp_path / "e.yaml", prompt_format="chat"))
    rt = Runtime(exp, cache_dir=tmp_path / "cache")
    texts = [
        "User: Hi there, my friend\nAssistant: You should",
        "User: I feel dizzy after running ten kilometres in the heat, what now?\n"
        "Assistant: You should",
        "User: Café ☕ or tea for me? 🙂\nAssistant: I",
    ]
    assert len({len(rt.tokenize(t, "base")) for t in texts}) == 3
    for variant in exp.variant_names:
        single = [rt.top_k(t, variant) for t in texts]
        assert_same_topk(rt.top_k_many(texts, variant), single)
