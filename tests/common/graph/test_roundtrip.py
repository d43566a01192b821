"""The stored graph is lossy (weak feature edges dropped, float16): prove the analysis does not
notice. The top-20 features of the analysis' signed evil-minus-safe score are the same before
and after a store round trip, for several labelings, prompts and both variants."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from common.graph.artifact import decode, encode
from common.graph.influence import logit_influence
from common.graph.model import AttributionGraph
from common.lexicon import Lexicon
from common.records import Label
from common.store.base import dumps
from services.analysis.ranking import direction_weights, score_sources
from services.attribution.runtime import Runtime

TOP = 20


def _labelings(graph: AttributionGraph, lexicon: Lexicon) -> Iterator[tuple[str, dict[int, Label]]]:
    """Lexicon labels when the graph has a harmful token, then synthetic splits."""
    m = graph.manifest
    lex: dict[int, Label] = {}
    for tid, tok in zip(m.logit_token_ids, m.logit_tokens, strict=True):
        kind = lexicon.kind(tok)
        if kind is not None:
            lex[tid] = "evil" if kind == "harmful" else "safe"
    if "evil" in lex.values():
        yield "lexicon", lex
    ids = m.logit_token_ids
    yield "alternate", {t: ("evil" if i % 2 == 0 else "safe") for i, t in enumerate(ids)}
    yield "last-evil", {t: ("evil" if i == len(ids) - 1 else "safe") for i, t in enumerate(ids)}
    yield "first-only", {ids[0]: "evil"}


def _top(
    graph: AttributionGraph, total: torch.Tensor, labels: dict[int, Label]
) -> tuple[set[int], torch.Tensor]:
    """Top features of the analysis' score (``score_sources``: evil weights minus safe weights
    applied to the total influence), influence computed once per graph."""
    w_evil, w_safe, _, _ = direction_weights(graph, labels)
    score = ((w_evil - w_safe) @ total)[: graph.n_features]
    return set(torch.argsort(score, descending=True)[:TOP].tolist()), score


def test_round_trip_is_small_and_keeps_top_features(
    env_rt: Runtime, env_prompts: list[str], env_lexicon: Lexicon, tmp_path: Path
) -> None:
    """At the organism experiment's own limits: stored bytes <= 1/10 of ``Graph.to_pt`` for
    the base and <= 1/5 for the adapted variant, and the top-20 features of every labeling are
    the same before and after the round trip.

    The adapted bound is what the emergent organism measures (0.13-0.16): its persona latent
    is on at every position, so influence spreads and pruning keeps 50-60% of the edges; the
    base graphs stay near 0.04 (docs/organism.md)."""
    checked: list[str] = []
    for prompt in env_prompts[:3]:
        for variant in env_rt.exp.variant_names:
            raw, elapsed = env_rt.raw_graph(prompt, variant)
            raw.to_pt(str(tmp_path / "g.pt"))
            pt_bytes = (tmp_path / "g.pt").stat().st_size
            graph = env_rt.from_raw(raw, prompt, variant, elapsed)
            data, manifest = encode(graph)
            emc_bytes = len(data) + len(dumps(manifest))
            bound = 0.1 if variant == env_rt.exp.reference else 0.2
            assert emc_bytes <= bound * pt_bytes, (variant, emc_bytes, pt_bytes)
            shift = manifest.limits["logit_rows_shift"]
            assert shift is not None and shift < 1e-2  # logit rows stay ~ direct effects

            loaded = decode(data, manifest)
            assert graph.n_features > TOP
            before_t, after_t = logit_influence(graph).total, logit_influence(loaded).total
            for name, labels in _labelings(graph, env_lexicon):
                before, s_before = _top(graph, before_t, labels)
                after, s_after = _top(loaded, after_t, labels)
                assert before == after, (prompt, variant, labels)
                drift = float((s_after - s_before).abs().max() / s_before.abs().max())
                assert drift < 1e-5, drift
                checked.append(name)
            # and the analysis' own ranking agrees on the loaded graph
            lab = next(_labelings(graph, env_lexicon))[1]
            ranked = score_sources(loaded, lab).score[: graph.n_features]
            assert (
                set(torch.argsort(ranked, descending=True)[:TOP].tolist())
                == _top(graph, before_t, lab)[0]
            )
    assert len(checked) >= 18 and "lexicon" in checked  # the organism's real evil tokens too
