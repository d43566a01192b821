"""emc's graphs equal stock circuit-tracer's on the models researchers run, through emc's own
loading path (``Runtime``): the toy organism, and the real-format stand-in (Llama-3.2-Instruct
by hub name from an offline cache, the real tokenizer and chat template, circuit-tracer-format
transcoders, a rank-1 PEFT LoRA).

Stock is ``circuit_tracer.attribute`` with the experiment's own limits (influence ranking
included). For adapted variants the adapter nodes are compared too: stock gets them from a
``setup_attribution`` wrapper that makes the same edit emc's ``prepare`` hook makes. That
comparison attributes every active feature, because emc deliberately attributes adapter nodes
first (they are always in the graph) where stock ranks them like any feature, so under a
``max_feature_nodes`` cap the two select different features by design. Same active features,
activations, selected features, logit targets; adjacency within 1e-5 (fp32).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from common.experiment import Experiment
from services.attribution import ct
from services.attribution.ct import fast as fast_attr
from services.attribution.runtime import Runtime
from tests.attribution.test_fast_attribution import assert_same_graph, stock_with_edit
from tests.fixtures.real_format import RealFormat, offline_env

REALFMT_PROMPT = "User: Found phone on train. What now?\nAssistant: You should"


def _limits(exp: Experiment, *, every_feature: bool = False) -> dict[str, Any]:
    lim = exp.attribution
    return {
        "max_feature_nodes": None if every_feature else lim.max_feature_nodes,
        "batch_size": lim.batch_size,
        "max_n_logits": lim.max_n_logits,
        "desired_logit_prob": lim.desired_logit_prob,
    }


def _stock(rt: Runtime, variant: str, ids: list[int], adapter: list[Any], **kw: Any) -> Any:
    """Stock ``attribute`` on the runtime's model, with the adapter nodes (if any) added by
    wrapping ``setup_attribution``, as a user of stock circuit-tracer would."""
    model = rt.variant(variant).model
    if not adapter:
        return fast_attr.attribute(model, ids, fast=False, **kw)
    d_tc = int(model.transcoders.d_transcoder)
    return stock_with_edit(
        model, ids, lambda ctx: ct.inject_adapter_nodes(ctx, adapter, d_tc), **kw
    )


def _check_variant(rt: Runtime, text: str, variant: str) -> None:
    ids = rt.tokenize(text, variant)
    adapter = rt.adapter_nodes(variant, ids)
    model = rt.variant(variant).model
    kw = _limits(rt.exp)
    ours = ct.attribute(model, ids, **kw)
    assert int(ours.selected_features.numel()) == min(
        int(ours.active_features.shape[0]), kw["max_feature_nodes"]
    )
    assert_same_graph(_stock(rt, variant, ids, [], **kw), ours)
    if adapter:  # what Runtime.raw_graph runs for this variant: adapter nodes split out
        every = _limits(rt.exp, every_feature=True)
        ours = ct.attribute(model, ids, adapter=adapter, **every)
        d_tc = int(model.transcoders.d_transcoder)
        assert bool((ours.active_features[:, 2] >= d_tc).any())
        assert_same_graph(_stock(rt, variant, ids, adapter, **every), ours)


def test_toy_organism_graphs_equal_stock(
    env_exp: Experiment, env_prompts: list[str], model_cache: Path
) -> None:
    rt = Runtime(env_exp, cache_dir=model_cache)
    assert any(rt.uses_adapter_node(v) for v in env_exp.variant_names)
    for variant in env_exp.variant_names:
        _check_variant(rt, env_prompts[0], variant)


@pytest.fixture
def realfmt_rt(real_format: RealFormat, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Runtime:
    from common.experiment import load_experiment

    offline_env(real_format, monkeypatch)
    exp = load_experiment(real_format.write_experiment(tmp_path / "exp.yaml", prompt_format="chat"))
    return Runtime(exp, fingerprint="equivalence", cache_dir=tmp_path / "cache")


def test_real_format_graphs_equal_stock(realfmt_rt: Runtime) -> None:
    rt = realfmt_rt
    assert rt.exp.attribution.batch_size < rt.exp.attribution.max_feature_nodes  # ranked
    assert any(rt.uses_adapter_node(v) for v in rt.exp.variant_names)
    for variant in rt.exp.variant_names:
        _check_variant(rt, REALFMT_PROMPT, variant)
