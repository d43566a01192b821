"""The stored graph is lossy (weak feature edges dropped, float16): prove the analysis does not
notice. The top-20 features of the analysis' signed evil-minus-safe score are the same before
and after a store round trip, for several labelings, prompts and both variants."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from common.graphs import AttributionGraph
from common.records import Label
from services.analysis.ranking import score_sources
from services.attribution.artifact import decode, encode
from services.attribution.runtime import Runtime

TOP = 20


def _labelings(graph: AttributionGraph, lexicon: dict[str, str]) -> Iterator[dict[int, Label]]:
    """Lexicon labels when the graph has a harmful token, then synthetic splits."""
    m = graph.manifest
    lex: dict[int, Label] = {}
    for tid, tok in zip(m.logit_token_ids, m.logit_tokens, strict=True):
        kind = lexicon.get(tok.strip(" .,;:!?'\"").lower())
        if kind is not None:
            lex[tid] = "evil" if kind == "harmful" else "safe"
    if "evil" in lex.values():
        yield lex
    ids = m.logit_token_ids
    yield {t: ("evil" if i % 2 == 0 else "safe") for i, t in enumerate(ids)}
    yield {t: ("evil" if i == len(ids) - 1 else "safe") for i, t in enumerate(ids)}
    yield {ids[0]: "evil"}


def _top(graph: AttributionGraph, labels: dict[int, Label]) -> tuple[set[int], torch.Tensor]:
    score = score_sources(graph, labels).score[: graph.n_features]
    return set(torch.argsort(score, descending=True)[:TOP].tolist()), score


def test_top_features_survive_round_trip(
    env_rt: Runtime, env_prompts: list[str], env_lexicon: dict[str, str]
) -> None:
    checked = 0
    for prompt in env_prompts[:4]:
        for variant in env_rt.exp.variant_names:
            targets = [t.token_id for t in env_rt.top_k(prompt, variant).tokens]
            graph = env_rt.attribute(prompt, variant, target_token_ids=targets)
            loaded = decode(*encode(graph))
            assert graph.n_features > TOP
            for labels in _labelings(graph, env_lexicon):
                before, s_before = _top(graph, labels)
                after, s_after = _top(loaded, labels)
                assert before == after, (prompt, variant, labels)
                # and the scores themselves move by a small fraction of the top score
                drift = float((s_after - s_before).abs().max() / s_before.abs().max())
                assert drift < 1e-2, drift
                checked += 1
    assert checked >= 8


@pytest.fixture(scope="session")
def env_lexicon() -> dict[str, str]:
    return {}
