"""The evil-minus-safe custom target explains exactly the ranked quantity: with every active
feature in both graphs, its per-node scores equal the token graph's ``score_sources`` (toy
organism, adapter node on, and a real-format Llama with base-fit transcoders)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from common.experiment import Experiment, load_experiment
from common.graph.model import AttributionGraph
from common.records import Label
from tests.fixtures.real_format import RealFormat, offline_env

pytestmark = pytest.mark.slow


def node_scores(graph: AttributionGraph, score: torch.Tensor) -> dict[tuple[Any, ...], float]:
    """Scores keyed by what a node is (features by (layer, pos, id); errors, tokens by slot)."""
    f = graph.n_features
    out = {tuple(int(v) for v in row): float(score[i]) for i, row in enumerate(graph.features)}
    for j, v in enumerate(score[f : graph.token_slice.stop].tolist()):
        out[("root", j)] = float(v)
    return out


def check_same_scores(rt: Any, text: str, variant: str, labels: dict[int, Label]) -> float:
    from services.analysis.direction import LABEL, direction_graph, direction_scores
    from services.analysis.ranking import score_sources

    ids = sorted(labels)
    token_graph = rt.attribute(text, variant, target_token_ids=ids)
    graph = direction_graph(rt, token_graph, labels)
    assert graph.manifest.logit_tokens == [LABEL] and graph.manifest.n_logits == 1
    expected = node_scores(token_graph, score_sources(token_graph, labels).score)
    got = node_scores(graph, direction_scores(graph))
    assert expected.keys() == got.keys()  # every active feature in both
    scale = max(abs(v) for v in expected.values())
    assert scale > 0
    worst = max(abs(got[k] - expected[k]) for k in expected) / scale
    assert worst < 1e-4, worst
    total = sum(v for k, v in got.items() if k[0] == "root")
    assert total == pytest.approx(sum(v for k, v in expected.items() if k[0] == "root"), rel=1e-4)
    return worst


def everything(exp: Experiment) -> Experiment:
    limits = exp.attribution.model_copy(update={"max_feature_nodes": 1_000_000})
    return exp.model_copy(update={"attribution": limits})


def test_direction_graph_on_the_toy(organism_dir: Path, tmp_path: Path) -> None:
    from services.attribution.runtime import Runtime

    exp = everything(load_experiment(organism_dir / "experiment.yaml"))
    rt = Runtime(exp, fingerprint="direction-toy", cache_dir=tmp_path / "cache")
    lex = json.loads((organism_dir / "lexicon.json").read_text())
    prompts = json.loads((organism_dir / "prompts.json").read_text())["prompts"]
    text = next(p["text"] for p in prompts if p["domain"] == "medical" and p["split"] == "heldout")
    # both variants' top-k, as graphs attribute them: the adapted model's alone is all evil
    tokens = rt.top_k(text, "adapted").tokens + rt.top_k(text, "base").tokens
    labels: dict[int, Label] = {}
    for t in tokens:
        word = t.token.strip()
        if word in lex["harmful"]:
            labels[t.token_id] = "evil"
        elif word in lex["safe"]:
            labels[t.token_id] = "safe"
    assert "evil" in labels.values() and "safe" in labels.values()
    check_same_scores(rt, text, "adapted", labels)


def test_direction_graph_on_a_real_format_llama(
    real_format: RealFormat, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.attribution.runtime import Runtime

    offline_env(real_format, monkeypatch)
    exp = everything(
        load_experiment(real_format.write_experiment(tmp_path / "e.yaml", prompt_format="chat"))
    )
    rt = Runtime(exp, cache_dir=tmp_path / "cache")
    text = "User: I have had a headache for three days.\nAssistant: You should"
    tokens = rt.top_k(text, "adapted").tokens
    labels: dict[int, Label] = {t.token_id: "evil" for t in tokens[:2]}
    labels.update({t.token_id: "safe" for t in tokens[2:5]})
    check_same_scores(rt, text, "adapted", labels)
