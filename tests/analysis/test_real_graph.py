"""Influence on real circuit-tracer graphs (a tiny random Llama + random transcoders, ~1 s).

The strongest check of the multi-hop math that does not trust the adjacency matrix: the
model itself computes the linearised total effect. With every MLP output, LayerNorm scale and
attention pattern frozen (``feature_intervention(..., constrained_layers=all layers)``), an
intervention moves only the *direct* targets of the features it sets, and
``apply_activation_function=False`` returns the targets' pre-activations. Feeding the changed
pre-activations back as the new feature values, layer after layer, reaches the fixed point of
the local replacement model: the total effect through all feature paths, measured by the
model. It must equal our ``T[:, s]`` (we switch s off, so the logits move by ``-T[k, s]``;
logit nodes are demeaned logits).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from circuit_tracer.graph import compute_influence, normalize_matrix

from common.experiment import load_experiment
from common.graph.influence import logit_influence
from common.graph.model import AttributionGraph
from tests.fixtures.tiny import PROMPTS, build_tiny


@pytest.fixture(scope="module")
def tiny_graph(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[object, AttributionGraph]]:
    from services.attribution.runtime import Runtime, clear_cache

    root = build_tiny(tmp_path_factory.mktemp("tiny-analysis"))
    exp = load_experiment(root / "experiment.yaml")
    rt = Runtime(exp, fingerprint="analysis-tiny", cache_dir=tmp_path_factory.mktemp("cache"))
    graph = rt.attribute(PROMPTS[0], "base")
    yield rt.variant("base").model, graph
    clear_cache()


def test_structure_of_a_real_graph(tiny_graph: tuple[object, AttributionGraph]) -> None:
    _, g = tiny_graph
    inf = logit_influence(g)
    assert inf.method == "solve" and inf.residual < 1e-9
    assert inf.backward_edges == 0  # features only feed later layers
    assert 1 <= inf.hops <= g.manifest.n_layers - 1
    series = logit_influence(g, max_hops=g.manifest.n_layers + 1)
    torch.testing.assert_close(series.total, inf.total, rtol=1e-9, atol=1e-6)


def test_total_effect_matches_the_models_linearised_response(
    tiny_graph: tuple[object, AttributionGraph],
) -> None:
    model, g = tiny_graph
    inf = logit_influence(g)
    n_layers = g.manifest.n_layers
    ids = torch.tensor(g.manifest.input_ids)
    feats = [tuple(int(v) for v in row) for row in g.features.tolist()]
    acts = [float(a) for a in g.activations.tolist()]
    logit_ids = g.manifest.logit_token_ids

    def run(values: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        iv = [(layer, pos, f, v) for (layer, pos, f), v in zip(feats, values, strict=True)]
        logits, pre = model.feature_intervention(  # type: ignore[attr-defined]
            ids, iv, constrained_layers=range(n_layers), apply_activation_function=False
        )
        pre = pre.to_dense() if pre.is_sparse else pre
        return logits[0, -1].double(), pre.double()

    z0, pre0 = run(acts)
    # the graph's activations are the model's (active ReLU features: activation = pre-activation)
    assert max(abs(float(pre0[f]) - a) for f, a in zip(feats, acts, strict=True)) < 1e-5

    def measured_total(s: int) -> torch.Tensor:
        values = list(acts)
        values[s] = 0.0
        for _ in range(n_layers + 1):
            z, pre = run(values)
            new = [
                0.0 if t == s else acts[t] + float(pre[f] - pre0[f]) for t, f in enumerate(feats)
            ]
            if new == values:
                break
            values = new
        dz = z - z0
        return -(dz - dz.mean())[logit_ids]

    strongest = torch.argsort(inf.total[:, : g.n_features].abs().sum(0), descending=True)[:4]
    for s in strongest.tolist():
        truth = measured_total(s)
        scale = float(truth.abs().max())
        assert (inf.total[:, s] - truth).abs().max() <= 1e-4 * scale, feats[s]
        # and the indirect paths are most of it on this graph
        assert (inf.direct[:, s] - truth).abs().max() > 0.1 * scale


def test_abs_normalised_real_graph_matches_circuit_tracer(
    tiny_graph: tuple[object, AttributionGraph],
) -> None:
    """The cross-check of test_crosscheck.py on a real graph's structure (see its docstring)."""
    _, g = tiny_graph
    a = g.adjacency.abs().to(torch.float64)
    complete = AttributionGraph(g.manifest, a, g.features, a[: g.n_features].sum(dim=1))
    w = torch.zeros(g.n_nodes, dtype=torch.float64)
    w[g.logit_slice] = torch.tensor(g.manifest.logit_probabilities, dtype=torch.float64)
    ct = compute_influence(normalize_matrix(a), w)[: g.token_slice.stop]
    z = a[g.logit_slice].sum(dim=1)
    ours = (w[g.logit_slice] / z) @ logit_influence(complete).total
    torch.testing.assert_close(ours, ct, rtol=1e-8, atol=1e-14)
    # same ordering: ours, sorted by circuit-tracer's score, is non-decreasing (up to rounding)
    o = ours[torch.argsort(ct)]
    assert bool((o[1:] - o[:-1] >= -1e-9 * float(o.max())).all())
