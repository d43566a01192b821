"""Cross-check against circuit-tracer's own influence computation (``compute_influence``).

circuit-tracer ranks nodes for pruning with ``compute_influence(normalize_matrix(A), w)``:
edges in absolute value, every row scaled to sum 1, path sums of all lengths, logits
weighted by their probabilities ``w``. Ours keeps signs and scales each feature row by the
target's activation instead. The two are *the same path sum* when (a) every edge is
non-negative and (b) each feature's activation equals the sum of its incoming edges
(no encoder bias: the graph is complete). Then ``N = diag(1/a) A_FF`` is exactly
circuit-tracer's normalised feature block, and its normalised logit rows are ``A_L / Z``
with ``Z_k = sum_s |A[k, s]|``, so

    compute_influence(normalize_matrix(A), w)[s] == sum_k (w_k / Z_k) T[k, s]   for every source s

exactly, and therefore the orderings of the scores agree. This passes for the right reason
only: a transposed matrix (rows/columns swapped), normalising by the *source* activation,
or dropping indirect paths each break the equality (checked below), while the signed
rankings on real graphs legitimately differ from circuit-tracer's |A| pruning scores.
"""

from __future__ import annotations

import torch
from circuit_tracer.graph import compute_influence, normalize_matrix

from common.graph.influence import logit_influence
from common.graph.model import AttributionGraph
from tests.analysis.synthetic import linear_net


def complete_non_negative(graph: AttributionGraph) -> AttributionGraph:
    """|A| with each feature's activation set to the sum of its incoming edges.

    A feature without incoming edges gets activation 0: both sides then give it a zero
    row (circuit-tracer's normalisation clamps the zero row sum).
    """
    a = graph.adjacency.abs().to(torch.float64)
    acts = a[: graph.n_features].sum(dim=1)
    return AttributionGraph(graph.manifest, a, graph.features, acts)


def circuit_tracer_scores(graph: AttributionGraph) -> torch.Tensor:
    a = graph.adjacency.to(torch.float64)
    w = torch.zeros(graph.n_nodes, dtype=torch.float64)
    w[graph.logit_slice] = torch.tensor(graph.manifest.logit_probabilities, dtype=torch.float64)
    return compute_influence(normalize_matrix(a), w)[: graph.token_slice.stop]


def ours(graph: AttributionGraph, total: torch.Tensor) -> torch.Tensor:
    a = graph.adjacency.to(torch.float64)
    z = a[graph.logit_slice].abs().sum(dim=1)
    w = torch.tensor(graph.manifest.logit_probabilities, dtype=torch.float64)
    return (w / z) @ total


def test_matches_circuit_tracer_on_a_complete_non_negative_graph() -> None:
    g = complete_non_negative(linear_net(n_layers=4, n_pos=5, seed=21).graph)
    ct = circuit_tracer_scores(g)
    inf = logit_influence(g)
    mine = ours(g, inf.total)
    torch.testing.assert_close(mine, ct, rtol=1e-9, atol=1e-12)
    # hence the same ordering of |scores| (all non-negative here)
    o = mine.abs()[torch.argsort(ct.abs())]
    assert bool((o[1:] - o[:-1] >= -1e-9 * float(o.max())).all())
    # the indirect paths are a real part of it: the direct part alone does not match
    assert not torch.allclose(ours(g, inf.direct), ct, rtol=1e-3)


def test_wrong_normalisation_or_orientation_would_not_match() -> None:
    g = complete_non_negative(linear_net(n_layers=4, n_pos=5, seed=22).graph)
    ct = circuit_tracer_scores(g)
    # normalising by the source's activation instead of the target's
    f = g.n_features
    a = g.adjacency.clone()
    act = g.activations
    ratio = act[:, None] / torch.where(act > 0, act, 1.0)[None, :]
    a[:f, :f] = g.adjacency[:f, :f] * ratio
    wrong = AttributionGraph(g.manifest, a, g.features, g.activations)
    assert not torch.allclose(ours(g, logit_influence(wrong).total), ct, rtol=1e-3)
    # circuit-tracer on the transposed feature block (rows/columns mixed up)
    at = g.adjacency.clone()
    at[:f, :f] = g.adjacency[:f, :f].T
    w = torch.zeros(g.n_nodes, dtype=torch.float64)
    w[g.logit_slice] = torch.tensor(g.manifest.logit_probabilities, dtype=torch.float64)
    ct_t = compute_influence(normalize_matrix(at), w)[: g.token_slice.stop]
    assert not torch.allclose(ours(g, logit_influence(g).total), ct_t, rtol=1e-3)
