"""The adapter as a node: a LoRA on down_proj split out of its layer's error node, exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.experiment import Experiment, load_experiment
from common.graph.influence import logit_influence
from common.graph.model import AttributionGraph
from services.attribution.adapter import AdapterNodeError, read_lora
from services.attribution.runtime import Runtime
from tests.fixtures.real_format import RealFormat, offline_env

PROMPT = "User: Found phone on train. What now?\nAssistant: You should"


def _with(exp: Experiment, **attribution: object) -> Experiment:
    return exp.model_copy(update={"attribution": exp.attribution.model_copy(update=attribution)})


def _per_position(
    graph: AttributionGraph, rows: torch.Tensor, layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(adapter columns summed per position, error columns of ``layer``) of ``rows``."""
    m = graph.manifest
    adapter = torch.zeros(rows.shape[0], m.n_pos, dtype=rows.dtype)
    for i in (graph.features[:, 2] < 0).nonzero().flatten().tolist():
        adapter[:, int(graph.features[i, 1])] += rows[:, i]
    errors = rows[:, graph.error_slice].reshape(rows.shape[0], m.n_layers, m.n_pos)[:, layer]
    return adapter, errors


def test_the_adapter_node_and_the_rest_add_up_to_the_old_error_node(
    real_format: RealFormat, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Base-fit transcoders, a rank-1 LoRA on one layer: before the split the LoRA layer's
    error node carries much of the score; after it, the adapter node carries that, and the
    adapter + the remaining error give the old error node's edges and influences exactly."""
    offline_env(real_format, monkeypatch)
    exp = load_experiment(real_format.write_experiment(tmp_path / "exp.yaml"))
    layer = real_format.adapter_layer
    (lora,) = read_lora(real_format.adapter_dir)
    assert lora.layer == layer and lora.rank == 1 and lora.scale == 32.0
    on = Runtime(_with(exp, max_feature_nodes=100_000), fingerprint="on", cache_dir=tmp_path)
    off = Runtime(
        _with(exp, max_feature_nodes=100_000, adapter_node=False),
        fingerprint="off",
        cache_dir=tmp_path,
    )
    targets = [t.token_id for t in on.top_k(PROMPT, "adapted").tokens]
    g_on = on.attribute(PROMPT, "adapted", target_token_ids=targets)
    g_off = off.attribute(PROMPT, "adapted", target_token_ids=targets)
    n_adapter = int((g_on.features[:, 2] < 0).sum())
    assert n_adapter == g_on.manifest.n_pos - 1  # one node per position after BOS
    assert set(g_on.features[g_on.features[:, 2] < 0, 0].tolist()) == {layer}
    # one hop: the edges into the logits add up exactly
    a_dir, e_dir = _per_position(g_on, g_on.adjacency[g_on.logit_slice], layer)
    _, e_old = _per_position(g_off, g_off.adjacency[g_off.logit_slice], layer)
    torch.testing.assert_close(a_dir + e_dir, e_old, rtol=0, atol=1e-5 * float(e_old.abs().max()))
    # all paths: the two sources' total influences are the old error node's
    t_on, t_off = logit_influence(g_on).total, logit_influence(g_off).total
    a_tot, e_tot = _per_position(g_on, t_on, layer)
    _, e_old_tot = _per_position(g_off, t_off, layer)
    torch.testing.assert_close(
        a_tot + e_tot, e_old_tot, rtol=0, atol=1e-5 * float(e_old_tot.abs().max())
    )
    # the LoRA's effect was in that error node, and now is in the adapter node
    assert float(a_tot.abs().sum()) > 0.5 * float(e_old_tot.abs().sum())
    # the adapter node is driven by upstream nodes (it has incoming edges)
    rows = g_on.adjacency[: g_on.n_features]
    adapter_rows = rows[g_on.features[:, 2] < 0]
    assert bool(adapter_rows.any())
    # the base variant has no adapter: no adapter node
    g_base = on.attribute(PROMPT, "base", target_token_ids=targets)
    assert not bool((g_base.features[:, 2] < 0).any())


def test_adapters_beyond_down_proj_are_refused(tmp_path: Path, real_format: RealFormat) -> None:
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    other = tmp_path / "lora"
    shutil.copytree(real_format.adapter_dir, other)
    weights = load_file(other / "adapter_model.safetensors")
    weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(1, 4)
    save_file(weights, other / "adapter_model.safetensors")
    with pytest.raises(AdapterNodeError, match=r"more than mlp\.down_proj"):
        read_lora(other)
    cfg = json.loads((real_format.adapter_dir / "adapter_config.json").read_text())
    assert cfg["r"] == 1


def test_adapter_nodes_are_always_in_the_graph(
    real_format: RealFormat, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With few feature nodes allowed, every adapter node still gets a row (attributed
    first): dropping one would lose its share of the score from the graph."""
    offline_env(real_format, monkeypatch)
    exp = load_experiment(real_format.write_experiment(tmp_path / "exp.yaml"))
    rt = Runtime(_with(exp, max_feature_nodes=8), fingerprint="few", cache_dir=tmp_path)
    g = rt.attribute(PROMPT, "adapted")
    assert int((g.features[:, 2] < 0).sum()) == g.manifest.n_pos - 1
    assert g.n_features == g.manifest.n_pos - 1  # the adapter nodes took the whole budget
